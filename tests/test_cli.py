"""The `attnrec` command tree: every flag documented, each command's module loaded only when it runs."""

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnrec.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """'<prog> <flag>' for every argument in the parser tree without help text."""
    missing = []
    for action in parser._actions:  # argparse has no public way to list a parser's arguments
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                missing += undocumented(sub)
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_the_help_walk_finds_a_flag_without_help():
    parser = argparse.ArgumentParser(prog="toy")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo")
    demo.add_argument("--out", help="working folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("name")
    assert undocumented(parser) == ["toy demo --seed", "toy demo name"]


def test_every_flag_of_every_command_has_help():
    assert undocumented(build_parser(COMMANDS)) == []


def test_each_command_is_defined_by_the_module_the_dispatcher_names():
    modules = {module for module, _ in COMMANDS.values()}
    for module in modules:
        defined = set(importlib.import_module(module).COMMANDS)
        assert defined == {name for name, (owner, _) in COMMANDS.items() if owner == module}, module
    assert COMMANDS["serve"][0].startswith("attnrec.engine.") and COMMANDS["bench"][0].startswith("attnrec.benchmarks.")


def _run(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # wide lines: rich wraps log messages at the terminal's width
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["query", "--help"]])
def test_help_loads_neither_torch_nor_the_offline_half_nor_the_benchmarks(argv):
    forbidden = ("torch", "onnx", "onnxruntime", "faiss", "attnrec.export", "attnrec.benchmarks")
    code = f"""
import sys
from attnrec.cli import main
try:
    main({argv!r})
except SystemExit as exc:
    assert exc.code == 0, exc.code
print("LOADED", sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in {forbidden!r})))
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "usage: attnrec" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "LOADED []"


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "log.csv", "--out", "repo", "--name", "m"],
        ["export", "--checkpoint", "c.pt", "--data", "log.csv", "--out", "repo", "--name", "m"],
        ["demo", "--out", "demo"],
    ],
    ids=lambda argv: argv[0],
)
def test_training_commands_name_the_extra_to_install_without_torch(argv, tmp_path):
    code = f"""
import sys
sys.modules["torch"] = None  # as in a core install: `import torch` raises ModuleNotFoundError
from attnrec.cli import main
sys.exit(main({["-q", *argv]!r}))
"""
    r = _run(code, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"attnrec {argv[0]} needs PyTorch: pip install 'attnrec[train]'" in r.stdout + r.stderr
    assert not list(tmp_path.iterdir())  # it stopped before doing anything


def test_a_missing_module_that_no_extra_installs_is_a_bug_not_a_hint(monkeypatch):
    from attnrec.engine import cli

    def broken(args):
        import attnrec_no_such_module  # noqa: F401

    monkeypatch.setattr(cli, "cmd_query", broken)
    with pytest.raises(ModuleNotFoundError, match="attnrec_no_such_module"):
        from attnrec.cli import main

        main(["query", "--server", "127.0.0.1:1"])
