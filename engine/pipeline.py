"""The two-stage recommender of one model version: encoder → FAISS top-N → ranker → top-k.

The server, the offline retrieval job and `attnrec evaluate` all call `Pipeline.recommend`,
so online and offline answers for the same version are the same computation.
Everything here works in catalogue rows (0..n_items-1); external ids are the callers' business.

All request-time compute lives here (padding, the encoder and ranker sessions' `run`, the FAISS
search with exclusion, top-k), and so do the batcher's run functions (`run_encoder`,
`run_ranker`, `run_recommend`): a request's path ends in this file without calling back into
engine/encoder.py, engine/ranker.py or engine/index.py, which make sessions and indexes at load time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Container, Sequence

import numpy as np
import onnxruntime as ort

from .encoder import OnnxEncoder
from .features import FeatureTables, load_features
from .index import ItemIndex, RowMask, load_index
from .ranker import OnnxRanker, user_feature_codes
from .repository import DEFAULT_CANDIDATES, ArtifactError, Manifest, open_version
from .rerank import Reranker, strengths

if TYPE_CHECKING:
    import faiss


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions and the index are set up on this host (flags of `attnrec serve` and friends)."""

    providers: tuple[str, ...] | None = None  # None = TensorRT → CUDA → CPU, whatever the build has
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: str = "all"
    faiss_gpu: bool | None = None  # None = on the GPU when FAISS has a GPU build and a device
    allow_spinning: bool = True  # onnxruntime's worker threads busy-wait between ops
    faiss_threads: int = 0  # FAISS's OpenMP threads in every thread that searches; 0 = FAISS's default (all cores)
    io_binding: str = "auto"  # onnxruntime IO binding: auto (on a GPU provider), on, off (engine/encoder.py)

    def session_kwargs(self) -> dict:
        return {
            "providers": self.providers,
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "graph_optimization": self.graph_optimization,
            "allow_spinning": self.allow_spinning,
            "io_binding": self.io_binding,
        }


def use_faiss_threads(n: int) -> None:
    """FAISS's OpenMP thread count, in the calling thread: libgomp keeps it per thread, so setting it
    once at load left every batch thread at all cores, each search then waking (and spin-waiting)
    OpenMP threads that the event loop and the other requests needed on a small host. 0: FAISS's default."""
    if n > 0:
        import faiss

        if faiss.omp_get_max_threads() != n:
            faiss.omp_set_num_threads(n)


def pad_histories(histories: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """(B, L) int64 tokens, left-padded with 0 to the longest history in the batch (≤ max_len).

    Histories hold tokens (catalogue row + 1). Longer ones keep their most recent max_len
    items. Left padding keeps every sequence's last item in the last column, where the
    encoder reads the query vector.
    """
    length = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    out = np.zeros((len(histories), length), dtype=np.int64)
    for i, h in enumerate(histories):
        h = h[-length:]
        if len(h):
            out[i, length - len(h) :] = h
    return out


def run_session(
    session: "ort.InferenceSession", feeds: dict, outputs: list[str], device: str | None, keep: Container[str] = ()
) -> list:
    """The named outputs of one run. With `device` (IO binding, engine/encoder.py `binding_device`):
    host arrays are bound as inputs (copied to the device once) and OrtValues already there as they are;
    outputs in `keep` stay on the device as OrtValues, for the next model to read; the rest come back
    as numpy arrays. Without: `session.run` (an OrtValue among the feeds is brought to the host)."""
    if device is None:
        host = {k: v.numpy() if isinstance(v, ort.OrtValue) else v for k, v in feeds.items()}
        return session.run(outputs, host)
    binding = session.io_binding()
    for name, x in feeds.items():
        if isinstance(x, ort.OrtValue):
            binding.bind_ortvalue_input(name, x)
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(x))
    for name in outputs:
        binding.bind_output(name, device if name in keep else "cpu")
    session.run_with_iobinding(binding)
    return [v if name in keep else v.numpy() for name, v in zip(outputs, binding.get_outputs())]


def encode(encoder: OnnxEncoder, tokens: np.ndarray, keep: Container[str] = ()) -> dict:
    """Padded tokens (B, L) → every encoder output by name: `query` (B, D) [, `hidden` (B, L, D)];
    those in `keep` stay on the device (OrtValues) when the encoder is IO-bound."""
    names = encoder.output_names
    return dict(zip(names, run_session(encoder.session, {encoder.input_name: tokens}, names, encoder.binding, keep)))


