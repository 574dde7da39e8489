"""Evaluating a model version from the repository under the quality protocol of docs/architecture.md (no torch).

What is measured is what is served: the version's ONNX encoder, FAISS index and ranker, seen
items excluded. Three rows on the same users: (a) `exact`, full ranking of the catalogue by
the encoder's query; (b) `ann`, stage one as served (FAISS top-k); (c) `ranked`, FAISS top-N
re-ordered by the ranker. (b) and (c) call `Pipeline.recommend`, so offline and online answers
are the same computation. A popularity ranking is reported beside them so accuracy is never
read alone.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from attnrec.engine.pipeline import Pipeline, RuntimeOptions, encode_histories
from attnrec.engine.repository import (
    DEFAULT_CANDIDATES,
    EvalProtocol,
    Manifest,
    MetricsSection,
    PipelineMetrics,
    resolve_version,
)

from .data.sequences import EvalSet, LeaveOneOut
from .ranking_metrics import RankingReport, evaluate_full_ranking

log = logging.getLogger(__name__)

KS = (10, 20)


def protocol(split: LeaveOneOut, evaluated: int) -> dict[str, Any]:
    return {
        "name": "leave-one-out, full ranking",
        "split": "per user by time: last interaction = test target, second to last = validation target, "
        "the rest = training",
        "ranking": f"full ranking over all {split.data.n_items} catalogue items (no sampled negatives)",
        "exclude_seen": True,
        "min_interactions": 3,
        "users_evaluated": evaluated,
        "users_eligible": len(split.test),
        "users_train_only": split.n_train_only,
        "ks": list(KS),
    }


def _run(
    query: Callable, item_vectors: np.ndarray, es: EvalSet, popularity: np.ndarray, label: str, progress: bool
) -> dict[str, float]:
    hist = [es.history(j) for j in range(len(es))]
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(label, total=len(es))
        return evaluate_full_ranking(
            query, item_vectors, hist, es.targets, popularity, ks=KS, progress=lambda n: bar.advance(task, n)
        )


def evaluate_query_fn(
    query: Callable,
    item_vectors: np.ndarray,
    split: LeaveOneOut,
    *,
    max_users: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Test and validation metrics of a model (`query`: token histories → vectors) and of popularity.

    `max_users` > 0 evaluates a seeded sample of that many users (the same users for every
    row), for catalogues where full ranking of every user takes too long; 0 evaluates all.
    """
    pop = split.train_popularity()[1:].astype(np.float64)
    sets = {"test": split.test, "valid": split.valid}
    if 0 < max_users < len(split.test):
        idx = np.sort(np.random.default_rng(seed).choice(len(split.test), max_users, replace=False))
        sets = {w: es.subset(idx) for w, es in sets.items()}
    out: dict[str, Any] = {"protocol": protocol(split, len(sets["test"]))}
    for which, es in sets.items():
        out[which] = _run(query, item_vectors, es, pop, f"{which} ranking", progress)
    ones = lambda h: np.ones((len(h), 1), dtype=np.float32)  # noqa: E731 — every user scores by popularity
    pop_vec = pop.astype(np.float32)[:, None]
    out["baselines"] = {
        "popularity": {w: _run(ones, pop_vec, es, pop, f"{w} popularity", False) for w, es in sets.items()}
    }
    return out


def load_item_vectors(version_dir: Path, manifest: Manifest) -> np.ndarray:
    return np.load(version_dir / manifest.files.item_embeddings.path)


def load_item_ids(version_dir: Path, manifest: Manifest) -> np.ndarray:
    return np.asarray(json.loads((version_dir / manifest.files.item_ids.path).read_text()))


def _times(es: EvalSet, start: int, count: int) -> dict:
    """`Pipeline.recommend`'s time arguments for targets start..start+count: the history's seconds and, as
    the request time, the target's timestamp (as in training); {} when the log has no timestamps."""
    if es.hist_times is None:
        return {}
    stamps = [np.floor(es.history_times(j)).astype(np.int64) for j in range(start, start + count)]
    return {"history_times": stamps, "request_times": np.floor(es.target_times[start : start + count]).astype(np.int64)}


