"""Dynamic batching: requests wait briefly for others, then run together off the event loop.

One `Batcher` per served model. Requests are queued with a *group* (the model version they
were pinned to); a batch holds requests of one group only, so a request always computes on
the version it started with, even across a hot swap. Inference runs in a thread pool:
onnxruntime and FAISS release the GIL, and the event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import BatchFailed, DeadlineExpired, InvalidRequest, QueueFull, ServingError, Unavailable
from .model_stats import ModelStats

if TYPE_CHECKING:
    from .pipeline import BatchOutput
    from .telemetry import Telemetry

log = logging.getLogger(__name__)


INLINE_BELOW = 1.25  # requests per batch (moving average) under which a lone request may run inline


@dataclass(frozen=True)
class BatchSettings:
    """Triton's dynamic_batching knobs (flags of `attnrec serve`)."""

    max_batch_size: int = 32  # rows per batch
    max_queue_delay_us: int = 0  # how long the first request waits for others (0: take what is queued)
    max_queue_size: int = 1024  # queued requests beyond this are refused (RESOURCE_EXHAUSTED); 0 = no limit
    instances: int = 1  # batches of one model that may run at the same time
    # A batch of one request, with nothing else queued or running, runs on the event-loop thread when
    # the model's recent one-request batches took at most this long (µs, the run itself, without the
    # hand-off); 0: always the thread pool. Why: the hand-off to a pool thread and back costs ~0.3 ms
    # on a small host (two wake-ups, and the pool thread holding the GIL when it wakes the loop), a
    # third of a 1 ms request; at light load a loop blocked for this long delays the next request no
    # more than the batch it would then join. 4 ms: on a shared 2-core VM a 1 ms run often takes 2–3 ms.
    inline_max_us: int = 4000


@dataclass(frozen=True)
class Completed:
    """A request's result and how it was batched: its wait, and its batch's compute phases (Triton's
    compute_input / compute_infer / compute_output, which every request of the batch is charged)."""

    value: Any
    queue_s: float
    batch_size: int  # requests in its batch
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    batch: int = 0  # which batch (a running count): a request whose rows ran in one batch is charged it once


@dataclass
class _Pending:
    item: Any
    rows: int
    group: Any  # compared with ==: batches never mix groups
    deadline: float | None  # time.monotonic()
    enqueued: float  # time.monotonic()
    future: asyncio.Future
    stats: ModelStats | None  # where its batch's execution is counted (the group's version's)


def _failed(name: str, n: int, exc: Exception) -> BatchFailed:
    """What the requests of a batch that failed unexpectedly are told: which model's batcher, how many
    requests, the exception's type (its text and traceback are the server log's: no internals leak)."""
    error = BatchFailed(f"{name}: a batch of {n} request(s) failed ({type(exc).__name__}); the server logged why")
    error.__cause__ = exc
    return error


# run(group, items) -> BatchOutput (engine/pipeline.py): one value per item, in order, and the
# batch's input/output preparation and stage times; called in the executor.
RunBatch = Callable[[Any, Sequence[Any]], "BatchOutput"]


