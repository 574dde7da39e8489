"""Seldon MLServer as the peer server: its own virtual environment, a model folder, start/stop on free ports.

    python -m attnrec.benchmarks.peer.mlserver --setup           # create .cache/mlserver-1.7.1 (about a minute)
    python -m attnrec.benchmarks.peer.mlserver --check           # start it, one V2 ModelInfer, compare with ORT
    python -m attnrec.benchmarks.peer.mlserver --serve --onnx encoder.onnx   # run until Ctrl-C

From code (the end-to-end stage drives it with the same V2 client as attnrec's ModelInfer):

    with MLServer(onnx_path, MLServerConfig(max_batch_size=32, max_batch_time_s=0.002)) as server:
        server.grpc_address        # "127.0.0.1:PORT" for tritonclient.grpc
        server.model_name          # "encoder"

MLServer lives in a virtual environment under .cache/ so that its pins (pydantic, fastapi,
protobuf, ...) never touch the project's environment. The runtime (mlserver_runtime.py)
wraps onnxruntime, the same version as the project's, and MLServer's adaptive batching is on.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .venv import READY_MARK, create_venv

MLSERVER_VERSION = "1.7.1"
DEFAULT_VENV = Path(".cache") / f"mlserver-{MLSERVER_VERSION}"
RUNTIME = Path(__file__).with_name("mlserver_runtime.py")
# MLServer 1.7.1 (June 2025) predates uvloop 0.22, whose asyncio.get_event_loop() raises in MLServer's
# inference worker processes ("There is no current event loop"): every model then fails to load.
PINS = ("uvloop<0.22",)


@dataclass(frozen=True)
class MLServerConfig:
    model_name: str = "encoder"
    max_batch_size: int = 32  # adaptive batching: up to this many requests per predict call
    max_batch_time_s: float = 0.002  # ... waiting at most this long for them
    parallel_workers: int = 1  # MLServer's inference worker processes (its default)
    intra_op_threads: int = 0  # onnxruntime threads in the runtime (0 = all cores)
    host: str = "127.0.0.1"


def venv_ready(venv: Path = DEFAULT_VENV) -> bool:
    return (venv / READY_MARK).is_file() and (venv / "bin" / "mlserver").is_file()


def ensure_venv(venv: Path = DEFAULT_VENV, *, log=print) -> Path:
    """Create MLServer's virtual environment once (pip from the package index); reuse it after."""
    venv = Path(venv)
    if venv_ready(venv):
        return venv
    ort_version = importlib.metadata.version("onnxruntime")
    log(f"creating {venv} with mlserver=={MLSERVER_VERSION}, onnxruntime=={ort_version} (about a minute)")
    installs = [[f"mlserver=={MLSERVER_VERSION}", f"onnxruntime=={ort_version}", *PINS]]
    create_venv(venv, installs, {"mlserver": MLSERVER_VERSION, "onnxruntime": ort_version})
    return venv


def log_tail(path: Path, n: int = 30) -> str:
    """The last n lines of a server's log ("" when there is none yet): what an error message shows."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_model_folder(root: Path, onnx_path: Path, cfg: MLServerConfig, ports: dict[str, int]) -> Path:
    """MLServer's settings.json + <model>/model-settings.json + the runtime module, under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    server = {
        "debug": False,
        "host": cfg.host,
        "http_port": ports["http"],
        "grpc_port": ports["grpc"],
        "metrics_port": ports["metrics"],
        "parallel_workers": cfg.parallel_workers,
        "load_models_at_startup": True,
    }
    (root / "settings.json").write_text(json.dumps(server, indent=1))
    model_dir = root / cfg.model_name
    model_dir.mkdir(exist_ok=True)
    shutil.copy(RUNTIME, model_dir / RUNTIME.name)
    model = {
        "name": cfg.model_name,
        "implementation": f"{RUNTIME.stem}.OnnxEncoderRuntime",
        "max_batch_size": cfg.max_batch_size,
        "max_batch_time": cfg.max_batch_time_s,
        "parameters": {"uri": str(Path(onnx_path).resolve()), "extra": {"intra_op_threads": cfg.intra_op_threads}},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model, indent=1))
    return root


