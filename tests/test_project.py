"""Project-level promises: CI runs the README's test command; the serving half stays torch-free."""

import ast
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


@pytest.mark.parametrize(
    "half, forbidden",
    [
        ("engine", {"torch", "onnx", "attnrec.export", "attnrec.benchmarks"}),
        ("export", {"attnrec.benchmarks"}),  # the benchmarks import the offline half, never the other way
    ],
)
def test_a_half_never_imports_what_it_must_not(half, forbidden):
    for path in (ROOT / half).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                # a relative import that climbs out of engine/ (`from ..export import x`) counts too
                names = [node.module or ""] if node.level < 2 else ["attnrec." + (node.module or "")]
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), f"{path}: imports {name}"


def test_code_passes_ruff():
    ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).parent / "ruff")
    if not pathlib.Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the test extra)")
    dirs = ["attnrec", "engine", "export", "tests", "benchmarks"]
    for args in (["check"], ["format", "--check"]):
        result = subprocess.run([ruff, *args, *dirs], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_generated_grpc_stubs_match_their_proto_sources():
    from attnrec.engine.rpc.regenerate import stale

    assert stale() == [], "run: python -m attnrec.engine.rpc.regenerate"


def test_generated_stubs_import_without_protobuf_version_warnings():
    import importlib
    import warnings

    root = pathlib.Path(__file__).resolve().parent.parent
    for path in sorted((root / "engine" / "rpc").rglob("*_pb2*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            importlib.import_module(module)
