"""SASRec: a causal self-attention encoder over item histories (Kang & McAuley, ICDM 2018).

Pre-norm transformer blocks, learned positions, and item embeddings shared with the output
layer, so a user's query vector scores items by inner product — the same inner product the
FAISS index searches. Histories are left-padded with token 0; positions are counted from the
right, so a history padded to any length gives the same query vector.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SASRecConfig

# A finite "minus infinity": a padding query row whose keys are all blocked gets a uniform
# (unused) attention instead of NaN, and a blocked key still gets exactly zero weight.
_BLOCKED = -1e9


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0, "dim must be divisible by n_heads"
        self.n_heads = cfg.n_heads
        self.dim = cfg.dim  # a constant, so exported weight slices fold away (x.shape[-1] would not)
        self.scale = 1.0 / math.sqrt(cfg.dim // cfg.n_heads)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x (B, L, D) → (B, L, D), or (B, 1, D) for the last position only (keys stay all L).

        blocked (B, 1, L, L): True where query i may not attend to key j.
        """
        b, t = x.shape[0], x.shape[1]
        d = self.dim
        if last_only:  # the query of one row, keys and values of all: a fraction of the work
            q = F.linear(x[:, -1:], self.qkv.weight[:d], self.qkv.bias[:d])
            k, v = F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:]).split(d, dim=2)
            blocked = blocked[..., -1:, :]
        else:
            q, k, v = self.qkv(x).split(d, dim=2)
        if self.n_heads == 1:  # no head split: the exported graph skips 6 reshapes per block
            att = (q @ k.transpose(-2, -1)) * self.scale  # (B, Lq, L)
            att = att.masked_fill(blocked[:, 0], _BLOCKED)
            y = self.attn_drop(F.softmax(att, dim=-1)) @ v  # (B, Lq, D)
            return self.resid_drop(self.proj(y))
        lq = q.shape[1]
        # (B, H, L, D/H)
        q = q.view(b, lq, self.n_heads, d // self.n_heads).transpose(1, 2)
        k = k.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
        v = v.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, Lq, L)
        att = att.masked_fill(blocked, _BLOCKED)
        att = self.attn_drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, lq, d)  # (B, Lq, D)
        return self.resid_drop(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.out = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(self.drop(F.gelu(self.fc(x)))))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        x = (x[:, -1:] if last_only else x) + self.attn(self.ln1(x), blocked, last_only)
        return x + self.ffn(self.ln2(x))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig, *, sparse_items: bool = False) -> None:
        """sparse_items: item-table lookups yield sparse gradients (sampled softmax on huge catalogues)."""
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.dim, padding_idx=0, sparse=sparse_items)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def _inputs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, L) int64, left-padded with 0 → embeddings (B, L, D), blocked-attention mask (B, 1, L, L)."""
        t = tokens.shape[1]
        valid = tokens > 0  # (B, L)
        # Right-aligned positions: the last item always has position max_len - 1.
        pos = torch.arange(self.cfg.max_len - t, self.cfg.max_len, device=tokens.device)
        x = self.item_emb(tokens) * math.sqrt(self.cfg.dim) + self.pos_emb(pos)
        x = self.drop(x) * valid.unsqueeze(-1)
        idx = torch.arange(t, device=tokens.device)
        future = idx.unsqueeze(0) > idx.unsqueeze(1)  # (L, L): key j comes after query i
        blocked = future | ~valid.unsqueeze(1)  # (B, L, L): the future and padding keys
        return x, blocked.unsqueeze(1)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) → hidden states of every position (B, L, D): what training reads."""
        x, blocked = self._inputs(tokens)
        for block in self.blocks:
            x = block(x, blocked)
        return self.ln_f(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) → query vectors (B, D): the last position's hidden state.

        The last block computes that one position only (its keys and values still span the
        history), which is what serving needs and about half of a 2-block model's work.
        """
        x, blocked = self._inputs(tokens)
        for block in self.blocks[:-1]:
            x = block(x, blocked)
        return self.ln_f(self.blocks[-1](x, blocked, last_only=True))[:, 0]

    def item_vectors(self) -> torch.Tensor:
        """(n_items, D): catalogue rows, i.e. tokens 1..n_items. Scores are query @ item_vectors.T."""
        return self.item_emb.weight[1:]