class MLServer:
    """One MLServer process serving `onnx_path`; a context manager that starts it and waits until ready."""

    def __init__(
        self,
        onnx_path: Path | str,
        cfg: MLServerConfig = MLServerConfig(),
        *,
        venv: Path = DEFAULT_VENV,
        work_dir: Path | None = None,
    ) -> None:
        if not venv_ready(venv):
            raise FileNotFoundError(
                f"no MLServer environment at {venv}: run python -m attnrec.benchmarks.peer.mlserver --setup"
            )
        self.cfg, self.venv = cfg, Path(venv).resolve()
        self.ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        self.work_dir = Path(work_dir or Path(".cache") / "mlserver-run" / str(self.ports["grpc"]))
        write_model_folder(self.work_dir, Path(onnx_path), cfg, self.ports)
        self.log_path = self.work_dir / "mlserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def model_name(self) -> str:
        return self.cfg.model_name

    @property
    def grpc_address(self) -> str:
        return f"{self.cfg.host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{self.cfg.host}:{self.ports['http']}"

    def start(self, timeout_s: float = 120.0) -> "MLServer":
        log = open(self.log_path, "wb")
        # Its own process group, so stop() ends the server and its inference workers together.
        # cwd = the work folder: MLServer writes .metrics/.envs folders where it runs.
        self.process = subprocess.Popen(
            [str(self.venv / "bin" / "mlserver"), "start", "."],
            cwd=self.work_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        url = f"{self.http_url}/v2/models/{self.model_name}/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"MLServer exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"MLServer not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        return log_tail(self.log_path, n)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "MLServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def infer(address: str, model_name: str, tokens, output: str = "query"):
    """One V2 ModelInfer call with tritonclient.grpc: (B, L) int64 tokens → the named output."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    try:
        inp = grpcclient.InferInput("history", list(tokens.shape), "INT64")
        inp.set_data_from_numpy(tokens)
        result = client.infer(model_name, [inp], outputs=[grpcclient.InferRequestedOutput(output)])
        return result.as_numpy(output)
    finally:
        client.close()


def check(
    onnx_path: Path,
    cfg: MLServerConfig = MLServerConfig(),
    *,
    venv: Path = DEFAULT_VENV,
    n_items: int = 1000,
    length: int = 50,
    log=print,
) -> float:
    """Start MLServer, send V2 ModelInfer calls (one history, then a batch of 4; tokens 1..n_items), and
    compare with onnxruntime in this process. Returns the largest |difference|; raises if above 1e-5."""
    import numpy as np

    from attnrec.engine.encoder import make_session

    session = make_session(onnx_path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    with MLServer(onnx_path, cfg, venv=venv) as server:
        log(f"MLServer ready at {server.grpc_address} (gRPC), {server.http_url} (HTTP)")
        for batch in (1, 4):
            tokens = rng.integers(1, n_items + 1, size=(batch, length), dtype=np.int64)
            got = infer(server.grpc_address, server.model_name, tokens)
            want = session.run(["query"], {"history": tokens})[0]
            diff = float(np.abs(got - want).max())
            log(f"batch {batch}: V2 ModelInfer output {got.shape}, max |MLServer - onnxruntime| = {diff:.2e}")
            worst = max(worst, diff)
    if worst > 1e-5:
        raise RuntimeError(f"MLServer's answers differ from onnxruntime's by {worst:.2e}")
    return worst


def _synthetic_encoder(work: Path) -> Path:
    """The reference-shape SASRec encoder (random weights), exported for the check."""
    import torch

    from attnrec.export.config import SASRecConfig
    from attnrec.export.model import SASRec
    from attnrec.export.onnx_export import export_encoder

    from ..stages.model import REFERENCE_SHAPE

    torch.manual_seed(0)
    work.mkdir(parents=True, exist_ok=True)
    return export_encoder(SASRec(SASRecConfig(**REFERENCE_SHAPE)), work / "encoder.onnx")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnrec.benchmarks.peer.mlserver", description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", action="store_true", help=f"create MLServer {MLSERVER_VERSION}'s environment if absent")
    p.add_argument(
        "--check", action="store_true", help="start MLServer, compare V2 ModelInfer answers with onnxruntime"
    )
    p.add_argument("--serve", action="store_true", help="start MLServer and wait for Ctrl-C")
    p.add_argument("--onnx", type=Path, help="encoder ONNX (default: a synthetic reference-shape SASRec encoder)")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"environment folder (default: {DEFAULT_VENV})")
    p.add_argument("--max-batch-size", type=int, default=32, help="adaptive batching: requests per batch (32)")
    p.add_argument("--max-batch-time", type=float, default=0.002, help="adaptive batching: max wait, seconds (0.002)")
    p.add_argument("--workers", type=int, default=1, help="MLServer parallel_workers (default: 1)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads in the runtime (0: all)")
    args = p.parse_args(argv)
    cfg = MLServerConfig(
        max_batch_size=args.max_batch_size,
        max_batch_time_s=args.max_batch_time,
        parallel_workers=args.workers,
        intra_op_threads=args.threads,
    )
    if args.setup or args.check or args.serve:
        ensure_venv(args.venv)
    onnx_path = args.onnx or (_synthetic_encoder(Path(".cache/bench")) if (args.check or args.serve) else None)
    if args.check:
        worst = check(onnx_path, cfg, venv=args.venv)
        print(f"OK: MLServer {MLSERVER_VERSION} answers V2 ModelInfer; max |difference| {worst:.2e}")
    if args.serve:
        with MLServer(onnx_path, cfg, venv=args.venv) as server:
            print(f"serving {onnx_path} as {server.model_name!r} at {server.grpc_address}; Ctrl-C stops", flush=True)
            try:
                server.process.wait()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
