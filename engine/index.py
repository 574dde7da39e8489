"""The FAISS item index: loading with the tuned search parameters, and masked top-N search."""
from __future__ import annotations

import logging
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


def load_index(path: Path | str, params: dict[str, Any], *, use_gpu: bool | None = None) -> faiss.Index:
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
    apply_params(index, params)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows per query, never a row in that query's `exclude` (e.g. the history).

    FAISS is asked for k plus the longest exclusion list, then excluded rows are dropped, so
    every query still gets k results when the catalogue allows. Missing slots are -1 / -inf.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
    fetch = min(k + extra, index.ntotal)
    scores, rows = index.search(queries, fetch)
    if not extra:
        return scores[:, :k], rows[:, :k]
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_r = np.full((len(queries), k), -1, dtype=np.int64)
    for i, ex in enumerate(exclude):
        keep = (rows[i] >= 0) & ~np.isin(rows[i], ex)
        r, s = rows[i][keep][:k], scores[i][keep][:k]
        out_r[i, : len(r)] = r
        out_s[i, : len(s)] = s
    return out_s, out_r
