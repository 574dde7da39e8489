"""Resident memory of this process (the in-process test server's included), sampled while something runs."""

from __future__ import annotations

import threading
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRss:
    """`with PeakRss() as m: ...` → m.before, m.peak, m.growth (MB), sampled every `every` seconds."""

    def __init__(self, every: float = 0.005) -> None:
        self.every = every
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRss":
        self.before = self.peak = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.every)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.before
