"""The FAISS item index: loading with the tuned search parameters (searching it, with exclusion, is
request-time compute: engine/pipeline.py `search_index` / `search`), and `RowMask`, the rows a
filtered search may return, with the FAISS ID selector and search parameters that apply it inside
the search.

Approximate indexes search maximum inner product through the L2 reduction of Bachrach et
al. (2014): each item x gets an extra coordinate sqrt(M² − |x|²) (M = the largest item norm)
and queries get 0, so |q − x|² = |q|² + M² − 2 q·x and the nearest items in L2 are exactly
the best by inner product. IVF clustering works well in L2; with raw inner products it
crowds popular, large-norm items into a few lists and needs most lists probed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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

    @property
    def max_k(self) -> int:
        """The most results one search may ask for (FAISS's GPU indexes select at most 2048)."""
        return min(self.ntotal, GPU_MAX_K) if type(self.index).__name__.startswith("Gpu") else self.ntotal

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


GPU_MAX_K = 2048


def selector_params(index: faiss.Index, selector, *, exhaustive: bool = False) -> faiss.SearchParameters | None:
    """Search parameters that restrict `index`'s search to `selector`'s ids, with the index's own tuned
    settings (a SearchParameters object replaces them all, so nprobe / efSearch are copied); with
    `exhaustive`, IVF probes every list and HNSW widens its beam. None for an index type FAISS cannot
    filter inside the search (its GPU indexes): the caller then over-fetches and drops rows itself."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        inner = selector_params(index.index, selector, exhaustive=exhaustive)
        if inner is None:
            return None
        params = faiss.SearchParametersPreTransform(index_params=inner)
        params.referenced_objects = [inner]  # SWIG holds a raw pointer
        return params
    if isinstance(index, faiss.IndexIVF):
        nprobe, max_codes = (index.nlist, 0) if exhaustive else (index.nprobe, index.max_codes)
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe, max_codes=max_codes)
    if isinstance(index, faiss.IndexHNSW):
        ef = index.hnsw.efSearch
        return faiss.SearchParametersHNSW(
            sel=selector, efSearch=min(max(16 * ef, 1024), index.ntotal) if exhaustive else ef
        )
    if isinstance(index, (faiss.IndexFlatCodes, faiss.IndexFlat)):
        return faiss.SearchParameters(sel=selector)
    return None


@dataclass(eq=False)
class RowMask:
    """The catalogue rows a search may return (filters, availability), as a bool per row and as the
    FAISS bitmap selector over the same bits. Built once per distinct filter and reused (engine/item_filter.py
    caches them), so the selector and its parameters are made once, not per request."""

    allowed: np.ndarray  # (n_items,) bool
    count: int = field(init=False)

    def __post_init__(self) -> None:
        self.allowed = np.ascontiguousarray(self.allowed, dtype=bool)
        self.count = int(self.allowed.sum())
        self._bits = np.packbits(self.allowed, bitorder="little")  # FAISS reads bit i of byte i >> 3
        self.selector = faiss.IDSelectorBitmap(len(self.allowed), faiss.swig_ptr(self._bits))
        self._params: dict[tuple[int, bool], faiss.SearchParameters | None] = {}

    def params(self, index: ItemIndex, *, exhaustive: bool = False) -> faiss.SearchParameters | None:
        key = (id(index.index), exhaustive)
        if key not in self._params:
            self._params[key] = selector_params(index.index, self.selector, exhaustive=exhaustive)
        return self._params[key]
