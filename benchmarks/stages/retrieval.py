"""Retrieval stage: exact inner-product search vs the IVF / HNSW family, at 10^4–10^6 items, dim 64 and 128.

Indexes are built by attnrec.export.index_build.build_index (the MIPS→L2 reduction for approximate
ones) and searched through attnrec.engine.pipeline.search_index, exactly as the server does. Per index and
search setting: recall@N against exact search, single-query latency (p50/p99), batched
latency (a batch of BATCH queries per call) and queries/s, build time, index bytes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..report import Section, fmt_spread
from ..settings import Settings
from ..timing import measure

TITLE = "Retrieval stage: exact vs IVF / HNSW (FAISS), recall@N against exact"
RECALL_N = 200  # candidates per query: the pipeline's default top-N for the ranker
BATCH = 64  # queries per call in the batched measurement
HNSW_MAX_ITEMS = 100_000  # HNSW builds take minutes at 10^6 items on 2 cores: beyond the default budget


def grid(settings: Settings) -> dict:
    if settings.tiny:
        return dict(sizes=(2_000,), dims=(16,), nprobe=(2, 8), ef=(50,), queries=50)
    if settings.quick:
        return dict(sizes=(10_000,), dims=(64,), nprobe=(4, 32), ef=(RECALL_N,), queries=200)
    return dict(
        sizes=(10_000, 100_000, 1_000_000), dims=(64, 128), nprobe=(4, 16, 64, 256), ef=(200, 800), queries=1000
    )


def n_queries(n: int, g: dict) -> int:
    """Recall queries: fewer at 10^6 items, where each exact query costs ~10^8 FLOPs and a top-200 heap."""
    return g["queries"] if n <= 100_000 else max(g["queries"] // 4, 1)


def ivf_lists(n: int) -> int:
    """√n lists, rounded to a power of two (FAISS's usual guideline; export uses 4√n, tuned per model)."""
    return 2 ** round(math.log2(math.sqrt(n)))


LATENT_RANK = 16  # intrinsic dimension of the synthetic vectors


def synthetic_vectors(n: int, dim: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Item vectors with low intrinsic dimension and uneven norms, as trained embeddings have
    (popular items are longer), and unit queries from the same distribution.

    Directions: a random rank-16 projection of Gaussian factors plus isotropic noise (30% of
    the factors' scale), so there are no discrete clusters for IVF lists to line up with; norms:
    log-normal (σ 0.3). IVF needs about a quarter of its lists probed for recall@200 ≥ 0.9 at
    10^5 and 10^6 items, as on trained embeddings (export needed ~18% for 0.98 on a trained
    10^5-item model).
    """
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((LATENT_RANK, dim), dtype=np.float32)

    def directions(m: int) -> np.ndarray:
        x = rng.standard_normal((m, LATENT_RANK), dtype=np.float32) @ basis
        x += 0.3 * math.sqrt(LATENT_RANK) * rng.standard_normal((m, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    items = directions(n) * rng.lognormal(0.0, 0.3, size=(n, 1)).astype(np.float32)
    return np.ascontiguousarray(items), np.ascontiguousarray(directions(n_queries))


def trained_vectors(version: Path, n_queries: int, settings: Settings) -> tuple[np.ndarray, np.ndarray, str]:
    """A repository version's item embeddings, and its encoder's queries for histories drawn by popularity."""
    from attnrec.engine.encoder import OnnxEncoder
    from attnrec.engine.pipeline import encode_histories
    from attnrec.engine.repository import open_version

    manifest = open_version(version)
    items = np.load(version / manifest.files.item_embeddings.path).astype(np.float32)
    popularity = np.load(version / manifest.files.item_popularity.path).astype(np.float64) + 1.0
    encoder = OnnxEncoder(
        version / manifest.files.encoder.path,
        manifest.model.max_len,
        providers=settings.providers,
        intra_op_threads=settings.threads,
    )
    rng = np.random.default_rng(settings.seed)
    length = min(50, manifest.model.max_len)
    rows = rng.choice(len(items), size=(n_queries, length), p=popularity / popularity.sum())
    queries = np.concatenate([encode_histories(encoder, rows[i : i + 256] + 1) for i in range(0, n_queries, 256)])
    return np.ascontiguousarray(items), queries.astype(np.float32), f"trained ({manifest.name} v{manifest.version})"


def _single_thread(fn):
    """Run `fn` with FAISS on one OpenMP thread (see the note on threads in `run`)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return fn()
    finally:
        faiss.omp_set_num_threads(before)


def _index_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def run(settings: Settings, section: Section) -> None:
    import faiss

    from attnrec.engine.pipeline import search_index
    from attnrec.export.index_build import build_index, recall_at

    if settings.threads:
        faiss.omp_set_num_threads(settings.threads)
    g = grid(settings)
    datasets: list[tuple[str, int, int]] = [("synthetic", n, d) for n in g["sizes"] for d in g["dims"]]
    if settings.model_path is not None:
        datasets.insert(0, ("trained", 0, 0))
    section.data.update(
        recall_n=RECALL_N,
        batch=min(BATCH, g["queries"]),
        n_queries=g["queries"],
        faiss_threads=faiss.omp_get_max_threads(),
    )
    points: list[dict] = section.data.setdefault("points", [])  # filled as measured: a failure keeps them

    for kind, n, dim in datasets:
        if kind == "trained":
            items, queries, label = trained_vectors(Path(settings.model_path), g["queries"], settings)
            n, dim = items.shape
        else:
            items, queries = synthetic_vectors(n, dim, n_queries(n, g), settings.seed)
            label = "synthetic"
        k = min(RECALL_N, n)
        families = [("exact", "Flat", [{}]), ("IVF", f"IVF{ivf_lists(n)},Flat", [])]
        families[1][2].extend({"nprobe": p} for p in g["nprobe"] if p <= ivf_lists(n))
        if n <= HNSW_MAX_ITEMS:
            families.append(("HNSW", "HNSW32", [{"efSearch": ef} for ef in g["ef"]]))
        truth = None
        for family, factory, sweep in families:
            settings.progress("retrieval", f"{label} n={n:,} d={dim}: building {factory}")
            t = time.perf_counter()
            index = build_index(items, factory, seed=settings.seed)
            build_s = time.perf_counter() - t
            size = _index_bytes(index.index)
            for params in sweep:
                index.set_params(params)
                _, found = search_index(index, queries, k)
                if truth is None:  # the exact index comes first: its answers are the truth
                    truth = found
                recall = recall_at(found, truth)
                batch = queries[:BATCH]
                it = iter(range(1 << 62))

                def single(index=index, it=it):  # a different query each call, cycling
                    i = next(it) % len(queries)
                    return search_index(index, queries[i : i + 1], k)

                s = _single_thread(lambda: measure(single, settings.method))
                b = measure(
                    lambda index=index: search_index(index, batch, k), settings.method, items_per_call=len(batch)
                )
                if family == "exact" and "threads_check" not in section.data and faiss.omp_get_max_threads() > 1:
                    # Why single queries run on one thread: FAISS's OpenMP split of one query over
                    # the catalogue, measured here once, at the configured thread count.
                    many = measure(single, settings.method)
                    section.data["threads_check"] = {
                        "n": n,
                        "dim": dim,
                        "threads": faiss.omp_get_max_threads(),
                        "p50_ms": many["p50_ms"],
                        "p50_ms_1_thread": s["p50_ms"],
                    }
                p = dict(
                    data=label,
                    n=n,
                    dim=dim,
                    family=family,
                    factory=factory,
                    params=params,
                    setting=",".join(f"{a}={v}" for a, v in params.items()) or "exact",
                    recall=recall,
                    build_s=build_s,
                    index_bytes=size,
                    single=s,
                    batched=b,
                )
                for key in ("p50_ms", "p99_ms", "items_per_s"):
                    p[f"single_{key}"], p[f"single_{key}_spread"] = s[key], s[f"{key}_spread"]
                    p[f"batched_{key}"], p[f"batched_{key}_spread"] = b[key], b[f"{key}_spread"]
                points.append(p)
                settings.progress(
                    "retrieval",
                    f"{label} n={n:,} d={dim} {factory} {p['setting']}: recall@{k} {recall:.3f}  "
                    f"single p50 {s['p50_ms']:.3f} ms p99 {s['p99_ms']:.3f} ms  "
                    f"batch {len(batch)}: {b['items_per_s']:,.0f} q/s",
                )
            del index
    section.data["points"] = points
    _tables(section, points, settings)
    _figure(section, points)


def _tables(section: Section, points: list[dict], settings: Settings) -> None:
    section.note(
        f"recall@{RECALL_N} (or the catalogue size if smaller) against exact inner-product search over "
        f"{section.data['n_queries']} queries ({section.data['n_queries'] // 4} above 10^5 items); single = one "
        f"query per call, a different one each call; batched = {section.data['batch']} queries per call. "
        "Approximate indexes search the MIPS→L2 augmented vectors "
        "(engine/index.py), including that transform's cost."
    )
    section.note(
        "Synthetic vectors: rank-16 Gaussian factors plus noise, log-normal norms (benchmarks/stages/retrieval.py). "
        f"IVF lists = √n rounded to a power of two; HNSW32 (efConstruction 40) up to {HNSW_MAX_ITEMS:,} items. "
        f"FAISS threads: {section.data['faiss_threads']}."
    )
    tc = section.data.get("threads_check")
    section.note(
        "Single queries run with FAISS on 1 OpenMP thread, batches on all configured threads"
        + (
            f": one exact query over {tc['n']:,} × {tc['dim']} took p50 {tc['p50_ms']:.2f} ms on "
            f"{tc['threads']} threads vs {tc['p50_ms_1_thread']:.2f} ms on 1 (an OpenMP split of one query "
            "gains little and, on a busy machine, waits for a core that other work holds)."
            if tc
            else "."
        )
    )
    cols = ["data", "items", "dim", "index", "setting", f"recall@{RECALL_N}", "single p50 ms [min–max]"]
    cols += ["single p99 ms", f"batch {section.data['batch']} ms p50", "batched q/s [min–max]", "build s", "index MiB"]
    rows = [
        [
            p["data"],
            p["n"],
            p["dim"],
            p["factory"],
            p["setting"],
            round(p["recall"], 4),
            fmt_spread(p, "single_p50_ms"),
            p["single_p99_ms"],
            p["batched_p50_ms"],
            fmt_spread(p, "batched_items_per_s"),
            p["build_s"],
            p["index_bytes"] / 2**20,
        ]
        for p in points
    ]
    section.table("Search per index and setting (median of repeats)", cols, rows)


def _figure(section: Section, points: list[dict]) -> None:
    from .. import plots

    groups = sorted({(p["data"], p["n"], p["dim"]) for p in points})
    fig, axes = plots.new_figure(len(groups), cols=3, width=5.0, height=4.0)
    for ax, (data, n, dim) in zip(axes, groups):
        series = {}
        for factory in dict.fromkeys(p["factory"] for p in points if (p["data"], p["n"], p["dim"]) == (data, n, dim)):
            series[factory] = [
                p for p in points if (p["data"], p["n"], p["dim"], p["factory"]) == (data, n, dim, factory)
            ]
        plots.recall_vs_latency(
            ax, series, labels_key="setting", title=f"{data}, {n:,} items, dim {dim}", xlabel="single-query p50 (ms)"
        )
    fig.tight_layout()
    section.figure(fig)
