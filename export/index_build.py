"""Building the FAISS item index and tuning its search parameters to a target recall.

Recall@N is measured against exact inner-product search, on real query vectors (validation
users' encodings), and the cheapest setting that reaches the target is kept.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from attnrec.engine.index import ItemIndex, mips_augment
from attnrec.engine.pipeline import search_index
from attnrec.engine.timing import median_ms

log = logging.getLogger(__name__)

EXACT_UP_TO = 50_000  # catalogues this small are searched exactly by default


def default_factory(n_items: int) -> str:
    """Exact search for small catalogues; IVF with ~4·√n lists (a power of two) for large ones."""
    if n_items <= EXACT_UP_TO:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n_items)))
    return f"IVF{nlist},Flat"


def build_index(vectors: np.ndarray, factory: str, *, seed: int = 0) -> ItemIndex:
    """Inner-product index over `vectors` (rows = catalogue rows), trained when it needs it.

    "Flat" searches inner products exactly; every other factory string is built over the
    MIPS→L2 augmented vectors (see attnrec.engine.index), which approximate indexes cluster well.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if factory == "Flat":
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        index.add(vectors)
        return ItemIndex(index)
    max_norm2 = float(np.einsum("ij,ij->i", vectors, vectors).max())
    data = mips_augment(vectors, max_norm2)
    index = faiss.index_factory(data.shape[1], factory, faiss.METRIC_L2)
    if not index.is_trained:
        ivf = _ivf(index)
        sample = data
        if ivf is not None:
            ivf.cp.seed = seed
            # FAISS asks for 39-256 training points per list; 100 keeps k-means at 10^6 items fast.
            n_train = min(len(data), 100 * ivf.nlist)
            rng = np.random.default_rng(seed)
            sample = data[np.sort(rng.choice(len(data), n_train, replace=False))]
        index.train(sample)
    index.add(data)
    return ItemIndex(index, max_norm2)


def _ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _is_hnsw(index: faiss.Index) -> bool:
    return "HNSW" in type(faiss.downcast_index(index)).__name__


def candidate_params(index: faiss.Index) -> list[dict[str, Any]]:
    """Search settings to try, cheapest first."""
    ivf = _ivf(index)
    if ivf is not None:
        out, p = [], 1
        while p < ivf.nlist:
            out.append({"nprobe": p})
            p *= 2
        return out + [{"nprobe": ivf.nlist}]
    if _is_hnsw(index):
        return [{"efSearch": ef} for ef in (16, 32, 64, 128, 256, 512, 1024, 2048)]
    return [{}]  # exact


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean |approx ∩ exact| / N over queries (rows of top-N row ids)."""
    n = exact.shape[1]
    return float(np.mean([len(np.intersect1d(a, e, assume_unique=False)) / n for a, e in zip(approx, exact)]))


def _time_single(index: ItemIndex, queries: np.ndarray, n: int, repeats: int) -> float:
    """Median ms of one query at a time (the serving case at batch 1)."""
    sample = queries[:repeats]
    rows = iter(sample)  # a new query each call
    return median_ms(lambda: search_index(index, next(rows)[None, :], n), len(sample))


@dataclass
class TuneResult:
    params: dict[str, Any]
    recall: float  # recall@N against exact search on the tuning queries
    n: int
    search_ms: float  # median single-query latency with `params`
    exact_ms: float  # median single-query latency of exact search
    batch_ms_per_query: float  # batched (all tuning queries at once) ms per query
    tried: list[dict[str, Any]] = field(default_factory=list)
    reached_target: bool = True


def tune(
    index: ItemIndex,
    vectors: np.ndarray,
    queries: np.ndarray,
    *,
    n: int = 200,
    target_recall: float = 0.98,
    timing_queries: int = 200,
) -> TuneResult:
    """Smallest nprobe / efSearch whose recall@n on `queries` reaches `target_recall`.

    Doubling finds the first setting that reaches the target, then bisection narrows it to
    within ~6% of the smallest one that does.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = min(n, index.ntotal)
    exact = ItemIndex(faiss.IndexFlatIP(vectors.shape[1]))
    exact.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    _, truth = search_index(exact, queries, n)
    exact_ms = _time_single(exact, queries, n, timing_queries)
    tried = []

    def recall(params: dict[str, Any]) -> float:
        index.set_params(params)
        _, got = search_index(index, queries, n)
        r = recall_at(got, truth)
        tried.append({**params, "recall": r})
        log.debug("%s recall@%d %.4f", params, n, r)
        return r

    chosen = None
    grid = candidate_params(index.index)
    for i, params in enumerate(grid):
        r = recall(params)
        if r >= target_recall:
            chosen = (params, r)
            if i > 0 and len(params) == 1:  # bisect between the last miss and this hit
                (key, hi), lo = next(iter(params.items())), grid[i - 1][next(iter(params))]
                while hi - lo > max(1, lo // 16):  # ~6% steps: finer costs more passes than it saves
                    mid = (lo + hi) // 2
                    r_mid = recall({key: mid})
                    if r_mid >= target_recall:
                        hi, chosen = mid, ({key: mid}, r_mid)
                    else:
                        lo = mid
            break
    reached = chosen is not None
    if chosen is None:  # keep the most accurate setting and say the target was missed
        best = max(tried, key=lambda t: t["recall"])
        chosen = ({k: v for k, v in best.items() if k != "recall"}, best["recall"])
        log.warning("recall@%d target %.3f not reached; best %.4f with %s", n, target_recall, chosen[1], chosen[0])
    params, r = chosen
    index.set_params(params)
    search_ms = _time_single(index, queries, n, timing_queries)
    t = time.perf_counter()
    search_index(index, queries, n)
    batch_ms = (time.perf_counter() - t) * 1e3 / max(len(queries), 1)
    return TuneResult(params, r, n, search_ms, exact_ms, batch_ms, tried, reached)
