"""`python -m attnrec.benchmarks` / `attnrec bench`: run the selected stages and write their reports.

Only the standard library is imported at the top; `attnrec bench` imports this module only when it runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("benchmarks/results")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import stages

    names = stages.available()
    p.add_argument(
        "--stages",
        default=",".join(names),
        help=f"comma-separated stages to run, in this order: {', '.join(names)} (default: all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small grids and short windows (the first run also builds and caches the trained bench models)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"report folder (default: {DEFAULT_OUT}); files are "
        "bench-<stage>-<date>.json (raw numbers + machine), .md (tables), .png (plots)",
    )
    p.add_argument(
        "--duration", type=float, help="measuring window per repeat of a point, seconds (default: 0.5; --quick 0.2)"
    )
    p.add_argument("--warmup", type=float, help="warm-up before each window, seconds (default: 0.2; --quick 0.05)")
    p.add_argument(
        "--repeats",
        type=int,
        help="windows per point; figures are their median with [min, max] (default: 3; --quick 2)",
    )
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op and torch threads (0: all cores)")
    p.add_argument(
        "--provider",
        choices=["cpu", "cuda"],
        default="cpu",
        help="onnxruntime execution provider and torch device (default: cpu)",
    )
    p.add_argument(
        "--model",
        type=Path,
        metavar="VERSION_DIR",
        help="a repository version (<repo>/<name>/<version>) whose encoder, ranker and item embeddings "
        "are measured besides the synthetic sizes (default: synthetic models and vectors only)",
    )
    p.add_argument("--date", help="date in the file names (default: today)")
    p.add_argument("--note", default="", help="a line recorded with the machine, e.g. 'machine shared with other jobs'")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(".cache/bench"),
        help="where synthetic models are exported (default: .cache/bench)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data and models (default: 0)")
    p.add_argument(
        "--no-peer-setup",
        action="store_true",
        help="the peer stage never creates a peer's environment (pip); a peer without one has its rows skipped",
    )
    p.add_argument(
        "--peers",
        default="mlserver,rayserve",
        help="the peer stage's peers, comma-separated: mlserver (encoder, V2 ModelInfer), rayserve (pipeline, "
        "Recommend) (default: both)",
    )
    p.add_argument("--tiny", action="store_true", help="the --quick code paths on tiny models and catalogues (tests)")


def settings_from(args: argparse.Namespace):
    from .settings import Settings
    from .timing import Method

    quick = args.quick or args.tiny
    method = Method(
        duration_s=args.duration if args.duration is not None else (0.2 if quick else 0.5),
        warmup_s=args.warmup if args.warmup is not None else (0.05 if quick else 0.2),
        repeats=args.repeats if args.repeats is not None else (2 if quick else 3),
    )
    return Settings(
        quick=quick,
        tiny=args.tiny,
        method=method,
        threads=args.threads,
        provider=args.provider,
        model_path=args.model,
        work_dir=args.work_dir,
        seed=args.seed,
        peer_setup=not args.no_peer_setup,
        peers=peers_from(args.peers),
    )


PEERS = ("mlserver", "rayserve")


def peers_from(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise SystemExit(f"--peers: unknown peer(s) {', '.join(unknown)} (known: {', '.join(PEERS)})")
    return names


def run(args: argparse.Namespace, prelude=None) -> int:
    """Run the stages named in args.stages; `prelude(report, settings)` may add sections first (benchmarks/gpu.py)."""
    from . import stages
    from .machine import machine_info
    from .report import Report

    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    modules = [(name, stages.load(name)) for name in names]  # unknown names fail before any work
    settings = settings_from(args)
    report = Report(args.out, settings=settings.to_dict(), machine=machine_info(args.note), date=args.date)
    settings.progress("bench", f"stages {', '.join(names)}; {'quick' if settings.quick else 'default'} suite")
    if prelude is not None:
        prelude(report, settings)
    failed = []
    for name, module in modules:
        section = report.section(name, module.TITLE)
        t = time.perf_counter()
        try:
            module.run(settings, section)
        except Exception as exc:  # noqa: BLE001 - a stage that fails must not lose the run
            failed.append(name)
            record_failure(section, exc)
            settings.progress(name, f"FAILED: {type(exc).__name__}: {exc}")
        section.wall_s = time.perf_counter() - t
        settings.progress(name, f"done in {section.wall_s:.1f}s")
    for path in report.write():
        settings.progress("bench", f"wrote {path}")
    if failed:
        settings.progress("bench", f"stages that failed (their reports say where): {', '.join(failed)}")
    return 1 if failed else 0


PARTIAL_COLUMNS = ("server", "load", "p50_ms", "p99_ms", "throughput_rps", "errors")


def record_failure(section, exc: BaseException) -> None:
    """A failed stage's report: the error and its traceback, and the rows it had measured
    (`section.data["points"]`, which stages fill as they go) as a table, when it had not written its own."""
    import traceback

    section.data["error"] = {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__),
    }
    section.note(f"**STAGE FAILED** — {type(exc).__name__}: {exc}. The rows below are what it measured before.")
    points = section.data.get("points") or []
    if points and not section.tables:
        keys = [k for k in PARTIAL_COLUMNS if any(k in p for p in points)]
        section.table("Partial rows (measured before the failure)", keys, [[p.get(k) for k in keys] for p in points])


def _bench(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run the benchmark stages (model: torch vs onnxruntime; retrieval: exact vs IVF/HNSW; ...) "
        "with warm-up, fixed windows and repeated points, and write bench-<stage>-<date>.{json,md,png}. "
        "Same as `python -m attnrec.benchmarks`."
    )
    add_arguments(p)
    p.set_defaults(func=run)


COMMANDS = {"bench": _bench}  # for attnrec/cli.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attnrec.benchmarks",
        description="attnrec's benchmark suite: latency and throughput per stage, as JSON, Markdown and PNG.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