def _run_pipeline(
    pipeline: Pipeline, es: EvalSet, popularity: np.ndarray, n: int, label: str, progress: bool, user_ids: np.ndarray
) -> tuple[dict[str, float], dict[str, float] | None, float]:
    """(b) ann and (c) ranked metrics (None without a ranker), and stage one's recall@n, through
    `Pipeline.recommend` with each user's whole history excluded (the protocol's seen items), the
    users' external ids (`user_ids`, per internal user) for a ranker with user features, and the log's
    timestamps (the history's, the target's as the request time) for a ranker with time features."""
    k = max(*KS, 10)
    ann = RankingReport(KS, pipeline.n_items, popularity)
    ranked = RankingReport(KS, pipeline.n_items, popularity) if pipeline.ranker is not None else None
    found = 0
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(label, total=len(es))
        for s in range(0, len(es), 256):
            hist = [es.history(j) - 1 for j in range(s, min(s + 256, len(es)))]  # tokens → rows
            tgt = es.targets[s : s + len(hist)] - 1
            repeats = sum(int(np.any(h == t)) for h, t in zip(hist, tgt))
            ann.add(pipeline.recommend(hist, k, exclude=hist, rank=False).rows, tgt, hist, repeats)
            top_n = pipeline.recommend(hist, n, exclude=hist, rank=False).rows
            found += int((top_n == tgt[:, None]).any(axis=1).sum())
            if ranked is not None:
                users = [str(x) for x in user_ids[es.users[s : s + len(hist)]]]
                times = _times(es, s, len(hist))
                rec = pipeline.recommend(hist, k, exclude=hist, n_candidates=n, user_ids=users, **times)
                ranked.add(rec.rows, tgt, hist, repeats)
            bar.advance(task, len(hist))
    return ann.result(), ranked.result() if ranked else None, found / max(len(es), 1)


def evaluate_reranked(
    pipeline: Pipeline,
    es: EvalSet,
    popularity: np.ndarray,
    *,
    diversity: float = 0.0,
    popularity_calibration: float = 0.0,
    n_candidates: int | None = None,
    user_ids: np.ndarray | None = None,
) -> dict[str, float]:
    """The served answer's metrics (through `Pipeline.recommend`, whole history excluded) with the
    re-rank at these strengths (engine/rerank.py), plus ild@10: the top-10's intra-list diversity,
    1 - the mean pairwise cosine of the item embeddings (needs the pipeline's item vectors).
    `user_ids`: the users' external ids (per internal user), for a ranker with user features; the log's
    timestamps, as `attnrec evaluate` passes them, for a ranker with time features."""
    k = max(*KS, 10)
    report = RankingReport(KS, pipeline.n_items, popularity)
    vectors = pipeline.reranker.item_vectors
    ild_sum, ild_n = 0.0, 0
    for s in range(0, len(es), 256):
        hist = [es.history(j) - 1 for j in range(s, min(s + 256, len(es)))]  # tokens → rows
        tgt = es.targets[s : s + len(hist)] - 1
        repeats = sum(int(np.any(h == t)) for h, t in zip(hist, tgt))
        users = None if user_ids is None else [str(x) for x in user_ids[es.users[s : s + len(hist)]]]
        rec = pipeline.recommend(
            hist,
            k,
            exclude=hist,
            n_candidates=n_candidates,
            user_ids=users,
            diversity=diversity,
            popularity_calibration=popularity_calibration,
            **_times(es, s, len(hist)),
        )
        report.add(rec.rows, tgt, hist, repeats)
        if vectors is not None:
            for rows in rec.rows[:, :10]:
                rows = rows[rows >= 0]
                if len(rows) > 1:
                    u = np.asarray(vectors[rows], dtype=np.float64)
                    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
                    sim = u @ u.T
                    ild_sum += 1.0 - (sim.sum() - np.trace(sim)) / (len(rows) * (len(rows) - 1))
                    ild_n += 1
    out = report.result()
    if vectors is not None:
        out["ild@10"] = ild_sum / max(ild_n, 1)
    return out


