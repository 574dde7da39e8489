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
                # relative imports are resolved, so one that climbs out (`from ..export import x`) counts too
                package = ["attnrec", half, *path.parent.relative_to(ROOT / half).parts]
                base = package[: len(package) - node.level + 1] if node.level else []
                names = [".".join([*base, *([node.module] if node.module else [])])]
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
    # A fresh interpreter: in the suite's own process the stubs are already imported, so a
    # warnings-as-errors filter around the import would never see protobuf's version warning.
    root = pathlib.Path(__file__).resolve().parent.parent
    modules = [
        ".".join(("attnrec", *path.relative_to(root).with_suffix("").parts))
        for path in sorted((root / "engine" / "rpc").rglob("*_pb2*.py"))
    ]
    assert len(modules) >= 5, modules
    code = (
        "import importlib, sys\n"
        "for m in sys.argv[1:]:\n    importlib.import_module(m)\n"
        "print('imported', len(sys.argv) - 1)"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code, *modules], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"imported {len(modules)}"


def test_warnings_as_errors_subprocess_catches_a_warning():
    """The check above can fail: the same interpreter flags turn an import-time warning into an error."""
    code = "import warnings; warnings.warn('stale gencode', UserWarning)"
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "stale gencode" in result.stderr


def _declared_packages() -> tuple[list[str], dict[str, str]]:
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return conf["packages"], conf["package-dir"]


def test_pyproject_lists_every_package_folder():
    """setuptools takes the explicit package list: a new subpackage left out would be missing from the wheel."""
    packages, package_dir = _declared_packages()
    found = set()
    for name, folder in package_dir.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            if ".venv" in init.parts or "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name, *rel)))
    assert sorted(found) == sorted(packages)


def test_wheel_holds_only_the_attnrec_package(tmp_path):
    """One distribution, one import name: nothing but attnrec/ at the wheel's top level."""
    import zipfile

    # From a copy of the tracked files: setuptools reuses a checkout's build/ folder, where a removed
    # module would live on, and the wheel must show what a clean clone builds.
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    src = tmp_path / "src"
    for rel in filter(None, tracked.decode().split("\0")):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    result = subprocess.run([*pip, str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("attnrec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"attnrec"}, top
    for module in (
        "engine/pipeline.py",
        "export/train.py",
        "benchmarks/cli.py",
        "engine/rpc/attnrec/v1/recommender_pb2.py",
    ):
        assert f"attnrec/{module}" in names
    assert not any(n.startswith("attnrec/tests/") for n in names)


# Run in a fresh interpreter where torch, onnx and the offline half cannot be imported at all:
# what a serving host with only the core install sees.
_BLOCK_OFFLINE = """
import importlib, importlib.abc, pkgutil, sys
BLOCKED = tuple(sys.argv[1:])
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is not installed on a serving host")
sys.meta_path.insert(0, Block())
"""


def _import_all_in_fresh_interpreter(package: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    code = _BLOCK_OFFLINE + (
        f"import {package} as pkg\n"
        f"names = [m.name for m in pkgutil.walk_packages(pkg.__path__, '{package}.')]\n"
        "for n in names:\n    importlib.import_module(n)\n"
        "print(len(names))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *blocked], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_engine_module_imports_without_torch_or_the_offline_half():
    result = _import_all_in_fresh_interpreter(
        "attnrec.engine", ("torch", "onnx", "attnrec.export", "attnrec.benchmarks")
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) >= 20  # every module was walked, not none


def test_the_import_block_catches_a_module_that_needs_torch():
    result = _import_all_in_fresh_interpreter("attnrec.export", ("torch",))
    assert result.returncode != 0 and "torch is not installed on a serving host" in result.stderr


def _arguments_without_help(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            if not any(k.arg == "help" for k in node.keywords) and not any(k.arg is None for k in node.keywords):
                found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_every_command_line_flag_in_the_package_has_help():
    """Beyond `attnrec`'s own parser (tests/test_cli.py): the scripts run as `python -m attnrec.…` too."""
    missing = []
    for half in ("attnrec", "engine", "export", "benchmarks"):
        for path in (ROOT / half).rglob("*.py"):
            missing += [f"{path.relative_to(ROOT)} {m}" for m in _arguments_without_help(path.read_text())]
    assert missing == []
    assert _arguments_without_help("p.add_argument('--port', type=int)\np.add_argument('-x', help='y')") == [
        "line 1: p.add_argument('--port', type=int)"
    ]
