"""The median latency of a call, as export reports it (encoder, ranker, index) and the quick timing tools print it.

The benchmark suite's own method (warm-up, fixed windows, repeated points) is benchmarks/timing.py.
"""

# In engine/, not benchmarks/: export and the benchmarks both import engine, and export must not import benchmarks.

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """Median milliseconds of `repeats` calls of `fn`, after `warmup` calls that are not recorded."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))