def evaluate_pipeline(
    pipeline: Pipeline,
    item_vectors: np.ndarray,
    split: LeaveOneOut,
    *,
    n_candidates: int | None = None,
    max_users: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The three rows on the same users, popularity beside them. The top-level `test`/`valid`
    are the pipeline the server runs: ranked when the version has a ranker, else ann.
    `item_vectors`: the catalogue rows' embeddings, for (a) exact full ranking."""
    n = n_candidates or pipeline.n_candidates or DEFAULT_CANDIDATES
    result = evaluate_query_fn(
        functools.partial(encode_histories, pipeline.encoder),
        item_vectors,
        split,
        max_users=max_users,
        seed=seed,
        progress=progress,
    )
    pop = split.train_popularity()[1:].astype(np.float64)
    sets = {"test": split.test, "valid": split.valid}
    if 0 < max_users < len(split.test):  # the same sample evaluate_query_fn drew
        idx = np.sort(np.random.default_rng(seed).choice(len(split.test), max_users, replace=False))
        sets = {w: es.subset(idx) for w, es in sets.items()}
    rows: dict[str, Any] = {"exact": {w: result[w] for w in sets}, "ann": {}, "ranked": {}}
    recall: dict[str, float] = {}
    for which, es in sets.items():
        ann, ranked, recall[which] = _run_pipeline(
            pipeline, es, pop, n, f"{which} pipeline", progress, split.data.user_ids
        )
        rows["ann"][which] = ann
        if ranked is not None:
            rows["ranked"][which] = ranked
    if not rows["ranked"]:
        del rows["ranked"]
    served = rows.get("ranked", rows["ann"])
    result.update(test=served["test"], valid=served["valid"])
    result["pipeline"] = {
        **rows,
        "n_candidates": n,
        f"stage1_recall@{n}": recall,
        "served": "ranked" if "ranked" in rows else "ann",
    }
    return result


def metrics_section(result: dict[str, Any]) -> MetricsSection:
    """The manifest's `metrics` section from `evaluate_pipeline`'s report."""
    pipe = result["pipeline"]
    n = pipe["n_candidates"]
    return MetricsSection(
        test=result["test"],
        valid=result["valid"],
        baselines=result["baselines"],
        protocol=EvalProtocol(**{**result["protocol"], "ks": tuple(result["protocol"]["ks"])}),
        pipeline=PipelineMetrics(
            exact=pipe["exact"],
            ann=pipe["ann"],
            ranked=pipe.get("ranked"),
            n_candidates=n,
            stage1_recall=pipe[f"stage1_recall@{n}"],
            served=pipe["served"],
        ),
    )


def evaluate_version(
    version_dir: Path,
    manifest: Manifest,
    split: LeaveOneOut,
    *,
    threads: int = 0,
    max_users: int = 0,
    n_candidates: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    pipeline = Pipeline.load(version_dir, RuntimeOptions(intra_op_threads=threads))
    vectors = load_item_vectors(version_dir, manifest)
    result = evaluate_pipeline(
        pipeline, vectors, split, n_candidates=n_candidates, max_users=max_users, progress=progress
    )
    result["model"] = {"name": manifest.name, "version": manifest.version, "path": str(version_dir)}
    return result


def evaluate_repo(
    repo: Path,
    name: str,
    log_,
    *,
    version: int | None = None,
    threads: int = 0,
    max_users: int = 0,
    n_candidates: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the newest valid (or the given) version on an interaction log, same split as training."""
    from .data.sequences import build_sequences, leave_one_out

    version_dir, manifest = resolve_version(repo, name, version)
    split = leave_one_out(build_sequences(log_, item_vocab=load_item_ids(version_dir, manifest)))
    return evaluate_version(
        version_dir, manifest, split, threads=threads, max_users=max_users, n_candidates=n_candidates, progress=progress
    )


def _cells(m: dict[str, float], cols: list[str]) -> list[str]:
    """Table cells; "–" for a figure an older report lacks."""
    return [("–" if c not in m else f"{m[c]:.1f}" if c == "arp@10" else f"{m[c]:.4f}") for c in cols]


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    p = result["protocol"]
    table = Table(title=f"{p['name']} · {p['users_evaluated']} users · {p['ranking']} · seen items excluded")
    cols = ["hr@10", "ndcg@10", "hr@20", "ndcg@20", "coverage@10", "arp@10", "gini@10", "long_tail@10", "popcal_js@10"]
    table.add_column("model / split")
    for c in cols:
        table.add_column(c.upper() if c.startswith(("hr", "ndcg")) else c, justify="right")
    pipe = result.get("pipeline")
    labels = {"exact": "(a) exact", "ann": "(b) FAISS top-k", "ranked": "(c) FAISS top-N + ranker"}
    rows = [(labels[r], pipe[r]) for r in labels if r in pipe] if pipe else [("model", result)]
    rows += [(name, b) for name, b in result.get("baselines", {}).items()]
    for label, res in rows:
        for which in ("test", "valid"):
            m = res[which]
            table.add_row(f"{label} · {which}", *_cells(m, cols))
    console.print(table)
    if pipe:
        n = pipe["n_candidates"]
        recall = pipe[f"stage1_recall@{n}"]
        console.print(
            f"stage one recall@{n} (target among the N candidates): test {recall['test']:.4f}, "
            f"valid {recall['valid']:.4f}; served: {pipe['served']}"
        )
