"""The FAISS item index: loading with the tuned search parameters (searching it, with exclusion, is
request-time compute: engine/pipeline.py `search_index` / `search`).

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
from typing import Any

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
