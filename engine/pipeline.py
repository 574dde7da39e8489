"""The two-stage recommender of one model version: encoder → FAISS top-N → ranker → top-k.

The server, the offline retrieval job and `attnrec evaluate` all call `Pipeline.recommend`,
so online and offline answers for the same version are the same computation.
Everything here works in catalogue rows (0..n_items-1); external ids are the callers' business.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .encoder import OnnxEncoder, pad_histories
from .index import ItemIndex, load_index, search
from .ranker import OnnxRanker
from .repository import ArtifactError, Manifest, open_version


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions and the index are set up on this host (flags of `attnrec serve` and friends)."""

    providers: tuple[str, ...] | None = None  # None = TensorRT → CUDA → CPU, whatever the build has
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: str = "all"
    faiss_gpu: bool | None = None  # None = on the GPU when FAISS has a GPU build and a device
    allow_spinning: bool = True  # onnxruntime's worker threads busy-wait between ops
    faiss_threads: int = 0  # FAISS's OpenMP threads (process-wide); 0 = FAISS's default (all cores)

    def session_kwargs(self) -> dict:
        return {
            "providers": self.providers,
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "graph_optimization": self.graph_optimization,
            "allow_spinning": self.allow_spinning,
        }


@dataclass
class Recommendations:
    """rows/scores (B, k), best first; -1 / -inf where the catalogue ran out. Timings in seconds."""

    rows: np.ndarray
    scores: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """One model version's stages, immutable once built, so threads may share it.

    Built from in-memory parts (what `attnrec export` evaluates before publishing) or by `load`
    from a published version, which also keeps that version's `path` and `manifest`.
    """

    def __init__(
        self,
        encoder: OnnxEncoder,
        index: ItemIndex,
        item_ids: np.ndarray,
        popularity: np.ndarray,
        ranker: OnnxRanker | None = None,
        *,
        n_candidates: int = 0,
        path: Path | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        """`item_ids`/`popularity`: per catalogue row; `n_candidates`: stage one's top-N for the ranker."""
        self.encoder, self.index, self.ranker, self.path, self.manifest = encoder, index, ranker, path, manifest
        self.item_ids, self.popularity = np.asarray(item_ids), np.asarray(popularity)
        # Most popular first; the fallback for histories with no known item.
        self.popular_rows = np.argsort(-self.popularity, kind="stable")
        self.n_candidates = n_candidates if ranker is not None else 0
        if ranker is not None and n_candidates < 1:
            raise ValueError(f"a ranker needs n_candidates >= 1, got {n_candidates}")
        if ranker is not None and ranker.needs_hidden and "hidden" not in encoder.output_names:
            raise ArtifactError(f"{path or 'pipeline'}: the ranker reads `hidden` but the encoder does not output it")

    @classmethod
    def load(cls, path: Path | str, options: RuntimeOptions = RuntimeOptions(), *, verify: bool = True) -> "Pipeline":
        path = Path(path)
        manifest = open_version(path, verify=verify)
        if options.faiss_threads > 0:
            import faiss

            faiss.omp_set_num_threads(options.faiss_threads)
        kw = options.session_kwargs()
        files = manifest.files
        ranker = None if files.ranker is None else OnnxRanker(path / files.ranker.path, **kw)
        return cls(
            OnnxEncoder(path / files.encoder.path, manifest.model.max_len, **kw),
            load_index(
                path / files.index.path,
                manifest.index.params,
                mips_max_norm2=manifest.index.mips_max_norm2,
                use_gpu=options.faiss_gpu,
            ),
            np.asarray(json.loads((path / files.item_ids.path).read_text())),
            np.load(path / files.item_popularity.path),
            ranker,
            n_candidates=manifest.ranker.n_candidates if manifest.ranker is not None else 0,
            path=path,
            manifest=manifest,
        )

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def max_len(self) -> int:
        return self.encoder.max_len

    def recommend(
        self,
        histories: Sequence[np.ndarray],
        k: int,
        *,
        exclude: Sequence[np.ndarray] | None = None,
        n_candidates: int | None = None,
        rank: bool = True,
    ) -> Recommendations:
        """Top-k rows per history (rows, most recent last), never a row of the history or of `exclude`.

        With a ranker (and `rank`), FAISS fetches `n_candidates` (default: the manifest's) and the
        ranker re-orders them; without, FAISS's top-k is the answer. Empty histories get the most
        popular items.
        """
        t = {"encoder": 0.0, "search": 0.0, "ranker": 0.0}
        # Every item of the history is excluded; only the most recent max_len are encoded.
        histories = [np.asarray(h, dtype=np.int64) for h in histories]
        # (the server always passes `exclude`, mostly empty: no set union for those)
        seen = [
            h if exclude is None or not len(exclude[i]) else np.union1d(h, np.asarray(exclude[i], np.int64))
            for i, h in enumerate(histories)
        ]
        rows = np.full((len(histories), k), -1, dtype=np.int64)
        scores = np.full((len(histories), k), -np.inf, dtype=np.float32)
        active = np.array([i for i, h in enumerate(histories) if len(h)], dtype=np.int64)
        for i in np.setdiff1d(np.arange(len(histories)), active):
            rows[i], scores[i] = self.popular(k, seen[i])
        if not len(active):
            return Recommendations(rows, scores, t)

        t0 = time.perf_counter()
        tokens = pad_histories([histories[i][-self.max_len :] + 1 for i in active], self.max_len)
        outs = self.encoder.run(tokens)
        t1 = time.perf_counter()
        use_ranker = rank and self.ranker is not None
        n = max(k, n_candidates or self.n_candidates) if use_ranker else k
        cand_scores, cand_rows = search(self.index, outs["query"], n, exclude=[seen[i] for i in active])
        t2 = time.perf_counter()
        t["encoder"], t["search"] = t1 - t0, t2 - t1
        if use_ranker:
            feeds = {
                "history": tokens,
                "hidden": outs.get("hidden"),
                "candidates": np.where(cand_rows >= 0, cand_rows + 1, 0),
                "candidate_scores": np.where(cand_rows >= 0, cand_scores, 0.0).astype(np.float32),
            }
            ranked = np.where(cand_rows >= 0, self.ranker.score(feeds), -np.inf).astype(np.float32)
            order = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
            cand_rows = np.take_along_axis(cand_rows, order, axis=1)
            cand_scores = np.take_along_axis(ranked, order, axis=1)
            t["ranker"] = time.perf_counter() - t2
        width = min(k, cand_rows.shape[1])
        rows[active, :width] = cand_rows[:, :width]
        scores[active, :width] = cand_scores[:, :width]
        return Recommendations(rows, scores, t)

    def popular(self, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k most popular rows (training interaction counts as scores), `exclude` left out."""
        top = self.popular_rows
        if exclude is not None and len(exclude):
            top = top[~np.isin(top, exclude)]
        top = top[:k]
        rows = np.full(k, -1, dtype=np.int64)
        scores = np.full(k, -np.inf, dtype=np.float32)
        rows[: len(top)], scores[: len(top)] = top, self.popularity[top]
        return rows, scores
