"""The ONNX encoder's session (onnxruntime, no torch): execution providers, session options, IO binding,
and the graph's input/output names. Running it is request-time compute: engine/pipeline.py (`encode`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import onnxruntime as ort

log = logging.getLogger(__name__)

# Preferred execution providers, fastest first; the first ones the installed build offers win.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GRAPH_OPT = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """`requested` in order, or TensorRT → CUDA → CPU filtered by what this build offers."""
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ValueError(f"execution providers {missing} are not in this onnxruntime build (it has {available})")
        return list(requested)
    return [p for p in PROVIDER_ORDER if p in available] or available


def usable_cores() -> int:
    """The physical cores this process may run on: onnxruntime's own default intra-op thread count
    (hyper-thread siblings count once), from the affinity mask and sysfs (else every allowed CPU)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        try:
            topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def make_session(
    path: Path | str,
    *,
    providers: Sequence[str] | None = None,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    graph_optimization: str = "all",
    allow_spinning: bool = True,
) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _GRAPH_OPT[graph_optimization]
    # 0 = one thread per usable core, set explicitly: left at 0, onnxruntime picks the same count but pins its
    # worker threads to cores (seen here: every worker on core 1 of 2), and a pinned thread cannot move off a
    # core that the event loop, the load client or another --workers process is using. On this 2-core VM,
    # unpinned: c=1 p50 2.07 against 2.28 ms, 3 fresh servers each (benchmarks/results/e2e-runs-2026-12-02.md).
    opts.intra_op_num_threads = intra_op_threads or usable_cores()
    opts.inter_op_num_threads = inter_op_threads
    # Spinning worker threads shave microseconds off a lone call but burn the cores that the
    # gRPC loop, FAISS and the other requests need on a small, shared host.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if allow_spinning else "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=choose_providers(providers))


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
IO_BINDING = ("auto", "on", "off")


def binding_device(session: ort.InferenceSession, io_binding: str = "auto") -> str | None:
    """Where a session's IO-bound tensors live ("cuda" or "cpu"), or None to run it with plain
    `session.run`. auto: bound on a GPU provider, where binding saves the copies onnxruntime makes
    around every run and lets one model's output stay on the device for the next; on: bound whatever
    the provider (the same code path on a CPU host); off: never."""
    if io_binding not in IO_BINDING:
        raise ValueError(f"io_binding must be one of {IO_BINDING}, got {io_binding!r}")
    gpu = session.get_providers()[0] in GPU_PROVIDERS
    if io_binding == "off" or (io_binding == "auto" and not gpu):
        return None
    return "cuda" if gpu else "cpu"


class OnnxEncoder:
    """history tokens (B, L) → query vectors (B, D), and optionally hidden states (B, L, D)."""

    def __init__(self, path: Path | str, max_len: int, *, io_binding: str = "auto", **session_kwargs) -> None:
        self.session = make_session(path, **session_kwargs)
        self.binding = binding_device(self.session, io_binding)  # None: session.run
        self.max_len = max_len
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()