def encode_histories(encoder: OnnxEncoder, histories: Sequence[np.ndarray]) -> np.ndarray:
    """Histories of tokens (catalogue row + 1), any lengths → (B, D) query vectors."""
    tokens = pad_histories(histories, encoder.max_len)
    return run_session(encoder.session, {encoder.input_name: tokens}, ["query"], encoder.binding)[0]


def score(ranker: OnnxRanker, feeds: dict) -> np.ndarray:
    """(B, N) ranker scores; `feeds` may hold more inputs than the graph reads (and `hidden` as an OrtValue),
    and may leave out (or set to None) its optional ones (engine/ranker.py), which are then unknown."""
    sizes = {"batch": len(feeds["candidates"]), "length": feeds["history"].shape[1]}
    x = {}
    for name in ranker.input_names:
        if feeds.get(name) is not None:
            x[name] = feeds[name]
        elif name in ranker.unknown_shapes:  # engine/ranker.py's unknown value, without a call into it
            x[name] = np.zeros(tuple(sizes.get(d, d) for d in ranker.unknown_shapes[name]), dtype=np.int64)
        else:
            raise ValueError(f"ranker input {name!r} is required")
    return run_session(ranker.session, x, ["scores"], ranker.binding)[0]


def search_index(
    index: ItemIndex, queries: np.ndarray, k: int, params: "faiss.SearchParameters | None" = None
) -> tuple[np.ndarray, np.ndarray]:
    """(B, D) queries → (scores, rows), each (B, k), best first, in inner-product scores; missing slots are -1.
    `params`: FAISS search parameters (a RowMask's, to search only its rows)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if index.mips_max_norm2 is None:
        return index.index.search(q, k, params=params)
    dist, rows = index.index.search(np.hstack([q, np.zeros((len(q), 1), np.float32)]), k, params=params)
    scores = (np.einsum("ij,ij->i", q, q)[:, None] + index.mips_max_norm2 - dist) / 2
    return scores.astype(np.float32), rows


def search(
    index: ItemIndex,
    queries: np.ndarray,
    k: int,
    exclude: Sequence[np.ndarray] | None = None,
    masks: Sequence[RowMask | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows per query, never a row in that query's `exclude` (e.g. the history) and, with
    `masks`, only rows its mask allows (None: any row).

    FAISS is asked for k plus the longest exclusion list, then excluded rows are dropped, so
    every query still gets k results when the catalogue allows. Masks are applied inside the
    search (a FAISS ID selector): queries sharing a mask are searched together. Missing slots are -1 / -inf.
    """
    if masks is None or all(m is None for m in masks):
        return _search(index, queries, k, exclude, None)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    groups: dict[int, list[int]] = {}
    for i, m in enumerate(masks):
        groups.setdefault(id(m), []).append(i)
    for at in groups.values():
        sub = np.array(at)
        part = None if exclude is None else [exclude[i] for i in at]
        scores[sub], rows[sub] = _search(index, queries[sub], k, part, masks[at[0]])
    return scores, rows


