"""The settings every stage receives: one typed object, built by the command line, passed down."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .timing import Method

PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    # CPU second: onnxruntime needs it for the few ops CUDA has no kernel for (shape arithmetic);
    # benchmarks/gpu.py checks that the model's compute really runs on CUDA.
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}


def _print(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    quick: bool = False
    tiny: bool = False  # tests: the quick code paths on tiny models and catalogues
    method: Method = Method()
    threads: int = 0  # onnxruntime intra-op and torch threads; 0 = the libraries' defaults (all cores)
    provider: str = "cpu"  # "cpu" or "cuda": onnxruntime's provider and torch's device
    model_path: Path | None = None  # a repository version folder to take shapes/weights from; None = synthetic
    work_dir: Path = Path(".cache/bench")  # exported synthetic models go here
    seed: int = 0
    peer_setup: bool = True  # the peer stage may create its peers' virtual environments (pip) when absent
    peers: tuple[str, ...] = ("mlserver", "rayserve")  # the peer stage's peers (benchmarks/peer/)
    log: Callable[[str], None] = field(default=_print, compare=False, repr=False)
    started: float = field(default_factory=time.perf_counter, compare=False, repr=False)

    @property
    def providers(self) -> tuple[str, ...]:
        return PROVIDERS[self.provider]

    @property
    def device(self) -> str:
        return "cuda" if self.provider == "cuda" else "cpu"

    def progress(self, stage: str, msg: str) -> None:
        """One progress line: elapsed time, stage, message."""
        self.log(f"[{time.perf_counter() - self.started:7.1f}s] {stage:>9}: {msg}")

    def to_dict(self) -> dict:
        return {
            "quick": self.quick,
            "tiny": self.tiny,
            "method": self.method.to_dict(),
            "threads": self.threads,
            "provider": self.provider,
            "model_path": str(self.model_path) if self.model_path else None,
            "seed": self.seed,
            "peer_setup": self.peer_setup,
            "peers": list(self.peers),
        }
