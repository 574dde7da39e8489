"""The models the servicers call: validation, external id ↔ row mapping, version pinning.

`ModelRegistry` holds the three `ServedModel`s of one repository model (engine/model_interface.py),
each in front of its own batcher whose run function is engine/pipeline.py's; they read the
version to serve from a `VersionSlot` that the loader (engine/loader.py) writes. Nothing here
calls the loader, so a request goes servicer → this file → engine/batcher.py → engine/pipeline.py.
KServe names (a wire contract):

    encoder   history INT64 (B, L) tokens (row + 1, left-padded with 0)
              → query FP32 (B, D) [+ hidden FP32 (B, L, D) when the encoder exports it]
    ranker    the ranker's own inputs (engine/ranker.py: history, hidden, candidates,
              candidate_scores[, user_features][, history_timestamps, request_time]: the last three
              optional) → scores FP32 (B, N); only when the version has a ranker
    pipeline  the whole request path with external item ids:
              history BYTES (B, H) item ids, oldest first, "" = padding (skipped)
              k INT64 (B, 1) optional (default 10)
              exclude BYTES (B, E) optional, "" = padding
              n_candidates INT64 (B, 1) optional (0: the model's default)
              user_id BYTES (B, 1) optional: the stored history goes before `history` ("" = none)
              history_timestamps INT64 (B, H) optional: Unix seconds of each `history` cell (0 =
                unknown; padding cells are ignored); the request time is Recommend's rule
              include_attributes BYTES (B, A) optional, "name=value", "" = padding
              exclude_attributes BYTES (B, A) optional, "name=value", "" = padding
              diversity FP32 (B, 1) optional, 0..1 (default 0: no diversity re-rank)
              popularity_calibration FP32 (B, 1) optional, 0..1 (default 0: no calibration re-rank)
              → items BYTES (B, K) best first, "" where the catalogue ran out (K = the largest k)
                scores FP32 (B, K), -inf where no item
                unknown_items INT64 (B, 1): history ids not in the catalogue (skipped)
                popularity_fallback BOOL (B, 1): no known history item, popular items answered
                stored_events INT64 (B, 1): events of the stored history used

Each row of a request is one batch row; rows of different requests are padded to the longest
in the batch (histories on the left, candidates on the right) and cut back for the reply, by
engine/pipeline.py's run functions.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import triton_metrics
from .batcher import Batcher, BatchSettings, Completed
from .errors import InvalidRequest, NotFound, Unavailable, shown
from .index import RowMask
from .item_filter import ItemAttributes, ItemFilters
from .model_interface import ServedModel, TensorSpec
from .model_stats import ModelStats, StatsStore
from .online_state import OnlineState
from .pipeline import Pipeline, run_encoder, run_ranker, run_recommend
from .repository import DEFAULT_CANDIDATES
from .rerank import strengths
from .telemetry import Telemetry


@dataclass(eq=False)  # compared by identity: the batcher groups requests by version
class LoadedVersion:
    """A loaded, warmed-up version and its external-id maps (engine/loader.py makes them)."""

    compute: Pipeline  # the version's sessions and index
    # Copied from `compute` at load: fields, so that a request reads them without a call into
    # engine/pipeline.py (its path reaches that file once, through the batcher).
    version: int
    n_items: int
    max_len: int
    item_keys: np.ndarray  # (n_items,) object: the external id of each row, as str
    rows_by_key: dict[str, int]
    id_type: str  # "int64" or "string"
    filters: ItemFilters | None = None  # the version's item attributes (None: it has none)

    def __post_init__(self) -> None:
        if self.filters is None:
            self.filters = ItemFilters(ItemAttributes(None, self.n_items), self.rows_by_key)


class VersionSlot:
    """What the loader writes and the models read: the version serving, the models unloaded through
    KServe's repository API, and whether the server is draining. Plain attributes, no calls."""

    def __init__(self) -> None:
        self.current: LoadedVersion | None = None
        self.unloaded: set[str] = set()
        self.draining = False


