"""Ray Serve as the peer server: its own virtual environment, attnrec's Pipeline in a `@serve.batch`
deployment behind Ray Serve's gRPC proxy, start/stop on free ports.

    python -m attnrec.benchmarks.peer.rayserve --setup                   # create .cache/rayserve-2.60.0 (minutes)
    python -m attnrec.benchmarks.peer.rayserve --check --version-dir V   # start it, Recommend calls, compare
    python -m attnrec.benchmarks.peer.rayserve --serve --version-dir V   # run until Ctrl-C

From code (the peer stage drives it with the same Recommend client as attnrec serve):

    with RayServe(version_dir, RayServeConfig(max_batch_size=32)) as server:
        server.grpc_address        # "127.0.0.1:PORT": attnrec.v1.Recommender/Recommend

Ray Serve lives in a virtual environment under .cache/ (ray[serve], onnxruntime and faiss-cpu at
the project's versions, and attnrec itself installed editable with --no-deps, so the deployment
imports `attnrec.engine` and our generated stubs, never torch). The deployment
(rayserve_app.py) runs in a Ray cluster of its own: one driver process started in its own process
group with its own Ray session folder; stop() asks it to shut Serve and Ray down, then ends its
process group and any process still naming that session folder (never another Ray on the host).
Ray Serve's gRPC proxy binds all interfaces (`[::]:PORT`, not configurable in Ray 2.60).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .mlserver import free_port, log_tail
from .venv import READY_MARK, create_venv

RAY_VERSION = "2.60.0"
DEFAULT_VENV = Path(".cache") / f"rayserve-{RAY_VERSION}"
APP_SCRIPT = Path(__file__).with_name("rayserve_app.py")
ROOT = Path(__file__).resolve().parents[2]  # the repository: installed editable into the environment
# What the deployment imports, at the versions the project runs (so both servers compute alike).
SAME_AS_PROJECT = ("onnxruntime", "faiss-cpu", "numpy", "grpcio", "protobuf")
# Ray starts a dozen processes (GCS, raylet, agents, Serve's controller, proxy, replica): seconds on an
# idle host, minutes on a loaded 2-core one.
START_TIMEOUT_S = 600.0
LABEL = "Ray Serve"  # its rows in the reports (gRPC ingress)


@dataclass(frozen=True)
class RayServeConfig:
    max_batch_size: int = 32  # @serve.batch max_batch_size
    batch_wait_s: float = 0.0  # @serve.batch batch_wait_timeout_s (0: take what is queued, as attnrec's batcher)
    max_ongoing_requests: int = 128  # per replica; Ray's default (5) would cap every batch at 5
    intra_op_threads: int = 0  # onnxruntime threads in the replica (0 = all cores)
    cpus: int = os.cpu_count() or 1  # Ray's CPUs, all given to the one replica


def venv_ready(venv: Path = DEFAULT_VENV) -> bool:
    mark = Path(venv) / READY_MARK
    if not mark.is_file() or not (Path(venv) / "bin" / "python").is_file():
        return False
    try:  # attnrec is installed editable from one checkout: another checkout needs its own setup
        return json.loads(mark.read_text()).get("attnrec_source") == str(ROOT)
    except (OSError, ValueError):
        return False


def ensure_venv(venv: Path = DEFAULT_VENV, *, log=print) -> Path:
    """Create Ray Serve's virtual environment once (pip from the package index); reuse it after."""
    venv = Path(venv)
    if venv_ready(venv):
        return venv
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in SAME_AS_PROJECT]
    log(f"creating {venv} with ray[serve]=={RAY_VERSION}, {', '.join(pins)} (a few minutes)")
    installs = [[f"ray[serve]=={RAY_VERSION}", *pins], ["--no-deps", "-e", str(ROOT)]]
    create_venv(venv, installs, {"ray": RAY_VERSION, "pins": pins, "attnrec_source": str(ROOT)})
    return venv


