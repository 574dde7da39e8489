"""A SYNTHETIC ranker for benchmarking only: random weights, never trained, never served.

It follows engine/ranker.py's ONNX contract (inputs `history`, `candidates`,
`candidate_scores`; output `scores`) with the usual target-attention shape (DIN, Zhou et al.
2018): each candidate attends over the history, and an MLP scores [attended history,
candidate, their product, stage-one score]. The model stage times it where a repository
version has no ranker of its own, so the ranker's code path and cost scale are measured
before the real ranker lands; its numbers are labelled "synthetic".
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnrec.export.onnx_export import trace_to_onnx


class TargetAttentionRanker(nn.Module):
    def __init__(self, n_items: int, dim: int, max_len: int, mlp_dim: int = 128) -> None:
        super().__init__()
        self.dim, self.max_len, self.mlp_dim = dim, max_len, mlp_dim
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(3 * dim + 1, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, 1))

    def forward(self, history: torch.Tensor, candidates: torch.Tensor, candidate_scores: torch.Tensor) -> torch.Tensor:
        """history (B, L), candidates (B, N) tokens, candidate_scores (B, N) → scores (B, N)."""
        t = history.shape[1]
        pos = torch.arange(self.max_len - t, self.max_len, device=history.device)
        h = self.item_emb(history) + self.pos_emb(pos)  # (B, L, D)
        c = self.item_emb(candidates)  # (B, N, D)
        att = self.query(c) @ self.key(h).transpose(1, 2) / math.sqrt(self.dim)  # (B, N, L)
        att = att.masked_fill((history == 0).unsqueeze(1), -1e9)
        u = F.softmax(att, dim=-1) @ h  # (B, N, D)
        x = torch.cat([u, c, u * c, candidate_scores.unsqueeze(-1)], dim=-1)  # (B, N, 3D + 1)
        return self.mlp(x).squeeze(-1)


def export_ranker(model: TargetAttentionRanker, path: Path) -> Path:
    """ONNX with dynamic batch, length and candidate axes, named per engine/ranker.py."""
    model = model.eval()
    example = (
        torch.randint(1, 10, (2, 8)),
        torch.randint(1, 10, (2, 5)),
        torch.rand(2, 5),
    )
    axes = {
        "history": {0: "batch", 1: "length"},
        "candidates": {0: "batch", 1: "n"},
        "candidate_scores": {0: "batch", 1: "n"},
        "scores": {0: "batch", 1: "n"},
    }
    names = ["history", "candidates", "candidate_scores"]
    trace_to_onnx(model, example, path, names, ["scores"], axes, optimize=False)
    return path