DEFAULT_K = 10


class _Counted:
    """One inference request of one model version, counted once when it ends: a success (its duration,
    queue wait and its batches' compute phases) or a failure (whatever the exception, cancellation too).
    A plain `with` block: entering and leaving it never awaits."""

    __slots__ = ("stats", "total", "start", "queue_ns", "input_ns", "infer_ns", "output_ns", "batches")

    def __init__(self, stats: ModelStats, total) -> None:
        self.stats, self.total = stats, total
        self.start = time.perf_counter_ns()
        self.queue_ns = self.input_ns = self.infer_ns = self.output_ns = 0
        self.batches: int | set[int] = 0

    def add(self, done: Completed) -> None:
        """A batch the request's rows ran in (a request split over rows is charged each batch once)."""
        self.queue_ns = max(self.queue_ns, int(done.queue_s * 1e9))
        if self.batches == 0:
            self.batches = done.batch
        else:
            if isinstance(self.batches, int):
                self.batches = {self.batches}
            if done.batch in self.batches:
                return
            self.batches.add(done.batch)
        self.input_ns += done.input_ns
        self.infer_ns += done.infer_ns
        self.output_ns += done.output_ns

    def __enter__(self) -> "_Counted":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        ns = time.perf_counter_ns() - self.start
        if kind is None:
            self.stats.record_success(ns, self.queue_ns, self.input_ns, self.infer_ns, self.output_ns)
            self.total.observe(ns / 1e9)  # attnrec_stage_seconds{stage="total"}: every protocol's requests
        else:
            self.stats.record_failure(ns)
        return False


class _Model:
    name = ""
    platform = "onnxruntime_onnx"
    run: Callable  # the batcher's run function: engine/pipeline.py's, never a method here

    def __init__(
        self,
        slot: VersionSlot,
        batching: BatchSettings,
        executor: ThreadPoolExecutor,
        telemetry: Telemetry,
        store: StatsStore,
    ):
        self.slot = slot
        self.max_batch_size = batching.max_batch_size
        # What ModelConfig's dynamic_batching reports.
        self.max_queue_delay_us = batching.max_queue_delay_us
        self.max_queue_size = batching.max_queue_size
        self.preferred_batch_sizes: tuple[int, ...] = ()
        self.store = store
        self._total = telemetry.stage_seconds.labels(self.name, "total")
        self.batcher = Batcher(self.name, self.run, batching, executor, telemetry)

    @property
    def version(self) -> str:
        v = self.slot.current
        return str(v.version) if v else ""

    @property
    def ready(self) -> bool:
        slot = self.slot
        return slot.current is not None and self.name not in slot.unloaded and not slot.draining

    @property
    def stats(self) -> ModelStats:
        """The serving version's counters (the whole server's, with --workers)."""
        v = self.slot.current
        return self.store.totals(self.name, str(v.version)) if v is not None else ModelStats(0)

    def _counted(self, v: LoadedVersion) -> _Counted:
        """Count one request on version `v` (enter it right after pinning `v`)."""
        return _Counted(self.store.block(self.name, str(v.version)), self._total)

    def record_rejected(self, duration_ns: int) -> None:
        """A request refused before it reached `infer` (a protocol's decoding of it failed): a failure
        of the serving version, as Triton counts a request it rejects."""
        v = self.slot.current
        if v is not None:
            self.store.block(self.name, str(v.version)).record_failure(duration_ns)

    def _pinned(self) -> LoadedVersion:
        """The version a new request runs on (kept for the whole request)."""
        v = self.slot.current
        if v is None or self.name in self.slot.unloaded:
            raise Unavailable(f"model {self.name!r} is not loaded")
        return v

    @staticmethod
    def _filter(out: dict[str, np.ndarray], wanted: list[str] | None, model: str) -> dict[str, np.ndarray]:
        if not wanted:
            return out
        unknown = [w for w in wanted if w not in out]
        if unknown:
            raise InvalidRequest(f"model {model!r} has no outputs {unknown} (it has {sorted(out)})")
        return {w: out[w] for w in wanted}


