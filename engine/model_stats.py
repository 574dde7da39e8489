"""Triton's per-model statistics: the one set of counters behind both `ModelStatistics` (KServe) and
the `nv_inference_*` metric families (engine/triton_metrics.py), so the two always agree.

One `ModelStats` per (model, version) and process, counted on the event loop's thread:

    request level (engine/models.py, once per inference request, whatever its rows)
        success_count / success_ns     requests answered, their duration (model entry to answer)
        fail_count / fail_ns           requests that failed: rejected input, queue full, deadline, cancelled
        queue_ns                       successful requests' time waiting in the batcher's queue
        compute_input/infer/output_ns  successful requests' share of compute: the phases of each batch
                                       they ran in (Triton's convention: every request of a batch is
                                       charged the batch's phases)
    execution level (engine/batcher.py, once per batch that ran)
        execution_count, inference_count (rows), batch_stats[rows] = (count, compute_infer ns)

With `--workers N` every worker's counters live in a file of the shared statistics folder (an int64
array mapped into memory, so updates cost what a numpy element update costs and readers never see a
stale value); `StatsStore.totals` sums the workers' files, so ModelStatistics from any worker and the
merged metrics endpoint report the whole server.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import numpy as np

FIELDS = (
    "inference_count",
    "execution_count",
    "success_count",
    "success_ns",
    "fail_count",
    "fail_ns",
    "queue_ns",
    "compute_input_ns",
    "compute_infer_ns",
    "compute_output_ns",
    "last_inference_ms",
)
_AT = {name: i for i, name in enumerate(FIELDS)}
(INFERENCE, EXECUTION, SUCCESS, SUCCESS_NS, FAIL, FAIL_NS, QUEUE_NS, INPUT_NS, INFER_NS, OUTPUT_NS, LAST_MS) = range(
    len(FIELDS)
)
SUFFIX = ".stats"


class ModelStats:
    """Cumulative counters of one model version (durations in nanoseconds), as an int64 array:
    the FIELDS, then (count, compute_infer ns) per batch size 0..max_batch_size."""

    __slots__ = ("a", "max_batch_size", "_map")

    def __init__(self, max_batch_size: int = 1024, *, path: Path | None = None, array: np.ndarray | None = None):
        self.max_batch_size = max_batch_size
        size = len(FIELDS) + 2 * (max_batch_size + 1)
        self._map = None
        if array is not None:  # a read-only total (StatsStore.totals)
            self.a = array
        elif path is None:
            self.a = np.zeros(size, dtype=np.int64)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, size * 8)
                self._map = mmap.mmap(fd, size * 8)
            finally:
                os.close(fd)
            self.a = np.frombuffer(self._map, dtype=np.int64)

    def __getattr__(self, name: str) -> int:
        try:
            return int(self.a[_AT[name]])
        except KeyError:
            raise AttributeError(name) from None

    @property
    def batch_stats(self) -> dict[int, tuple[int, int]]:
        """batch size → (executions, compute_infer ns), for the sizes that ran."""
        pairs = self.a[len(FIELDS) :].reshape(-1, 2)
        return {int(b): (int(c), int(ns)) for b, (c, ns) in enumerate(pairs) if c}

    # ── updates (event-loop thread only) ─────────────────────────────────────────────────────
    def record_success(self, duration_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        a = self.a
        a[SUCCESS] += 1
        a[SUCCESS_NS] += duration_ns
        a[QUEUE_NS] += queue_ns
        a[INPUT_NS] += input_ns
        a[INFER_NS] += infer_ns
        a[OUTPUT_NS] += output_ns

    def record_failure(self, duration_ns: int) -> None:
        self.a[FAIL] += 1
        self.a[FAIL_NS] += duration_ns

    def record_execution(self, rows: int, infer_ns: int) -> None:
        a = self.a
        a[EXECUTION] += 1
        a[INFERENCE] += rows
        a[LAST_MS] = int(time.time() * 1000)
        at = len(FIELDS) + 2 * min(rows, self.max_batch_size)
        a[at] += 1
        a[at + 1] += infer_ns


class StatsStore:
    """The ModelStats of one server process by (model, version); with `shared` (a folder every worker
    of one server writes into), totals are summed over all workers' files."""

    def __init__(self, max_batch_size: int, shared: Path | None = None) -> None:
        self.max_batch_size, self.shared = max_batch_size, None if shared is None else Path(shared)
        self._own: dict[tuple[str, str], ModelStats] = {}

    def share(self, folder: Path) -> None:
        """From now on, count in `folder` (shared by the workers of one server) and read totals from it."""
        if self._own:
            raise RuntimeError("share() must come before the first request is counted")
        self.shared = Path(folder)

    def block(self, model: str, version: str) -> ModelStats:
        """This process's counters of (model, version), created at zero on first use."""
        key = (model, version)
        s = self._own.get(key)
        if s is None:
            path = None if self.shared is None else self.shared / f"{model}@{version}@{os.getpid()}{SUFFIX}"
            s = self._own[key] = ModelStats(self.max_batch_size, path=path)
        return s

    def totals(self, model: str, version: str) -> ModelStats:
        """The whole server's counters of (model, version): this process's, or every worker's summed."""
        if self.shared is None:
            return self.block(model, version)
        self.block(model, version)
        return read_shared(self.shared).get((model, version)) or ModelStats(self.max_batch_size)

    def all_totals(self) -> dict[tuple[str, str], ModelStats]:
        """Every (model, version) counted so far, the whole server's totals."""
        return dict(self._own) if self.shared is None else read_shared(self.shared)


def read_shared(folder: Path) -> dict[tuple[str, str], ModelStats]:
    """Sum the statistics files of every worker in `folder` by (model, version) (last_inference: the latest)."""
    sums: dict[tuple[str, str], np.ndarray] = {}
    for path in sorted(Path(folder).glob(f"*{SUFFIX}")):
        parts = path.name[: -len(SUFFIX)].split("@")
        if len(parts) != 3:
            continue
        try:
            a = np.fromfile(path, dtype=np.int64)
        except OSError:  # a worker's file vanished between the listing and the read
            continue
        if len(a) < len(FIELDS) + 2:  # created, not yet sized
            continue
        key = (parts[0], parts[1])
        if key not in sums:
            sums[key] = a.copy()
        elif len(sums[key]) == len(a):
            last = max(sums[key][LAST_MS], a[LAST_MS])
            sums[key] += a
            sums[key][LAST_MS] = last
    return {k: ModelStats((len(a) - len(FIELDS)) // 2 - 1, array=a) for k, a in sums.items()}