class Batcher:
    def __init__(
        self,
        name: str,
        run: RunBatch,
        settings: BatchSettings,
        executor: Executor,
        telemetry: "Telemetry | None" = None,
    ) -> None:
        if settings.max_batch_size < 1 or settings.instances < 1:
            raise ValueError(f"{name}: max_batch_size and instances must be at least 1")
        self.name, self.run, self.settings, self.executor = name, run, settings, executor
        self.telemetry = telemetry
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        self._closed = False
        self._batches = 0
        self._in_pool = 0  # batches running in the thread pool now
        self._single_s: float | None = None  # moving average of one-request batches' run time
        self._requests_per_batch = 1.0  # moving average: above ~1, requests overlap (load)
        self._children: dict[str, Any] = {}  # metric children by stage (see _histogram)

    def start(self) -> None:
        if not self._workers:
            self._workers = [asyncio.ensure_future(self._work()) for _ in range(self.settings.instances)]

    async def close(self) -> None:
        """Stop the workers; whatever is still queued is answered UNAVAILABLE."""
        self._closed = True
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(Unavailable(f"{self.name}: the server is shutting down"))

    async def submit(
        self,
        item: Any,
        *,
        group: Any = None,
        rows: int = 1,
        deadline: float | None = None,
        stats: ModelStats | None = None,
    ) -> Completed:
        """Queue one request of `rows` rows and wait for its result. The batch it runs in is counted in
        `stats` (executions, rows, batch sizes); the request itself is its caller's to count."""
        if self._closed:
            raise Unavailable(f"{self.name}: the server is shutting down")
        if rows > self.settings.max_batch_size:
            raise InvalidRequest(f"{self.name}: {rows} rows exceed max_batch_size {self.settings.max_batch_size}")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExpired(f"{self.name}: the deadline had passed before the request was queued")
        if self.settings.max_queue_size and len(self._queue) >= self.settings.max_queue_size:
            raise QueueFull(f"{self.name}: queue full ({self.settings.max_queue_size} requests waiting); retry later")
        self.start()
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, rows, group, deadline, now, fut, stats))
        self._arrived.set()
        return await fut

    async def _collect(self, batch: list[_Pending]) -> None:
        """Wait for a first request, up to max_queue_delay for more, then take one group's batch into
        `batch` (filled as taken: if this fails, the worker knows whose requests to answer)."""
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        limit = self.settings.max_batch_size
        delay = self.settings.max_queue_delay_us / 1e6
        if delay > 0:
            until = self._queue[0].enqueued + delay
            while sum(p.rows for p in self._queue) < limit and (left := until - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
        rows, now = 0, time.monotonic()
        while self._queue:
            p = self._queue[0]
            if p.future.done():  # the caller went away (cancelled)
                self._queue.popleft()
                continue
            if p.deadline is not None and p.deadline <= now:  # expired requests are not computed
                self._queue.popleft()
                p.future.set_exception(DeadlineExpired(f"{self.name}: the deadline passed while queued"))
                continue
            if batch and (p.group != batch[0].group or rows + p.rows > limit):
                break
            batch.append(self._queue.popleft())
            rows += p.rows

    async def _work(self) -> None:
        """One worker: batch after batch, whatever fails. An exception that escapes a batch (a run
        function's answer that does not fit its batch, a failing metric) fails that batch's requests
        with BatchFailed, and the worker takes the next; no queued request is left waiting on a
        worker that died."""
        while True:
            batch: list[_Pending] = []
            try:
                await self._collect(batch)
                if batch:
                    await self._run_batch(batch)
            except asyncio.CancelledError:  # close(): what it took from the queue is answered too
                self._fail(batch, Unavailable(f"{self.name}: the server is shutting down"))
                raise
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one batch
                log.exception("%s: the batcher failed on a batch of %d requests", self.name, len(batch))
                if not batch and self._queue:  # it failed on the queue's head: answer that one and move on
                    batch = [self._queue.popleft()]
                self._fail(batch, _failed(self.name, len(batch), exc))

    @staticmethod
    def _fail(batch: list[_Pending], error: Exception) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(error)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        rows = sum(p.rows for p in batch)
        queue_s = [start - p.enqueued for p in batch]
        ran_s = 0.0  # the run's own time (`_timed`); a batch that failed charges none
        try:
            if self._inline(batch):
                out, ran_s = self._timed(batch[0].group, [batch[0].item])
            else:
                self._in_pool += 1
                try:
                    items = [p.item for p in batch]
                    out, ran_s = await loop.run_in_executor(self.executor, self._timed, batch[0].group, items)
                finally:
                    self._in_pool -= 1
            if len(out.values) != len(batch):
                raise RuntimeError(f"the run function returned {len(out.values)} results for {len(batch)} requests")
            error = None
        except ServingError as exc:  # the request's own fault (or its deadline): every request of the batch gets it
            out, error = None, exc
        except Exception as exc:  # noqa: BLE001 - a bug: every waiting request gets what failed, in words
            log.exception("%s: batch of %d failed", self.name, len(batch))
            out, error = None, _failed(self.name, len(batch), exc)
        self._requests_per_batch = 0.9 * self._requests_per_batch + 0.1 * len(batch)
        if len(batch) == 1 and out is not None:  # the run's own time: a slow hand-off must not keep it in the pool
            self._single_s = ran_s if self._single_s is None else 0.8 * self._single_s + 0.2 * ran_s
        phases = self._account(batch, rows, ran_s, out)
        self._batches += 1
        number = self._batches
        if self.telemetry is not None:  # prometheus_client directly: no hand-written hop per batch
            self._histogram("batch").observe(rows)
            queue_hist = self._histogram("queue")
            for q in queue_s:
                queue_hist.observe(q)
            for stage, seconds in out.stages.items() if out is not None else ():
                self._histogram(stage).observe(seconds)
        for i, p in enumerate(batch):
            if p.future.done():
                continue
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result(Completed(out.values[i], queue_s[i], len(batch), *phases, number))

    def _timed(self, group: Any, items: list) -> tuple["BatchOutput", float]:
        start = time.monotonic()
        out = self.run(group, items)
        return out, time.monotonic() - start

    def _inline(self, batch: list[_Pending]) -> bool:
        """Run this batch on the event-loop thread (see BatchSettings.inline_max_us)? Only a lone
        request, with no other waiting and none of this model's batches in the pool, once one-request
        batches are known to be short (the first ones run in the pool and are timed), and only while
        requests rarely overlap: under load the pool thread's compute (onnxruntime and FAISS release
        the GIL) overlaps the loop's work on the next requests, which an inline run would serialise."""
        limit = self.settings.inline_max_us
        return (
            limit > 0
            and len(batch) == 1
            and self._requests_per_batch < INLINE_BELOW
            and not self._queue
            and not self._in_pool
            and self._single_s is not None
            and self._single_s * 1e6 <= limit
        )

    def _histogram(self, stage: str):
        """The prometheus_client child of `stage` ("batch": the batch-size histogram), looked up once."""
        child = self._children.get(stage)
        if child is None:
            t = self.telemetry
            child = t.batch_size.labels(self.name) if stage == "batch" else t.stage_seconds.labels(self.name, stage)
            self._children[stage] = child
        return child

    def _account(
        self, batch: list[_Pending], rows: int, ran_s: float, out: "BatchOutput | None"
    ) -> tuple[int, int, int]:
        """The batch's compute phases (ns): compute_input/output are the run function's own preparation
        and splitting times, compute_infer the rest of the run itself (`ran_s`: without the thread-pool
        hand-off, which is waiting, not compute, as Triton's compute_infer is the model's execution).
        A batch that ran is counted as one execution of `rows` rows in its version's statistics."""
        if out is None:
            return 0, 0, 0
        input_ns, output_ns = int(out.input_s * 1e9), int(out.output_s * 1e9)
        infer_ns = max(0, int(ran_s * 1e9) - input_ns - output_ns)
        if batch[0].stats is not None:
            batch[0].stats.record_execution(rows, infer_ns)
        return input_ns, infer_ns, output_ns