def _search(
    index: ItemIndex, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None, mask: RowMask | None
) -> tuple[np.ndarray, np.ndarray]:
    ntotal = index.index.ntotal
    extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
    drop_disallowed = False
    if mask is None:
        fetch = min(k + extra, ntotal)
        scores, rows = search_index(index, queries, fetch)
    elif (params := mask.params(index)) is not None:
        fetch = min(k + extra, mask.count)
        if fetch == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        scores, rows = search_index(index, queries, fetch, params)
        # An approximate index finds fewer allowed rows than asked when the filter leaves few in the
        # lists it probes: search those queries again over every list.
        short = (rows >= 0).sum(axis=1) < fetch
        if short.any():
            scores[short], rows[short] = search_index(index, queries[short], fetch, mask.params(index, exhaustive=True))
    else:  # the index cannot filter inside the search (GPU): fetch past every disallowed row, drop them
        fetch = min(k + extra + ntotal - mask.count, index.max_k)
        scores, rows = search_index(index, queries, fetch)
        drop_disallowed = True
    if not extra and not drop_disallowed:
        return _pad(scores[:, :k], rows[:, :k], k)
    keep = rows >= 0
    if drop_disallowed:
        keep &= mask.allowed[np.maximum(rows, 0)]
    if extra:
        # Vectorised over the batch: key = query * (ntotal + 1) + row, one sorted lookup for all
        # queries (searchsorted: np.isin's set machinery costs more than the search at batch 1).
        width = ntotal + 1
        q_of = np.repeat(np.arange(len(rows), dtype=np.int64), [len(e) for e in exclude])
        excluded = np.sort(q_of * width + np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude]))
        found_keys = np.arange(len(rows), dtype=np.int64)[:, None] * width + rows
        at = np.minimum(np.searchsorted(excluded, found_keys), len(excluded) - 1)
        keep &= excluded[at] != found_keys
    # Kept entries first, in their score order (a stable sort of the "dropped" flag).
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, order, axis=1)
    out_r = np.where(kept, np.take_along_axis(rows, order, axis=1), -1)
    out_s = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf).astype(np.float32)
    return _pad(out_s, out_r, k)


