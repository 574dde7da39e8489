"""The FAISS item index: loading with the tuned search parameters, and masked top-N search.

Approximate indexes search maximum inner product through the L2 reduction of Bachrach et
al. (2014): each item x gets an extra coordinate sqrt(M² − |x|²) (M = the largest item norm)
and queries get 0, so |q − x|² = |q|² + M² − 2 q·x and the nearest items in L2 are exactly
the best by inner product. IVF clustering works well in L2; with raw inner products it
crowds popular, large-norm items into a few lists and needs most lists probed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

log = logging.getLogger(__name__)


def params_string(params: dict[str, Any]) -> str:
    """{"nprobe": 16} → "nprobe=16" (FAISS ParameterSpace syntax)."""
    return ",".join(f"{k}={v}" for k, v in sorted(params.items()))


def apply_params(index: faiss.Index, params: dict[str, Any]) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params_string(params))


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def mips_augment(vectors: np.ndarray, max_norm2: float) -> np.ndarray:
    """Items (N, D) → (N, D + 1) whose L2 neighbours are their inner-product best."""
    norms2 = np.einsum("ij,ij->i", vectors, vectors)
    extra = np.sqrt(np.maximum(max_norm2 - norms2, 0.0))[:, None]
    return np.ascontiguousarray(np.hstack([vectors, extra]), dtype=np.float32)


@dataclass
class ItemIndex:
    """A FAISS index over catalogue rows that always answers in inner-product scores."""

    index: faiss.Index
    mips_max_norm2: float | None = None  # set when items were augmented for L2 search

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def set_params(self, params: dict[str, Any]) -> None:
        apply_params(self.index, params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) queries → (scores, rows), each (B, k), best first; missing slots are -1."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.mips_max_norm2 is None:
            return self.index.search(q, k)
        dist, rows = self.index.search(np.hstack([q, np.zeros((len(q), 1), np.float32)]), k)
        scores = (np.einsum("ij,ij->i", q, q)[:, None] + self.mips_max_norm2 - dist) / 2
        return scores.astype(np.float32), rows


def load_index(
    path: Path | str, params: dict[str, Any], *, mips_max_norm2: float | None = None, use_gpu: bool | None = None
) -> ItemIndex:
    """Read an index and set its search parameters; on a GPU build with a device, move it there."""
    index = faiss.read_index(str(path))
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu:
        # Keep the resources alive as long as the index (FAISS does not own them).
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index.referenced_objects = [res]
        log.info("FAISS index on GPU 0")
    item_index = ItemIndex(index, mips_max_norm2)
    item_index.set_params(params)
    return item_index


def search(
    index: ItemIndex, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows per query, never a row in that query's `exclude` (e.g. the history).

    FAISS is asked for k plus the longest exclusion list, then excluded rows are dropped, so
    every query still gets k results when the catalogue allows. Missing slots are -1 / -inf.
    """
    extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
    fetch = min(k + extra, index.ntotal)
    scores, rows = index.search(queries, fetch)
    if not extra:
        return scores[:, :k], rows[:, :k]
    # Vectorised over the batch: key = query * (ntotal + 1) + row, one sorted lookup for all
    # queries (searchsorted: np.isin's set machinery costs more than the search at batch 1).
    width = index.ntotal + 1
    q_of = np.repeat(np.arange(len(rows), dtype=np.int64), [len(e) for e in exclude])
    excluded = np.sort(q_of * width + np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude]))
    found_keys = np.arange(len(rows), dtype=np.int64)[:, None] * width + rows
    at = np.minimum(np.searchsorted(excluded, found_keys), len(excluded) - 1)
    keep = (rows >= 0) & (excluded[at] != found_keys)
    # Kept entries first, in their score order (a stable sort of the "dropped" flag).
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, order, axis=1)
    out_r = np.where(kept, np.take_along_axis(rows, order, axis=1), -1)
    out_s = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf).astype(np.float32)
    if out_r.shape[1] < k:  # the catalogue is smaller than k
        pad = k - out_r.shape[1]
        out_r = np.pad(out_r, ((0, 0), (0, pad)), constant_values=-1)
        out_s = np.pad(out_s, ((0, 0), (0, pad)), constant_values=-np.inf)
    return out_s, out_r
