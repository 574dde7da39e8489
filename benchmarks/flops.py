"""Analytic FLOP counts of the benchmarked models (one multiply-add = 2 FLOPs).

Counted: every matrix product, i.e. the linear layers, attention scores (Q·Kᵀ) and the
attention-weighted sum (A·V). Not counted: embeddings (lookups), layer norms, softmax, GELU,
masking, residual adds — elementwise work of O(L·D) per block that is small next to the
O(L·D²) products but still costs time, so achieved GFLOP/s slightly understates the work.
Attention is computed densely (the causal mask does not skip work), so the L² terms count in
full. Heads do not change the count: H heads of D/H dims cost what one head of D dims costs.
"""

from __future__ import annotations


def sasrec_block_flops(length: int, dim: int, ffn_dim: int) -> int:
    """One full pre-norm block over L positions, per sequence."""
    L, D, F = length, dim, ffn_dim
    qkv = 2 * L * D * 3 * D
    scores = 2 * L * L * D
    weighted = 2 * L * L * D
    proj = 2 * L * D * D
    ffn = 2 * L * D * F * 2
    return qkv + scores + weighted + proj + ffn


def sasrec_last_block_flops(length: int, dim: int, ffn_dim: int) -> int:
    """The last block when only the last position's output is needed (SASRec.forward): one query
    row, keys and values over all L positions."""
    L, D, F = length, dim, ffn_dim
    q = 2 * D * D
    kv = 2 * L * D * 2 * D
    scores = 2 * L * D
    weighted = 2 * L * D
    proj = 2 * D * D
    ffn = 2 * D * F * 2
    return q + kv + scores + weighted + proj + ffn


def sasrec_flops(
    batch: int, length: int, *, dim: int, n_blocks: int, ffn_dim: int, hidden: bool = False, **_ignored
) -> int:
    """The encoder on (batch, length) tokens: `forward` (query only; the last block computes one
    position) or, with `hidden`, every block over every position (the graph that also outputs
    hidden states for a ranker)."""
    full = sasrec_block_flops(length, dim, ffn_dim)
    if hidden:
        return batch * n_blocks * full
    return batch * ((n_blocks - 1) * full + sasrec_last_block_flops(length, dim, ffn_dim))


def target_attention_flops(batch: int, length: int, n_candidates: int, *, dim: int, mlp_dim: int) -> int:
    """attnrec.benchmarks.synthetic_ranker.TargetAttentionRanker on (B, L) history and (B, N) candidates."""
    L, N, D, H = length, n_candidates, dim, mlp_dim
    keys = 2 * L * D * D  # history → keys
    queries = 2 * N * D * D  # candidates → queries
    scores = 2 * N * L * D
    weighted = 2 * N * L * D
    mlp = 2 * N * (3 * D + 1) * H + 2 * N * H
    return batch * (keys + queries + scores + weighted + mlp)
