"""A peer's own virtual environment (MLServer's, Ray Serve's): created once from the package index, and
marked ready only when every install in it succeeded, so a broken half-built one is rebuilt next time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

READY_MARK = ".attnrec-ready"  # JSON: what was installed (each peer's venv_ready reads what it needs)


def create_venv(venv: Path, installs: list[list[str]], info: dict) -> None:
    """A fresh `venv` (what was there is removed), `pip install -q` of each argument list in turn, then the
    ready mark with `info`."""
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    for args in installs:
        subprocess.run([*pip, *args], check=True)
    (venv / READY_MARK).write_text(json.dumps(info) + "\n")
