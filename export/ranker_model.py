"""The second-stage ranker: each candidate attends over the user's encoded history (target attention).

The family of DIN (Zhou et al., KDD 2018) and BST (Chen et al., 2019). For candidate i and
history position j, α_ij = softmax_j(k_j · W v_i), with v_i the candidate's embedding and k_j
the SASRec encoder's hidden state at j plus a learned recency embedding (position counted
from the most recent item), over the `attend_last` most recent positions. The attended
history a_i = Σ_j α_ij h_j, the candidate embedding, their interactions and a few scalar
features feed a small MLP whose output is *added* to stage one's score: the ranker learns a
correction to retrieval, and with its last layer at zero it starts as retrieval exactly.

The history is encoded once per user (the encoder's `hidden` output) and all N candidates are
scored in one pass: the cost grows as history × candidates × dim, never as N transformer passes
(and the history term is capped at `attend_last`).

Features the retrieval model cannot use: the item's training popularity (a buffer baked into
the graph), the candidate's stage-one score relative to the best candidate and standardised over
the list, and recency-aware attention. Not used: the time since the previous interaction (the
serving contract carries no timestamps) and the recency of the candidate in the history (seen
items are never candidates: stage one excludes them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

_BLOCKED = -1e9  # finite, as in the encoder: a row of padding keys stays NaN-free


def features(shape: "RankerShape") -> list[str]:
    """What the ranker reads, for the manifest."""
    own = shape.keys == "items"
    return [
        f"target attention of the candidate over the {shape.attend_last} most recent history items "
        + ("(the ranker's own item embeddings)" if own else "(the encoder's hidden states)")
        + " with a recency embedding",
        "candidate embedding (initialised from the encoder's item embeddings)",
        "candidate × attended history" + ("" if own else ", candidate × query (the last hidden state)"),
        "stage-one score: raw (residual), relative to the best candidate, standardised over the list",
        "log training popularity of the candidate",
    ]


@dataclass
class RankerShape:
    n_items: int
    dim: int  # the encoder's hidden size
    attend_last: int = 50  # the most recent history positions the candidates attend over
    keys: str = "items"  # what candidates attend over: "items" (own embeddings) or "hidden" (encoder states)
    mlp_dim: int = 64
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class TargetAttentionRanker(nn.Module):
    def __init__(self, shape: RankerShape, item_vectors: torch.Tensor | None = None, popularity=None) -> None:
        """item_vectors (n_items, D): the encoder's item embeddings (initial candidate embeddings);
        popularity (n_items,): training interaction counts per catalogue row."""
        super().__init__()
        self.shape = shape
        d = shape.dim
        self.item_emb = nn.Embedding(shape.n_items + 1, d, padding_idx=0)
        self.recency = nn.Embedding(shape.attend_last, d)
        self.w_att = nn.Linear(d, d, bias=False)
        self.scale = 1.0 / math.sqrt(d)
        n_in = (4 if shape.keys == "hidden" else 3) * d + 3
        self.mlp = nn.Sequential(
            nn.Linear(n_in, shape.mlp_dim),
            nn.GELU(),
            nn.Dropout(shape.dropout),
            nn.Linear(shape.mlp_dim, shape.mlp_dim // 2),
            nn.GELU(),
            nn.Dropout(shape.dropout),
            nn.Linear(shape.mlp_dim // 2, 1),
        )
        nn.init.normal_(self.recency.weight, std=0.02)
        nn.init.eye_(self.w_att.weight)
        nn.init.zeros_(self.mlp[-1].weight)  # the ranker starts as stage one's order
        nn.init.zeros_(self.mlp[-1].bias)
        with torch.no_grad():
            self.item_emb.weight.zero_()
            if item_vectors is not None:
                self.item_emb.weight[1:] = torch.as_tensor(item_vectors, dtype=torch.float32)
        pop = np.zeros(shape.n_items + 1, dtype=np.float32)
        if popularity is not None:
            pop[1:] = np.log1p(np.asarray(popularity, dtype=np.float64))
            pop /= max(float(pop.max()), 1.0)
        self.register_buffer("log_pop", torch.from_numpy(pop))  # (I+1,), token-indexed, 0 for padding

    def forward(
        self, history: torch.Tensor, hidden: torch.Tensor, candidates: torch.Tensor, candidate_scores: torch.Tensor
    ) -> torch.Tensor:
        """history (B, L) tokens, hidden (B, L, D), candidates (B, N) tokens (0 = empty), candidate_scores (B, N)
        → scores (B, N)."""
        k = self.shape.attend_last
        history = history[:, -k:]  # slicing past the start keeps everything
        t = history.shape[1]
        pos = torch.arange(k - t, k, device=history.device)
        values = hidden[:, -k:] if self.shape.keys == "hidden" else self.item_emb(history)  # (B, L, D)
        keys = values + self.recency(pos)
        v = self.item_emb(candidates)  # (B, N, D)
        att = (self.w_att(v) @ keys.transpose(1, 2)) * self.scale  # (B, N, L)
        att = att.masked_fill((history == 0).unsqueeze(1), _BLOCKED)
        a = F.softmax(att, dim=-1) @ values  # (B, N, D)

        valid = candidates > 0  # (B, N)
        s = candidate_scores
        best = torch.where(valid, s, torch.full_like(s, _BLOCKED)).amax(dim=1, keepdim=True)
        n = valid.sum(dim=1, keepdim=True).clamp(min=1).to(s.dtype)
        mean = torch.where(valid, s, torch.zeros_like(s)).sum(dim=1, keepdim=True) / n
        var = torch.where(valid, (s - mean) ** 2, torch.zeros_like(s)).sum(dim=1, keepdim=True) / n
        scalars = torch.stack([s - best, (s - mean) / torch.sqrt(var + 1e-6), self.log_pop[candidates]], dim=-1)
        parts = [v, a, v * a]
        if self.shape.keys == "hidden":
            parts.append(v * hidden[:, -1:])  # the last state is stage one's query
        x = torch.cat([*parts, scalars], dim=-1)  # (B, N, 3D or 4D, + 3)
        return s + self.mlp(x).squeeze(-1)