def _int_tensor(inputs: dict[str, np.ndarray], name: str, model: str, ndim: int) -> np.ndarray:
    if name not in inputs:
        raise InvalidRequest(f"model {model!r} needs input {name!r}")
    x = np.asarray(inputs[name])
    if x.dtype.kind not in "iu" or x.ndim != ndim:
        raise InvalidRequest(f"{model}: input {name!r} must be an INT64 tensor of rank {ndim}, got {x.dtype} {x.shape}")
    return x.astype(np.int64, copy=False)


def _check_tokens(tokens: np.ndarray, name: str, v: LoadedVersion, model: str) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() > v.n_items):
        raise InvalidRequest(f"{model}: {name!r} tokens must be in 0..{v.n_items} (row + 1; 0 = padding)")


# ── encoder ───────────────────────────────────────────────────────────────────────────────────
class EncoderModel(_Model):
    name = "encoder"
    run = staticmethod(run_encoder)

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("history", "INT64", (-1, -1))]

    @property
    def outputs(self) -> list[TensorSpec]:
        v = self.slot.current
        dim = v.compute.manifest.model.dim if v else -1
        specs = [TensorSpec("query", "FP32", (-1, dim))]
        if v is not None and "hidden" in v.compute.encoder.output_names:
            specs.append(TensorSpec("hidden", "FP32", (-1, -1, dim)))
        return specs

    async def infer(
        self, inputs: dict[str, np.ndarray], *, outputs: list[str] | None = None, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        v = self._pinned()
        with self._counted(v) as counted:
            tokens = _int_tensor(inputs, "history", self.name, 2)
            if tokens.shape[1] > v.max_len:
                raise InvalidRequest(
                    f"encoder: history has {tokens.shape[1]} columns, the model reads at most {v.max_len}"
                )
            _check_tokens(tokens, "history", v, self.name)
            done = await self.batcher.submit(
                tokens, group=v.compute, rows=len(tokens), deadline=deadline, stats=counted.stats
            )
            counted.add(done)
            return self._filter(done.value, outputs, self.name)


# ── ranker ────────────────────────────────────────────────────────────────────────────────────
_RANKER_SPECS = {
    "history": TensorSpec("history", "INT64", (-1, -1)),
    "hidden": TensorSpec("hidden", "FP32", (-1, -1, -1)),
    "candidates": TensorSpec("candidates", "INT64", (-1, -1)),
    "candidate_scores": TensorSpec("candidate_scores", "FP32", (-1, -1)),
    "user_features": TensorSpec("user_features", "INT64", (-1, -1), optional=True),  # absent = unknown users
    "history_timestamps": TensorSpec("history_timestamps", "INT64", (-1, -1), optional=True),  # absent = unknown
    "request_time": TensorSpec("request_time", "INT64", (-1, 1), optional=True),  # absent = unknown
}


class RankerModel(_Model):
    name = "ranker"
    run = staticmethod(run_ranker)

    def _ranker(self, v: LoadedVersion | None):
        if v is None or v.compute.ranker is None:
            raise Unavailable("the version serving has no ranker")
        return v.compute.ranker

    @property
    def inputs(self) -> list[TensorSpec]:
        v = self.slot.current
        return [_RANKER_SPECS[n] for n in self._ranker(v).input_names] if v and v.compute.ranker else []

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("scores", "FP32", (-1, -1))]

    async def infer(
        self, inputs: dict[str, np.ndarray], *, outputs: list[str] | None = None, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        v = self._pinned()
        with self._counted(v) as counted:
            ranker = self._ranker(v)
            feeds: dict[str, np.ndarray] = {}
            for name in ranker.input_names:
                if name in ("user_features", "history_timestamps", "request_time"):
                    continue  # optional, filled in below once the batch size is known
                if name == "hidden":
                    x = np.asarray(inputs.get("hidden")) if "hidden" in inputs else None
                    if x is None or x.ndim != 3 or x.dtype.kind != "f":
                        raise InvalidRequest("ranker: input 'hidden' must be an FP32 tensor (B, L, D)")
                    feeds[name] = x.astype(np.float32, copy=False)
                elif name == "candidate_scores":
                    x = np.asarray(inputs.get(name)) if name in inputs else None
                    if x is None or x.ndim != 2 or x.dtype.kind != "f":
                        raise InvalidRequest("ranker: input 'candidate_scores' must be an FP32 tensor (B, N)")
                    feeds[name] = x.astype(np.float32, copy=False)
                else:
                    feeds[name] = _int_tensor(inputs, name, self.name, 2)
                    _check_tokens(feeds[name], name, v, self.name)
            b = {len(x) for x in feeds.values()}
            if len(b) != 1:
                raise InvalidRequest(
                    f"ranker: inputs disagree on the batch size: { {k: x.shape for k, x in feeds.items()} }"
                )
            if ranker.reads_user_features:
                if "user_features" in inputs:
                    x = _int_tensor(inputs, "user_features", self.name, 2)
                    if x.shape != (len(feeds["candidates"]), ranker.user_width):
                        raise InvalidRequest(
                            f"ranker: user_features must be (B, {ranker.user_width}) like candidates' batch, "
                            f"got {x.shape}"
                        )
                    feeds["user_features"] = x
                else:
                    feeds["user_features"] = ranker.default("user_features", len(feeds["candidates"]))
            if ranker.reads_time:
                batch, length = feeds["history"].shape
                for name, shape in (("history_timestamps", (batch, length)), ("request_time", (batch, 1))):
                    if name in inputs:
                        x = _int_tensor(inputs, name, self.name, 2)
                        if x.shape != shape:
                            raise InvalidRequest(f"ranker: {name} must be {shape} (as history's batch), got {x.shape}")
                        feeds[name] = x
                    else:
                        feeds[name] = ranker.default(name, batch, length)
            if "candidate_scores" in feeds and feeds["candidate_scores"].shape != feeds["candidates"].shape:
                raise InvalidRequest("ranker: candidate_scores must have the shape of candidates")
            if "hidden" in feeds and "history" in feeds and feeds["hidden"].shape[1] != feeds["history"].shape[1]:
                raise InvalidRequest("ranker: hidden must have as many positions as history")
            done = await self.batcher.submit(
                feeds, group=v.compute, rows=b.pop(), deadline=deadline, stats=counted.stats
            )
            counted.add(done)
            return self._filter({"scores": done.value}, outputs, self.name)


# ── pipeline ──────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class _Query:
    rows: np.ndarray  # known history rows, oldest first
    exclude: np.ndarray
    k: int
    mask: RowMask | None = None  # the rows filters and availability allow (None: all)
    user_id: str = ""  # the ranker's user features (an id the version lacks, or "", is an unknown user)
    diversity: float = 0.0  # re-rank strengths, 0..1 (engine/rerank.py)
    popularity_calibration: float = 0.0
    times: np.ndarray | None = None  # seconds of each of `rows` (0 unknown); None: no time
    request_time: int = 0  # seconds; 0: the time is unknown (no timestamp in the history)


@dataclass
class Answer:
    """One user's recommendations, in external ids."""

    items: list[str]
    scores: np.ndarray  # float32, best first
    version: int
    unknown_items: int
    popularity_fallback: bool
    truncated_items: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds; batch_size as a count
    stored_events: int = 0  # events of the user's stored history put before the request's


class RecommendModel(_Model):
    """The whole request path, served as KServe model `pipeline` and behind Recommend."""

    name = "pipeline"
    platform = "attnrec_pipeline"
    run = staticmethod(run_recommend)

    def __init__(self, *args: Any, max_k: int, state: OnlineState | None = None) -> None:
        super().__init__(*args)
        self.max_k, self.state = max_k, state

    @property
    def inputs(self) -> list[TensorSpec]:
        return [
            TensorSpec("history", "BYTES", (-1, -1)),
            TensorSpec("k", "INT64", (-1, 1), optional=True),
            TensorSpec("exclude", "BYTES", (-1, -1), optional=True),
            TensorSpec("n_candidates", "INT64", (-1, 1), optional=True),
            TensorSpec("user_id", "BYTES", (-1, 1), optional=True),
            TensorSpec("history_timestamps", "INT64", (-1, -1), optional=True),
            TensorSpec("include_attributes", "BYTES", (-1, -1), optional=True),
            TensorSpec("exclude_attributes", "BYTES", (-1, -1), optional=True),
            TensorSpec("diversity", "FP32", (-1, 1), optional=True),
            TensorSpec("popularity_calibration", "FP32", (-1, 1), optional=True),
        ]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [
            TensorSpec("items", "BYTES", (-1, -1)),
            TensorSpec("scores", "FP32", (-1, -1)),
            TensorSpec("unknown_items", "INT64", (-1, 1)),
            TensorSpec("popularity_fallback", "BOOL", (-1, 1)),
            TensorSpec("stored_events", "INT64", (-1, 1)),
        ]

    async def recommend(
        self,
        history: Sequence[str],
        k: int,
        *,
        exclude: Sequence[str] = (),
        n_candidates: int = 0,
        deadline: float | None = None,
        user_id: str = "",
        include_attributes: Sequence[str] = (),
        exclude_attributes: Sequence[str] = (),
        diversity: float = 0.0,
        popularity_calibration: float = 0.0,
        history_timestamps: Sequence[int] = (),
    ) -> Answer:
        """One user's top-k external ids. Unknown history ids are skipped and counted. With `user_id`,
        the user's stored history goes before `history`; filters and availability shape the answer;
        `diversity` / `popularity_calibration` (0..1) re-rank it (engine/rerank.py).
        `history_timestamps`: seconds, one per `history` item (or none), for a ranker with time
        features; the request time is the clock, or the newest timestamp when that is later.
        One inference request of the serving version (Recommend's)."""
        v = self._pinned()
        with self._counted(v) as counted:
            return await self._row(
                v,
                counted,
                history,
                k,
                exclude=exclude,
                n_candidates=n_candidates,
                deadline=deadline,
                user_id=user_id,
                include_attributes=include_attributes,
                exclude_attributes=exclude_attributes,
                diversity=diversity,
                popularity_calibration=popularity_calibration,
                history_timestamps=history_timestamps,
            )

    async def _row(
        self,
        v: LoadedVersion,
        counted: _Counted,
        history: Sequence[str],
        k: int,
        *,
        exclude: Sequence[str],
        n_candidates: int,
        deadline: float | None,
        user_id: str,
        include_attributes: Sequence[str],
        exclude_attributes: Sequence[str],
        diversity: float = 0.0,
        popularity_calibration: float = 0.0,
        history_timestamps: Sequence[int] = (),
    ) -> Answer:
        """One row of a request (its batch and queue charged to `counted`)."""
        if not 1 <= k <= self.max_k:
            raise InvalidRequest(f"k must be in 1..{self.max_k}, got {k}")
        if n_candidates < 0 or n_candidates > self.max_k:
            raise InvalidRequest(f"n_candidates must be in 0..{self.max_k}, got {n_candidates}")
        for name, value in (("diversity", diversity), ("popularity_calibration", popularity_calibration)):
            if value != 0.0:  # a plain request (both 0) stays out of engine/rerank.py; NaN is != 0 and checked
                try:
                    strengths(value, 1, name)  # the re-rank's own 0..1 check (NaN fails it too)
                except ValueError as exc:
                    raise InvalidRequest(str(exc)) from None
        if history_timestamps and len(history_timestamps) != len(history):
            raise InvalidRequest(
                f"history_timestamps has {len(history_timestamps)} values for {len(history)} history items "
                "(give one per item, or none)"
            )
        stored: list[str] = []
        stamps: Sequence[int] = history_timestamps
        mask = None
        if self.state is not None:
            stored, stored_times, avail = await self.state.read_events(user_id)
            if stored:
                history = [*stored, *history]
                stamps = [*stored_times, *(history_timestamps or [0] * (len(history) - len(stored)))]
            mask = v.filters.mask(include_attributes, exclude_attributes, avail.generation, avail.unavailable)
        elif user_id:
            raise Unavailable("this server has no history store: send the history with the request")
        else:
            mask = v.filters.mask(include_attributes, exclude_attributes)
        lookup = v.rows_by_key
        found = [lookup.get(x) for x in history]
        rows = np.array([r for r in found if r is not None], dtype=np.int64)
        excl = np.array([r for r in (lookup.get(x) for x in exclude) if r is not None], dtype=np.int64)
        times, now = _times(stamps, found)
        p = v.compute
        # Requests batch together only on the same version and the same candidate count (it shapes the ranker's
        # input, and without a ranker it is the re-rank's pool: 0 = no re-rank, FAISS's top-k as it was).
        rerank = diversity > 0 or popularity_calibration > 0
        if p.ranker is not None:
            n = max(k, n_candidates or p.n_candidates)
        else:
            n = max(k, n_candidates or DEFAULT_CANDIDATES) if rerank else 0
        query = _Query(
            rows, excl, k, mask, user_id, float(diversity), float(popularity_calibration), times=times, request_time=now
        )
        done = await self.batcher.submit(query, group=(p, n), deadline=deadline, stats=counted.stats)
        counted.add(done)
        out_rows, scores, timings = done.value
        keep = out_rows >= 0
        return Answer(
            items=v.item_keys[out_rows[keep]].tolist(),
            scores=scores[keep],
            version=v.version,
            unknown_items=len(found) - len(rows),
            popularity_fallback=len(rows) == 0,
            truncated_items=max(0, len(rows) - v.max_len),
            timings={**timings, "queue": done.queue_s, "batch_size": done.batch_size},
            stored_events=len(stored),
        )

    async def infer(
        self, inputs: dict[str, np.ndarray], *, outputs: list[str] | None = None, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        """A (B, ·) request: B rows, each a user, computed concurrently (they may share batches) and
        counted as one inference request of B rows."""
        v = self._pinned()
        with self._counted(v) as counted:
            return await self._infer(v, counted, inputs, outputs, deadline)

    async def _infer(
        self,
        v: LoadedVersion,
        counted: _Counted,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None,
        deadline: float | None,
    ) -> dict[str, np.ndarray]:
        if "history" not in inputs:
            raise InvalidRequest("pipeline needs input 'history' (BYTES item ids, '' = padding)")
        history = _id_matrix(inputs["history"], "history")
        b = len(history)
        if b > self.max_batch_size:
            raise InvalidRequest(f"pipeline: {b} rows exceed max_batch_size {self.max_batch_size}")
        exclude = _id_matrix(inputs["exclude"], "exclude") if "exclude" in inputs else [[] for _ in range(b)]
        ks = _per_row(inputs, "k", b, DEFAULT_K)
        ncs = _per_row(inputs, "n_candidates", b, 0)
        users = [row[0] if row else "" for row in _optional_ids(inputs, "user_id", b)]
        stamps = _history_timestamps(inputs, b)
        include = _optional_ids(inputs, "include_attributes", b)
        exclude_attrs = _optional_ids(inputs, "exclude_attributes", b)
        div = _per_row_float(inputs, "diversity", b)
        cal = _per_row_float(inputs, "popularity_calibration", b)
        if len(exclude) != b:
            raise InvalidRequest(f"pipeline: exclude has {len(exclude)} rows, history {b}")
        answers = await asyncio.gather(
            *(
                self._row(
                    v,
                    counted,
                    history[i],
                    int(ks[i]),
                    exclude=exclude[i],
                    n_candidates=int(ncs[i]),
                    deadline=deadline,
                    user_id=users[i],
                    include_attributes=include[i],
                    exclude_attributes=exclude_attrs[i],
                    diversity=float(div[i]),
                    popularity_calibration=float(cal[i]),
                    history_timestamps=stamps[i],
                )
                for i in range(b)
            )
        )
        width = max((len(a.items) for a in answers), default=0)
        items = np.full((b, width), b"", dtype=object)
        scores = np.full((b, width), -np.inf, dtype=np.float32)
        for i, a in enumerate(answers):
            items[i, : len(a.items)] = [x.encode() for x in a.items]
            scores[i, : len(a.items)] = a.scores
        out = {
            "items": items,
            "scores": scores,
            "unknown_items": np.array([[a.unknown_items] for a in answers], dtype=np.int64).reshape(b, 1),
            "popularity_fallback": np.array([[a.popularity_fallback] for a in answers], dtype=bool).reshape(b, 1),
            "stored_events": np.array([[a.stored_events] for a in answers], dtype=np.int64).reshape(b, 1),
        }
        return self._filter(out, outputs, self.name)


def _times(stamps: Sequence[int], found: list[int | None]) -> tuple[np.ndarray | None, int]:
    """The seconds of the known history items (0 unknown) and the request time (0: no timestamp at
    all, so the ranker's time is unknown): the clock, or the newest timestamp when that is later."""
    if not stamps or max(stamps) <= 0:
        return None, 0
    times = np.array([t for t, r in zip(stamps, found) if r is not None], dtype=np.int64)
    return times, max(int(time.time()), int(max(stamps)))


def _history_timestamps(inputs: dict[str, np.ndarray], b: int) -> list[list[int]]:
    """The pipeline's optional history_timestamps (B, H), per row the values of its non-padding history
    cells (`history` has been checked by `_id_matrix`)."""
    if "history_timestamps" not in inputs:
        return [[] for _ in range(b)]
    cells = [[bool(_text(s)) for s in row] for row in np.asarray(inputs["history"], dtype=object)]
    x = np.asarray(inputs["history_timestamps"])
    width = len(cells[0]) if cells else 0
    if x.dtype.kind not in "iu" or x.shape != (b, width):
        raise InvalidRequest(
            f"pipeline: input 'history_timestamps' must be INT64 shaped like history ({b}, {width}), got {x.dtype} "
            f"{x.shape}"
        )
    return [[int(t) for t, used in zip(row, keep) if used] for row, keep in zip(x.tolist(), cells)]


def _id_matrix(x: np.ndarray, name: str) -> list[list[str]]:
    """A BYTES (B, H) tensor → one list of ids per row, "" padding dropped."""
    x = np.asarray(x, dtype=object)
    if x.ndim != 2:
        raise InvalidRequest(f"pipeline: input {name!r} must be a BYTES tensor (B, H), got shape {x.shape}")
    try:
        return [[s for s in map(_text, row) if s] for row in x]
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"pipeline: input {name!r} holds an id that is not valid UTF-8 ({exc.reason})") from None


def _text(s: object) -> str:
    return s.decode() if isinstance(s, bytes) else str(s)


def _optional_ids(inputs: dict[str, np.ndarray], name: str, b: int) -> list[list[str]]:
    """An optional BYTES (B, N) input as one list of strings per row ([] per row when absent)."""
    if name not in inputs:
        return [[] for _ in range(b)]
    rows = _id_matrix(inputs[name], name)
    if len(rows) != b:
        raise InvalidRequest(f"pipeline: {name} has {len(rows)} rows, history {b}")
    return rows


def _per_row(inputs: dict[str, np.ndarray], name: str, b: int, default: int) -> np.ndarray:
    if name not in inputs:
        return np.full(b, default, dtype=np.int64)
    x = np.asarray(inputs[name])
    if x.dtype.kind not in "iu" or x.size != b:
        raise InvalidRequest(f"pipeline: input {name!r} must be INT64 with one value per row ({b}), got {x.shape}")
    return x.reshape(b).astype(np.int64)


def _per_row_float(inputs: dict[str, np.ndarray], name: str, b: int) -> np.ndarray:
    if name not in inputs:
        return np.zeros(b)
    x = np.asarray(inputs[name])
    if x.dtype.kind != "f" or x.size != b:
        raise InvalidRequest(f"pipeline: input {name!r} must be FP32 with one value per row ({b}), got {x.shape}")
    return x.reshape(b).astype(np.float64)


class ModelRegistry:
    """The served models of one repository model, by KServe name, over one version slot; the
    KServe servicer's `get`/`models`/`ready`. Loading is engine/loader.py's (it writes `slot`)."""

    def __init__(
        self,
        name: str,
        *,
        batching: BatchSettings = BatchSettings(),
        max_k: int = 1000,
        telemetry: Telemetry,
        state: OnlineState | None = None,
        needed: Sequence[str] = (),
    ) -> None:
        """`needed`: the served models the server's services cannot do without (the domain API's
        `pipeline`); unloading one makes the server not ready."""
        self.name, self.batching, self.telemetry = name, batching, telemetry
        self.needed = tuple(needed)
        self.slot = VersionSlot()
        # Triton's per-model statistics: ModelStatistics and the nv_inference_* families read the same counters.
        self.stats_store = StatsStore(batching.max_batch_size)
        telemetry.add_exposition(self.triton_exposition)
        # Batches of the three models may run at once; one more thread loads new versions.
        self.executor = ThreadPoolExecutor(max_workers=3 * batching.instances + 1, thread_name_prefix="attnrec")
        args = (self.slot, batching, self.executor, telemetry, self.stats_store)
        self.encoder = EncoderModel(*args)
        self.ranker = RankerModel(*args)
        self.state = state  # users' stored histories and item availability (engine/online_state.py)
        self.recommend = RecommendModel(*args, max_k=max_k, state=state)
        self._models: dict[str, _Model] = {m.name: m for m in (self.encoder, self.ranker, self.recommend)}

    def share_stats(self, folder: Path) -> None:
        """Count into `folder`, which every worker of a `--workers N` server shares (before any request)."""
        self.stats_store.share(folder)

    def triton_exposition(self) -> bytes:
        """The nv_inference_* families (Prometheus text) of every model version counted so far."""
        for m in self.models():  # the serving version's series exist (at zero) before its first request
            m.stats
        return triton_metrics.exposition(self.stats_store.all_totals())

    @property
    def ready(self) -> bool:
        """Loaded and warmed up, not draining, and no needed model unloaded (KServe's ServerReady)."""
        slot = self.slot
        return slot.current is not None and not slot.draining and not any(n in slot.unloaded for n in self.needed)

    def serving(self, needs: Sequence[str]) -> bool:
        """Whether a service that needs the models `needs` can answer now (its health status)."""
        slot = self.slot
        return slot.current is not None and not slot.draining and not any(n in slot.unloaded for n in needs)

    def models(self) -> list[ServedModel]:
        v = self.slot.current
        return [m for m in self._models.values() if m is not self.ranker or (v is not None and v.compute.ranker)]

    def get(self, name: str, version: str = "") -> ServedModel:
        """The model, or NotFound; a non-empty `version` must be the one serving."""
        model = self._models.get(name)
        v = self.slot.current
        if model is None or (model is self.ranker and v is not None and v.compute.ranker is None):
            known = ", ".join(m.name for m in self.models())
            raise NotFound(f"no model {shown(name)} on this server (it serves: {known})")
        if version and v is not None and version != str(v.version):
            raise NotFound(f"model {name!r} version {shown(version)} is not serving (version {v.version} is)")
        return model

    async def close(self) -> None:
        for m in self._models.values():
            await m.batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
