"""The server processes the e2e and peer stages measure: attnrec serve, the echo floor, the naive baseline.

Each is a subprocess (its own interpreter and cores' worth of threads), started on free ports and
stopped with SIGTERM (then SIGKILL); its log goes to a file under the work folder, quoted when
it fails to start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .peer.mlserver import free_port, log_tail


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen
    address: str
    log_path: Path
    metrics_url: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, n: int = 30) -> str:
        return log_tail(self.log_path, n)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(name: str, cmd: list[str], log_dir: Path, env_extra: dict | None = None) -> tuple[subprocess.Popen, Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, log_path


def wait_ready(server: ServerProcess, timeout_s: float = 300.0, *, health: bool = True) -> ServerProcess:
    """Until the health check says SERVING (or, without health, the port accepts a channel)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with grpc.insecure_channel(server.address) as ch:
                if not health:
                    grpc.channel_ready_future(ch).result(1)
                    return server
                req = health_pb2.HealthCheckRequest()
                status = health_pb2_grpc.HealthStub(ch).Check(req, timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return server
        except (grpc.RpcError, grpc.FutureTimeoutError):
            pass
        time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"{server.name} not ready after {timeout_s:.0f}s:\n{server.log_tail()}")


def attnrec_serve(
    repo: Path,
    model: str,
    log_dir: Path,
    *,
    threads: int = 0,
    max_batch_size: int = 32,
    providers: tuple[str, ...] = (),
    workers: int = 1,
    max_queue_delay_us: int = 0,
) -> ServerProcess:
    """`attnrec serve` on free ports, metrics on; ready once warmed up (every worker, with `workers` > 1).
    `max_queue_delay_us`: its batching window (`--max-queue-delay-us`; 0, the default, takes what is queued)."""
    port, metrics = free_port(), free_port()
    cmd = [sys.executable, "-m", "attnrec", "-q", "serve", "--repo", str(repo), "--model", model]
    cmd += ["--address", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics)]
    cmd += ["--max-batch-size", str(max_batch_size), "--intra-op-threads", str(threads)]
    cmd += ["--history-store", f"file://{Path(log_dir).resolve() / f'history-{port}.sqlite'}"]
    cmd += ["--providers", ",".join(providers)] if providers else []
    cmd += ["--workers", str(workers)] if workers != 1 else []
    cmd += ["--max-queue-delay-us", str(max_queue_delay_us)] if max_queue_delay_us else []
    name = "attnrec-serve" if workers == 1 else f"attnrec-serve-{workers}w"
    name += f"-{max_queue_delay_us}us" if max_queue_delay_us else ""
    proc, log = _spawn(name, cmd, log_dir)
    server = ServerProcess("attnrec serve", proc, f"127.0.0.1:{port}", log, f"http://127.0.0.1:{metrics}/metrics")
    return wait_ready(server)


def echo_server(k: int, log_dir: Path) -> ServerProcess:
    port = free_port()
    code = f"from attnrec.benchmarks.loadgen import echo_server_main; echo_server_main({port}, {k})"
    proc, log = _spawn("echo", [sys.executable, "-c", code], log_dir)
    return wait_ready(ServerProcess("echo", proc, f"127.0.0.1:{port}", log), 60, health=False)


def naive_server(version_dir: Path, log_dir: Path, *, torch_weights: Path | None, threads: int = 0) -> ServerProcess:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "attnrec.benchmarks.naive_server",
        "--version-dir",
        str(version_dir),
        "--port",
        str(port),
    ]
    cmd += ["--threads", str(threads)] + (["--torch-weights", str(torch_weights)] if torch_weights else [])
    proc, log = _spawn("naive", cmd, log_dir)
    return wait_ready(ServerProcess("naive", proc, f"127.0.0.1:{port}", log), 180, health=False)
