"""The Ray Serve peer: attnrec's Pipeline in a `@serve.batch` deployment behind Ray Serve's own gRPC
proxy, answering a real Recommend over 127.0.0.1 exactly as Pipeline.recommend does in this process,
and leaving no process behind when stopped. Skipped without Ray Serve's environment (creating it
needs the package index and a few minutes)."""

import subprocess
import sys
from pathlib import Path

import pytest

from attnrec.benchmarks.peer import rayserve

ROOT = Path(__file__).resolve().parents[1]


def test_the_cli_documents_its_flags():
    out = subprocess.run(
        [sys.executable, "-m", "attnrec.benchmarks.peer.rayserve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for flag in ("--setup", "--check", "--serve", "--version-dir", "--venv", "--max-batch-size", "--batch-wait",
                 "--max-ongoing", "--threads", "--timeout"):  # fmt: skip
        assert flag in out


def test_no_environment_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--setup"):
        rayserve.RayServe(tmp_path, venv=tmp_path / "absent")


@pytest.mark.skipif(
    not rayserve.venv_ready(),
    reason=f"Ray Serve's own environment is absent ({rayserve.DEFAULT_VENV}; creating it needs the package index "
    "and a few minutes): python -m attnrec.benchmarks.peer.rayserve --setup",
)
def test_ray_serve_answers_recommend_like_the_pipeline_and_stops_cleanly(trained_repo, tmp_path):
    from attnrec.engine.repository import open_version

    _, repo = trained_repo
    version = max((p for p in (repo / "seq").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert open_version(version).files.ranker is not None  # encoder, FAISS and ranker, as the peer stage serves
    server = rayserve.RayServe(version, rayserve.RayServeConfig(intra_op_threads=1), work_dir=tmp_path)
    # Bounded: Ray's start (a dozen processes) is seconds on an idle machine, minutes on a loaded one.
    with server.start(timeout_s=rayserve.START_TIMEOUT_S):
        session = server.temp_dir
        assert rayserve._processes_naming(session)  # Ray's own processes carry the session folder
        assert rayserve.compare_with_pipeline(server.grpc_address, version) == 16
    assert server.process.poll() is not None
    assert rayserve._processes_naming(session) == []  # nothing of that Ray cluster is left running