def _pad(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen to k columns with empty slots (-inf, -1) when fewer were fetched (a small catalogue or filter)."""
    if rows.shape[1] < k:
        pad = k - rows.shape[1]
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return scores, rows


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
        features: FeatureTables = FeatureTables(),
        faiss_threads: int = 0,
        item_vectors: np.ndarray | None = None,
    ) -> None:
        """`item_ids`/`popularity`: per catalogue row; `n_candidates`: stage one's top-N for the ranker;
        `features`: the version's side features (the ranker's user features come from there);
        `faiss_threads`: FAISS's OpenMP threads in whichever thread searches (0: its default);
        `item_vectors`: the catalogue's embeddings, which the diversity re-rank reads (engine/rerank.py)."""
        self.encoder, self.index, self.ranker, self.path, self.manifest = encoder, index, ranker, path, manifest
        self.features = features
        self.faiss_threads = faiss_threads
        # An IO-bound ranker reads the encoder's hidden states where they are (on the GPU): no round trip;
        # decided here, once, so that a request never calls back into engine/ranker.py for it.
        self._keep_hidden = ("hidden",) if ranker is not None and ranker.needs_hidden and ranker.binding else ()
        self.item_ids, self.popularity = np.asarray(item_ids), np.asarray(popularity)
        self.reranker = Reranker(self.popularity, item_vectors)
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
        use_faiss_threads(options.faiss_threads)  # this thread; the searching ones set it in `recommend`
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
            # Only a ranker that reads user features needs the tables at request time.
            features=load_features(path, manifest)
            if ranker is not None and ranker.reads_user_features
            else FeatureTables(),
            faiss_threads=options.faiss_threads,
            # A memory map: the re-rank reads only its candidates' rows (verified with the other files).
            item_vectors=np.load(path / files.item_embeddings.path, mmap_mode="r"),
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
        masks: Sequence[RowMask | None] | None = None,
        user_ids: Sequence[str] | None = None,
        diversity: float | Sequence[float] | np.ndarray | None = None,
        popularity_calibration: float | Sequence[float] | np.ndarray | None = None,
        history_times: Sequence[np.ndarray | None] | None = None,
        request_times: Sequence[int] | None = None,
    ) -> Recommendations:
        """Top-k rows per history (rows, most recent last), never a row of the history or of `exclude`,
        and, with `masks`, only rows the history's mask allows (business filters, availability).

        With a ranker (and `rank`), FAISS fetches `n_candidates` (default: the manifest's) and the
        ranker re-orders them; without, FAISS's top-k is the answer. Empty histories get the most
        popular items. `user_ids` (external, one per history) give a ranker that reads user features
        their values; without them (or for an id the version lacks) the users are unknown.
        `diversity` / `popularity_calibration` (0..1, one for all or one per history; default 0)
        re-rank the ranker's order (or FAISS's n_candidates, default 200, without a ranker) into the
        top-k (engine/rerank.py), within the masks; 0 leaves the answer as it was.
        `history_times` (int seconds per history item, ≤ 0 unknown; None for a history without) and
        `request_times` (seconds per history, ≤ 0 unknown) give a ranker that reads time its inputs;
        without them the time is unknown (engine/ranker.py).
        """
        t = {"encoder": 0.0, "search": 0.0, "ranker": 0.0}
        diversity = strengths(diversity, len(histories), "diversity")
        popularity_calibration = strengths(popularity_calibration, len(histories), "popularity_calibration")
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
        for i in (i for i, h in enumerate(histories) if not len(h)):  # (np.setdiff1d costs ~20 µs a batch)
            rows[i], scores[i] = self.popular(k, seen[i], None if masks is None else masks[i])
        if not len(active):
            return Recommendations(rows, scores, t)

        t0 = time.perf_counter()
        use_ranker = rank and self.ranker is not None
        tokens = pad_histories([histories[i][-self.max_len :] + 1 for i in active], self.max_len)
        outs = encode(self.encoder, tokens, self._keep_hidden if use_ranker else ())
        t1 = time.perf_counter()
        rerank = bool(((diversity[active] > 0) | (popularity_calibration[active] > 0)).any())
        if use_ranker:
            n = max(k, n_candidates or self.n_candidates)
        else:  # the re-rank picks the top-k from a pool
            n = max(k, n_candidates or self.n_candidates or DEFAULT_CANDIDATES) if rerank else k
        use_faiss_threads(self.faiss_threads)
        cand_scores, cand_rows = search(
            self.index,
            outs["query"],
            n,
            exclude=[seen[i] for i in active],
            masks=None if masks is None else [masks[i] for i in active],
        )
        t2 = time.perf_counter()
        t["encoder"], t["search"] = t1 - t0, t2 - t1
        if use_ranker:
            feeds = {
                "history": tokens,
                "hidden": outs.get("hidden"),
                "candidates": np.where(cand_rows >= 0, cand_rows + 1, 0),
                "candidate_scores": np.where(cand_rows >= 0, cand_scores, 0.0).astype(np.float32),
            }
            if user_ids is not None and self.ranker.reads_user_features and self.features.user is not None:
                feeds["user_features"] = user_feature_codes(self.features, [str(user_ids[i]) for i in active])
            if request_times is not None and self.ranker.reads_time:
                if history_times is not None and any(
                    x is not None and len(x) != len(histories[i]) for i, x in enumerate(history_times)
                ):
                    raise ValueError("history_times must give one time per history item")
                stamps = [
                    np.zeros(len(histories[i]), np.int64)
                    if history_times is None or history_times[i] is None
                    # the same most recent max_len positions as the tokens
                    else np.asarray(history_times[i], dtype=np.int64)[-self.max_len :]
                    for i in active
                ]
                feeds["history_timestamps"] = pad_histories(stamps, self.max_len)
                feeds["request_time"] = np.array([[request_times[i]] for i in active], dtype=np.int64)
            ranked = np.where(cand_rows >= 0, score(self.ranker, feeds), -np.inf).astype(np.float32)
            order = np.argsort(-ranked, axis=1, kind="stable")[:, : None if rerank else k]
            cand_rows = np.take_along_axis(cand_rows, order, axis=1)
            cand_scores = np.take_along_axis(ranked, order, axis=1)
            t["ranker"] = time.perf_counter() - t2
        if rerank:
            t3 = time.perf_counter()
            cand_rows, cand_scores = self.reranker.rerank(
                cand_rows,
                cand_scores,
                [histories[i] for i in active],
                k,
                diversity[active],
                popularity_calibration[active],
            )
            t["rerank"] = time.perf_counter() - t3
        width = min(k, cand_rows.shape[1])
        rows[active, :width] = cand_rows[:, :width]
        scores[active, :width] = cand_scores[:, :width]
        return Recommendations(rows, scores, t)

    def popular(
        self, k: int, exclude: np.ndarray | None = None, mask: RowMask | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k most popular rows (training interaction counts as scores), `exclude` and rows `mask`
        does not allow left out."""
        top = self.popular_rows
        if mask is not None:
            top = top[mask.allowed[top]]
        if exclude is not None and len(exclude):
            top = top[~np.isin(top, exclude)]
        top = top[:k]
        rows = np.full(k, -1, dtype=np.int64)
        scores = np.full(k, -np.inf, dtype=np.float32)
        rows[: len(top)], scores[: len(top)] = top, self.popularity[top]
        return rows, scores


# ── the batcher's run functions: batched requests in, one result per request out ─────────────────
@dataclass
class BatchOutput:
    """A run function's answer to the batcher: one value per request, and where the time went."""

    values: list
    input_s: float  # preparing the batch's input tensors (Triton's compute_input)
    output_s: float  # splitting the outputs per request (Triton's compute_output)
    stages: dict[str, float]  # request-path stage → seconds, observed once per batch


def run_encoder(p: Pipeline, items: Sequence[np.ndarray]) -> BatchOutput:
    """Token matrices (b, L) of several requests → per request {"query": (b, D)[, "hidden": (b, L, D)]}."""
    t0 = time.perf_counter()
    rows = [r[r != 0] for tokens in items for r in tokens]  # re-padded to the batch's longest
    tokens = pad_histories(rows, p.max_len)
    t1 = time.perf_counter()
    outs = encode(p.encoder, tokens)
    t2 = time.perf_counter()
    results, start = [], 0
    for tokens in items:
        b, length = tokens.shape
        part = {"query": outs["query"][start : start + b]}
        if "hidden" in outs:
            hidden = outs["hidden"][start : start + b, -length:] if length else outs["hidden"][start : start + b, :0]
            if hidden.shape[1] < length:  # the batch was shorter than this request's padding
                hidden = np.pad(hidden, ((0, 0), (length - hidden.shape[1], 0), (0, 0)))
            part["hidden"] = hidden
        results.append(part)
        start += b
    return BatchOutput(results, t1 - t0, time.perf_counter() - t2, {"encoder": t2 - t0})


def run_ranker(p: Pipeline, items: Sequence[dict[str, np.ndarray]]) -> BatchOutput:
    """The ranker's feeds of several requests → per request its (b, N) scores."""
    t0 = time.perf_counter()
    feeds = {}
    for name in items[0]:
        parts = [it[name] for it in items]
        width = max(part.shape[1] for part in parts)
        if name in ("history", "hidden", "history_timestamps"):  # left-padded: pad on the left to the longest
            parts = [np.pad(x, [(0, 0), (width - x.shape[1], 0)] + [(0, 0)] * (x.ndim - 2)) for x in parts]
        else:  # candidate slots: pad on the right with empty slots (token 0, score 0)
            parts = [np.pad(x, ((0, 0), (0, width - x.shape[1]))) for x in parts]
        feeds[name] = np.concatenate(parts)
    t1 = time.perf_counter()
    scores = score(p.ranker, feeds)
    t2 = time.perf_counter()
    results, start = [], 0
    for it in items:
        b, n = it["candidates"].shape
        results.append(scores[start : start + b, :n])
        start += b
    return BatchOutput(results, t1 - t0, time.perf_counter() - t2, {"ranker": t2 - t0})


def run_recommend(group: tuple[Pipeline, int], items: Sequence) -> BatchOutput:
    """Queries (rows, exclude, k, mask, user_id, diversity, calibration, times, request_time) of several
    users → per user (rows, scores, timings), top k first. `group` is the version's pipeline and the
    candidate count its batch shares."""
    p, n = group
    t0 = time.perf_counter()
    histories, exclude, k = [q.rows for q in items], [q.exclude for q in items], max(q.k for q in items)
    masks = [q.mask for q in items] if any(q.mask is not None for q in items) else None
    users = [q.user_id for q in items] if any(q.user_id for q in items) else None
    diversity = np.array([q.diversity for q in items])
    calibration = np.array([q.popularity_calibration for q in items])
    times = {}
    if any(q.request_time > 0 for q in items):
        times = {"history_times": [q.times for q in items], "request_times": [q.request_time for q in items]}
    t1 = time.perf_counter()
    recs = p.recommend(
        histories,
        k,
        exclude=exclude,
        n_candidates=n or None,
        masks=masks,
        user_ids=users,
        diversity=diversity,
        popularity_calibration=calibration,
        **times,
    )
    t2 = time.perf_counter()
    values = [(recs.rows[i, : q.k], recs.scores[i, : q.k], recs.timings) for i, q in enumerate(items)]
    stages = {
        stage: recs.timings[stage] for stage in ("encoder", "search", "ranker", "rerank") if recs.timings.get(stage)
    }
    return BatchOutput(values, t1 - t0, time.perf_counter() - t2, stages)
