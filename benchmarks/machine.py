"""What machine a run came from (CPU, cores, GPU, library versions, ORT providers) and its matmul roofline."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time

import numpy as np

LIBRARIES = (
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "faiss-cpu",
    "faiss-gpu",
    "torch",
    "onnx",
    "grpcio",
    "protobuf",
    "matplotlib",
    "tritonclient",
    "attnrec",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_info(note: str = "") -> dict:
    import onnxruntime as ort

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {
        "cpu": cpu_model(),
        "cores_usable": usable_cores(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1) if mem else None,
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "onnxruntime_providers": ort.get_available_providers(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "note": note,
    }


def _best_gflops(mm, n: int, duration_s: float) -> float:
    """Best single-call GFLOP/s of an n×n×n float32 product over a short window."""
    mm()  # warm-up: thread pools, page faults
    best, end = float("inf"), time.perf_counter() + duration_s
    while True:
        t = time.perf_counter()
        mm()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() >= end:
            break
    return 2 * n**3 / best / 1e9


def matmul_roofline(threads: int = 0, duration_s: float = 0.5, sizes=(512, 1024, 2048), device: str = "cpu") -> dict:
    """Measured sgemm GFLOP/s (numpy's BLAS and torch's), the ceiling for a model's achieved GFLOP/s.

    numpy's BLAS uses its own thread count (OMP/OPENBLAS_NUM_THREADS); torch's is set to `threads`.
    On `device="cuda"` only torch is measured, on the GPU, in float32 (TF32 off).
    """
    out: dict = {"sizes": list(sizes), "device": device}
    rng = np.random.default_rng(0)
    if device == "cpu":
        best = 0.0
        for n in sizes:
            a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
            best = max(best, _best_gflops(lambda: a @ b, n, duration_s))
        out["numpy_gflops"] = best
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        best = 0.0
        for n in sizes:
            a = torch.from_numpy(rng.random((n, n), dtype=np.float32)).to(device)
            b = torch.from_numpy(rng.random((n, n), dtype=np.float32)).to(device)
            if device == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = False

                def mm():
                    torch.mm(a, b)
                    torch.cuda.synchronize()
            else:

                def mm():
                    torch.mm(a, b)

            best = max(best, _best_gflops(mm, n, duration_s))
        out["torch_gflops"] = best
        out["torch_threads"] = torch.get_num_threads()
        torch.set_num_threads(previous)
    out["gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
    return out
