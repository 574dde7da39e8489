"""The GPU run: prove onnxruntime's CUDA provider really runs the models, then run the suite with CUDA.

    python -m attnrec.benchmarks.gpu [--provider cuda] [--quick] [--stages model,retrieval,e2e] [--out DIR] ...

(benchmarks/gpu.sh installs the carried wheels on a lent GPU machine and calls this.) Before
any timing, each model (the SASRec encoder and the synthetic ranker, exported here) is run
once in a profiling session; the run fails unless the session's first provider is the
requested one and every matrix product (MatMul / Gemm and their fusions) ran on it, so a
silent fallback to the CPU cannot pass for a GPU number. The placement table is the report's
`provider` section; the stages then run with `--provider` as usual. With `--provider cpu` the
same code runs on any machine (the test suite does this).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from . import cli

# The e2e stage too: the whole served path (IO-bound sessions, FAISS on the GPU when its build has one).
# Not the peer stage: MLServer's environment needs the package index, which a lent machine cannot reach.
DEFAULT_STAGES = "model,retrieval,e2e"
COMPUTE_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulNBits", "Attention", "MultiHeadAttention")


class ProviderFallback(RuntimeError):
    """The model's compute did not run on the requested execution provider."""


def placement(onnx_path: Path, feeds: dict, providers: tuple[str, ...], threads: int = 0) -> dict:
    """Run `onnx_path` once with profiling; per provider, the nodes, their op types and their time."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort_profile")  # never in the working tree
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=list(providers))
        names = [i.name for i in session.get_inputs()]
        session.run(None, {n: feeds[n] for n in names})
        events = json.loads(Path(session.end_profiling()).read_text())
        session_providers = session.get_providers()
    by_provider: dict[str, dict] = defaultdict(lambda: {"nodes": 0, "us": 0, "ops": defaultdict(int)})
    for e in events:
        args = e.get("args", {})
        if e.get("cat") != "Node" or "provider" not in args or not e.get("name", "").endswith("_kernel_time"):
            continue
        slot = by_provider[args["provider"]]
        slot["nodes"] += 1
        slot["us"] += int(e.get("dur", 0))
        slot["ops"][args.get("op_name", "?")] += 1
    return {
        "session_providers": session_providers,
        "by_provider": {p: {**v, "ops": dict(v["ops"])} for p, v in by_provider.items()},
    }


def check_placement(name: str, result: dict, provider: str) -> None:
    """Raise ProviderFallback unless the session leads with `provider` and every compute op ran there."""
    if result["session_providers"][0] != provider:
        raise ProviderFallback(f"{name}: session providers {result['session_providers']}, wanted {provider} first")
    elsewhere = {
        p: [op for op in v["ops"] if op in COMPUTE_OPS] for p, v in result["by_provider"].items() if p != provider
    }
    elsewhere = {p: ops for p, ops in elsewhere.items() if ops}
    if elsewhere:
        raise ProviderFallback(f"{name}: matrix products ran on {elsewhere}, not on {provider}")
    if not any(op in COMPUTE_OPS for op in result["by_provider"].get(provider, {}).get("ops", {})):
        raise ProviderFallback(f"{name}: no matrix product ran on {provider}: {result['by_provider']}")


def provider_section(report, settings) -> None:
    """The `provider` section: where each model's nodes ran; raises ProviderFallback on a CPU fallback."""
    import numpy as np
    import torch

    from attnrec.export.config import SASRecConfig
    from attnrec.export.model import SASRec
    from attnrec.export.onnx_export import export_encoder

    from .stages.model import N_CANDIDATES, RANKER_MLP, shape_for
    from .synthetic_ranker import TargetAttentionRanker, export_ranker

    section = report.section("provider", f"Execution provider check: {settings.providers[0]}")
    work = Path(settings.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    cfg = SASRecConfig(**shape_for(settings))
    models = {
        "encoder": export_encoder(SASRec(cfg), work / "check-encoder.onnx"),
        "ranker (synthetic)": export_ranker(
            TargetAttentionRanker(cfg.n_items, cfg.dim, cfg.max_len, RANKER_MLP), work / "check-ranker.onnx"
        ),
    }
    rng = np.random.default_rng(0)
    length = min(50, cfg.max_len)
    feeds = {
        "history": rng.integers(1, cfg.n_items + 1, size=(8, length), dtype=np.int64),
        "candidates": rng.integers(1, cfg.n_items + 1, size=(8, N_CANDIDATES), dtype=np.int64),
        "candidate_scores": rng.standard_normal((8, N_CANDIDATES), dtype=np.float32),
    }
    rows, data = [], {}
    for name, path in models.items():
        result = placement(path, feeds, settings.providers, settings.threads)
        data[name] = result
        for prov, v in sorted(result["by_provider"].items()):
            ops = ", ".join(f"{op}×{c}" for op, c in sorted(v["ops"].items()))
            rows.append([name, prov, v["nodes"], v["us"], ops])
        check_placement(name, result, settings.providers[0])
        settings.progress(
            "provider", f"{name}: compute on {settings.providers[0]} (session {result['session_providers']})"
        )
    section.data["placement"] = data
    section.note(
        f"One profiled run per model (batch 8, history {length}). Passed: the session leads with the requested "
        "provider "
        f"and every matrix product ({', '.join(COMPUTE_OPS)}) ran on it; shape and cast nodes may run on the CPU."
    )
    section.table("Node placement (onnxruntime profiler)", ["model", "provider", "nodes", "µs", "ops"], rows)


def preload_cuda() -> None:
    """Load CUDA/cuDNN libraries for onnxruntime-gpu (from the machine's PyTorch install) before sessions."""
    try:
        import torch  # noqa: F401  (its CUDA libraries are the ones preload_dlls finds)
    except ImportError:
        pass
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnrec.benchmarks.gpu", description=__doc__.split("\n\n")[0])
    cli.add_arguments(p)
    p.set_defaults(provider="cuda", stages=DEFAULT_STAGES)
    args = p.parse_args(argv)
    if args.provider == "cuda":
        preload_cuda()
    return cli.run(args, prelude=provider_section)


if __name__ == "__main__":
    sys.exit(main())