class RayServe:
    """One Ray Serve application serving the version at `version_dir`; a context manager that starts
    it and waits until a real Recommend call is answered."""

    def __init__(
        self,
        version_dir: Path | str,
        cfg: RayServeConfig = RayServeConfig(),
        *,
        venv: Path = DEFAULT_VENV,
        work_dir: Path | None = None,
    ) -> None:
        if not venv_ready(venv):
            raise FileNotFoundError(
                f"no Ray Serve environment at {venv} for {ROOT}: run python -m attnrec.benchmarks.peer.rayserve --setup"
            )
        self.version_dir, self.cfg, self.venv = Path(version_dir).resolve(), cfg, Path(venv).resolve()
        self.ports = {"grpc": free_port(), "http": free_port()}
        self.work_dir = Path(work_dir or Path(".cache") / "rayserve-run")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work_dir / f"rayserve-{self.ports['grpc']}.log"
        self.serve_logs = self.work_dir / f"rayserve-{self.ports['grpc']}-serve-logs"  # copied there by stop()
        self.temp_dir: str | None = None
        self.process: subprocess.Popen | None = None

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "RayServe":
        # Short: Ray puts Unix sockets under it (108-byte limit); unique, so stop() finds only its own.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-attnrec-", dir="/tmp")
        c = self.cfg
        cmd = [str(self.venv / "bin" / "python"), str(APP_SCRIPT), "--version-dir", str(self.version_dir)]
        cmd += ["--grpc-port", str(self.ports["grpc"]), "--http-port", str(self.ports["http"])]
        cmd += ["--temp-dir", self.temp_dir, "--max-batch-size", str(c.max_batch_size)]
        cmd += ["--batch-wait", str(c.batch_wait_s), "--max-ongoing", str(c.max_ongoing_requests)]
        cmd += ["--threads", str(c.intra_op_threads), "--cpus", str(c.cpus)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV", "PYTHONPATH"))}
        env.update(PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
        with open(self.log_path, "wb") as log:
            # Its own process group: stop() ends the driver and the Ray processes it started together.
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.work_dir, start_new_session=True
            )
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Until the driver says READY (serve.run returned) and a Recommend call is answered."""
        import grpc

        from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as pb
        from attnrec.engine.rpc.attnrec.v1 import recommender_pb2_grpc as pb_grpc

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Ray Serve's driver exited with {self.process.returncode}:\n{self.log_tail()}")
            if "READY" in log_tail(self.log_path, 5):
                break
            time.sleep(0.3)
        else:
            raise TimeoutError(f"Ray Serve not running after {timeout_s:.0f}s:\n{self.log_tail()}")
        last = None
        while time.monotonic() < deadline:
            try:
                with grpc.insecure_channel(self.grpc_address) as ch:
                    pb_grpc.RecommenderStub(ch).Recommend(pb.RecommendRequest(k=1), timeout=5)
                return
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.3)
        raise TimeoutError(
            f"Ray Serve's gRPC proxy answered no Recommend in {timeout_s:.0f}s ({last}):\n{self.log_tail()}"
        )

    def log_tail(self, n: int = 30) -> str:
        return log_tail(self.log_path, n) + f"\n(Serve's own logs: {self.serve_logs})"

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the driver (serve.shutdown, ray.shutdown), then SIGKILL to its process group and
        to any process left that names this server's Ray session folder."""
        if self.process is not None and self.process.poll() is None:
            pgid = os.getpgid(self.process.pid)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        if self.temp_dir is not None:
            for pid in _processes_naming(self.temp_dir):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            # Serve's own logs (controller, proxy, replica) outlive the session folder: what a failure shows.
            serve_logs = Path(self.temp_dir) / "session_latest" / "logs" / "serve"
            if serve_logs.is_dir():
                shutil.copytree(serve_logs, self.serve_logs, dirs_exist_ok=True)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> "RayServe":
        # `with server.start(timeout):` enters a server already started: never a second cluster
        return self if self.process is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _processes_naming(text: str) -> list[int]:
    """Pids whose command line contains `text` (Ray's services carry their session folder in theirs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def check(
    version_dir: Path,
    cfg: RayServeConfig = RayServeConfig(),
    *,
    venv: Path = DEFAULT_VENV,
    start_timeout_s: float = START_TIMEOUT_S,
    log=print,
) -> int:
    """Start Ray Serve on `version_dir` and compare its Recommend replies with Pipeline.recommend
    (compare_with_pipeline). Returns the replies compared; raises on a difference."""
    server = RayServe(version_dir, cfg, venv=venv)
    with server.start(start_timeout_s):
        log(f"Ray Serve ready at {server.grpc_address} (gRPC proxy)")
        n = compare_with_pipeline(server.grpc_address, version_dir)
    log(f"{n} Recommend replies equal Pipeline.recommend's (items exactly, scores within 1e-4)")
    return n


def compare_with_pipeline(address: str, version_dir: Path, k: int = 10) -> int:
    """Recommend calls to `address` (8 histories of 0 to max_len items, one at a time, then all at
    once so that they batch), each reply compared with `Pipeline.recommend` of the same history in
    this process: the same items in the same order, scores within 1e-4. Returns the replies compared;
    raises RuntimeError on a difference."""
    import concurrent.futures

    import grpc
    import numpy as np

    from attnrec.engine.pipeline import Pipeline, RuntimeOptions
    from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as pb
    from attnrec.engine.rpc.attnrec.v1 import recommender_pb2_grpc as pb_grpc

    pipeline = Pipeline.load(version_dir, RuntimeOptions(("CPUExecutionProvider",), faiss_gpu=False))
    keys = [str(x) for x in pipeline.item_ids.tolist()]
    rng = np.random.default_rng(0)
    sizes = (min(pipeline.max_len, pipeline.n_items), 1, 3, 7, 12, 20, 30, 0)
    histories = [rng.choice(pipeline.n_items, size=min(n, pipeline.n_items), replace=False) for n in sizes]
    want = [pipeline.recommend([h.astype(np.int64)], k) for h in histories]  # one at a time
    requests = [pb.RecommendRequest(history=[keys[r] for r in h], k=k) for h in histories]
    compared = 0
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        one_by_one = [stub.Recommend(r, timeout=30) for r in requests]
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:  # batched together, most likely
            at_once = list(pool.map(lambda r: stub.Recommend(r, timeout=30), requests))
    for replies in (one_by_one, at_once):
        for i, reply in enumerate(replies):
            rows = want[i].rows[0][want[i].rows[0] >= 0]
            expected = [keys[r] for r in rows]
            if list(reply.items) != expected:
                raise RuntimeError(f"history {i}: Ray Serve answered {list(reply.items)}, Pipeline {expected}")
            diff = np.abs(np.array(reply.scores) - want[i].scores[0][: len(rows)]).max(initial=0.0)
            if diff > 1e-4:
                raise RuntimeError(f"history {i}: scores differ from Pipeline.recommend's by {diff:.2e}")
            compared += 1
    return compared


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnrec.benchmarks.peer.rayserve", description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", action="store_true", help=f"create Ray Serve {RAY_VERSION}'s environment if absent")
    p.add_argument(
        "--check", action="store_true", help="start Ray Serve, compare Recommend replies with Pipeline.recommend"
    )
    p.add_argument("--serve", action="store_true", help="start Ray Serve and wait for Ctrl-C")
    p.add_argument(
        "--version-dir",
        type=Path,
        help="published version folder to serve (default: the peer stage's cached bench model, built if absent)",
    )
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"environment folder (default: {DEFAULT_VENV})")
    p.add_argument("--max-batch-size", type=int, default=32, help="@serve.batch max_batch_size (32)")
    p.add_argument("--batch-wait", type=float, default=0.0, help="@serve.batch batch_wait_timeout_s, seconds (0)")
    p.add_argument("--max-ongoing", type=int, default=128, help="deployment max_ongoing_requests (128)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads in the replica (0: all)")
    p.add_argument(
        "--timeout",
        type=float,
        default=START_TIMEOUT_S,
        help=f"seconds to wait for Ray Serve to start ({START_TIMEOUT_S:g})",
    )
    args = p.parse_args(argv)
    cfg = RayServeConfig(
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait,
        max_ongoing_requests=args.max_ongoing,
        intra_op_threads=args.threads,
    )
    if args.setup or args.check or args.serve:
        ensure_venv(args.venv)
    version_dir = args.version_dir
    if version_dir is None and (args.check or args.serve):
        from ..bench_models import bench_version
        from ..settings import Settings

        version_dir = bench_version(Settings(), "peer").path
    if args.check:
        n = check(version_dir, cfg, venv=args.venv, start_timeout_s=args.timeout)
        print(f"OK: Ray Serve {RAY_VERSION} answers Recommend through its gRPC proxy; {n} replies as in-process")
    if args.serve:
        server = RayServe(version_dir, cfg, venv=args.venv)
        with server.start(args.timeout):
            print(f"serving {version_dir} at {server.grpc_address} (Recommend); Ctrl-C stops", flush=True)
            try:
                server.process.wait()
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
