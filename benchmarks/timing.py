"""Timing one benchmark point: warm-up, a fixed measuring window, percentiles, repeats → median with spread.

Every number the suite reports comes through here, so every stage follows one method:
a point is run for `warmup_s` unrecorded, then for a fixed `duration_s` window whose
per-call latencies give p50/p90/p95/p99 and whose count gives throughput; the whole point
is repeated `repeats` times and each figure is reported as the median of the repeats with
their [min, max] as the spread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class Method:
    """How long each point runs; a stage passes it down unchanged."""

    duration_s: float = 1.0  # measuring window per repeat
    warmup_s: float = 0.3  # unrecorded calls before each repeat's window
    repeats: int = 3  # windows per point; figures are their median, spread their [min, max]
    min_calls: int = 3  # a window lasts until at least this many calls, even past duration_s

    def to_dict(self) -> dict:
        return {
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "repeats": self.repeats,
            "min_calls": self.min_calls,
        }


def run_window(
    fn: Callable[[], object], duration_s: float, warmup_s: float, min_calls: int = 3, gap_s: float = 0.0
) -> np.ndarray:
    """Per-call seconds of `fn` over one window (after a warm-up of at least one call). `gap_s`: an idle
    pause (sleep, untimed) after every call, as a server at concurrency 1 idles between requests."""
    end = time.perf_counter() + warmup_s
    while True:
        fn()
        if gap_s > 0:
            time.sleep(gap_s)
        if time.perf_counter() >= end:
            break
    times = []
    clock = time.perf_counter
    start = clock()
    end = start + duration_s
    while True:
        t = clock()
        fn()
        done = clock()
        times.append(done - t)
        if done >= end and len(times) >= min_calls:
            break
        if gap_s > 0:
            time.sleep(gap_s)
    return np.asarray(times)


def summarize(seconds: np.ndarray, items_per_call: int = 1) -> dict[str, float]:
    """One window → n calls, wall time, mean/pXX latency in ms, calls/s and items/s."""
    ms = seconds * 1e3
    total = float(seconds.sum())
    out = {"calls": int(len(seconds)), "wall_s": total, "mean_ms": float(ms.mean())}
    for p, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES)):
        out[f"p{p}_ms"] = float(v)
    out["calls_per_s"] = len(seconds) / total
    out["items_per_s"] = len(seconds) * items_per_call / total
    return out


def aggregate(repeats: list[dict[str, float]]) -> dict:
    """Repeated windows of one point → each figure's median, with [min, max] as `<key>_spread`."""
    out: dict = {"repeats": repeats}
    for key in repeats[0]:
        values = np.array([r[key] for r in repeats], dtype=np.float64)
        out[key] = float(np.median(values))
        out[f"{key}_spread"] = [float(values.min()), float(values.max())]
    return out


def measure(fn: Callable[[], object], method: Method, items_per_call: int = 1, gap_s: float = 0.0) -> dict:
    """Run one point `method.repeats` times; figures are medians over the repeats (see `aggregate`).
    `gap_s`: idle time after each call (see `run_window`); rates then count call time only."""
    windows = [
        summarize(run_window(fn, method.duration_s, method.warmup_s, method.min_calls, gap_s), items_per_call)
        for _ in range(method.repeats)
    ]
    return aggregate(windows)
