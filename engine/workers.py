"""`attnrec serve --workers N`: N server processes on one port, one metrics endpoint, one drain.

One Python process is one event loop and one GIL: past a core's worth of request handling, more cores
need more processes. `supervise` (the `attnrec serve` process) starts N workers (multiprocessing,
spawn), each a full `Server` (engine/server.py) with its own ONNX sessions, FAISS index and batchers,
all listening on the same port with SO_REUSEPORT, so the kernel spreads connections over them.

- Health: each worker warms up, tells the supervisor, and waits; when all N are warm the supervisor
  releases them and they report SERVING together (a health check reaches any one worker).
- Metrics: the workers run prometheus-client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR, a
  temporary folder) and count Triton's statistics into the same folder (engine/model_stats.py); the
  supervisor alone serves --metrics-port (on --metrics-address), merging them, so a scrape sees the whole server, and
  ModelStatistics from any worker reports the whole server too.
- Hot swap: every worker polls (--poll-interval) and loads on its own; a swap, load or unload that one
  worker makes (ReloadModel, KServe's repository API, polling) is announced through the supervisor
  to the others, which follow.
- Drain: SIGTERM/SIGINT to the supervisor goes to every worker at once; each reports NOT_SERVING, waits
  --shutdown-delay, refuses new RPCs and lets in-flight ones finish within --grace. Exit status 0 when
  all drained cleanly. A worker that dies on its own takes the server down (status 1): an orchestrator
  restarts it whole, rather than it running short of a worker unnoticed.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from pathlib import Path

from .settings import ServerSettings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode reads it at import


# ── the supervisor ────────────────────────────────────────────────────────────────────────────
def reserve_port(address: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound (never listening) with SO_REUSEPORT to `port` (0: a free one): it holds the port
    for the workers, which bind it too; the kernel gives connections only to listening sockets."""
    host = address.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if host == "localhost":  # gRPC binds both loopbacks; holding one is enough to keep the port
        host, family = "127.0.0.1", socket.AF_INET
    elif host == "":
        host, family = "::", socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock, sock.getsockname()[1]


def merged_exposition(folder: Path) -> bytes:
    """The workers' metrics, merged: prometheus-client's multiprocess files and Triton's families."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from . import triton_metrics
    from .model_stats import read_shared

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    return generate_latest(registry) + triton_metrics.exposition(read_shared(folder))


class _Worker:
    def __init__(self, index: int, process, conn: Connection) -> None:
        self.index, self.process, self.conn = index, process, conn
        self.warm = False
        self.exited = False


def supervise(settings: ServerSettings) -> int:
    """Run `settings.worker_count` workers until SIGTERM/SIGINT; 0 after every worker drained cleanly."""
    from .errors import StartupError
    from .server import check_ports, choose_model

    n = settings.worker_count
    # What one server refuses before anything binds (a missing repository or model, a port in use) the
    # supervisor refuses once, in one line, instead of N workers failing each.
    model = choose_model(settings.repo, settings.model)
    check_ports(settings)
    try:
        reserved, port = reserve_port(settings.address, settings.port)
    except OSError as exc:
        raise StartupError(f"--port {settings.port}: could not listen on {settings.address}: {exc}") from None
    folder = Path(tempfile.mkdtemp(prefix="attnrec-workers-"))
    os.environ[MULTIPROC_ENV] = str(folder)  # before the workers start: they import prometheus-client fresh
    # Every other setting (history store, model control and its tokens, TLS, drain timings) goes as it is.
    worker_settings = replace(settings, model=model, port=port, metrics_port=0, workers="1")
    ctx = mp.get_context("spawn")  # fresh interpreters: no inherited gRPC or onnxruntime threads
    level = logging.getLogger().getEffectiveLevel()
    workers: list[_Worker] = []
    stopping = {"why": None}

    def stop(signum, _frame) -> None:
        if stopping["why"] is None:
            stopping["why"] = signal.Signals(signum).name
            log.info("%s: draining all %d workers", stopping["why"], n)
            for w in workers:
                if not w.exited and w.process.pid:
                    os.kill(w.process.pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    metrics = None
    status = 0
    try:
        if settings.metrics_port:
            from .telemetry import serve_metrics

            host = settings.metrics_host
            try:
                metrics = serve_metrics(settings.metrics_port, host, lambda: merged_exposition(folder))
            except OSError as exc:
                raise StartupError(f"--metrics-port {settings.metrics_port}: could not listen on {host}: {exc}")
            log.info("metrics of all workers on http://%s:%d/metrics", host, settings.metrics_port)
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(worker_settings, i, child, str(folder), level), daemon=False)
            p.start()
            child.close()
            workers.append(_Worker(i, p, parent))
        log.info("%d workers starting on port %d (SO_REUSEPORT); health SERVING once all are warm", n, port)
        status = _supervise_loop(workers, settings, stopping, stop)
    finally:
        for w in workers:  # whatever happened: no worker outlives the supervisor
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        reserved.close()
        shutil.rmtree(folder, ignore_errors=True)
    return status


def _supervise_loop(workers: list[_Worker], settings: ServerSettings, stopping: dict, stop) -> int:
    from prometheus_client.multiprocess import mark_process_dead

    n, status, deadline, released = len(workers), 0, None, False
    while not all(w.exited for w in workers):
        if stopping["why"] is not None and deadline is None:
            deadline = time.monotonic() + settings.shutdown_delay + settings.grace + 30
        if deadline is not None and time.monotonic() > deadline:
            log.error("workers still running %.0fs after the drain began: killing them", settings.grace + 30)
            for w in workers:
                if not w.exited:
                    w.process.kill()
            status = 1
            deadline = float("inf")
        live = [w for w in workers if not w.exited]
        ready = wait([w.conn for w in live] + [w.process.sentinel for w in live], timeout=0.5)
        for w in live:
            if w.conn in ready:
                _relay(w, workers)
            if w.process.sentinel in ready or not w.process.is_alive():
                w.process.join()
                w.exited = True
                mark_process_dead(w.process.pid)
                code = w.process.exitcode
                if stopping["why"] is None:
                    log.error("worker %d (pid %d) exited with %s: stopping the server", w.index, w.process.pid, code)
                    status = 1
                    stop(signal.SIGTERM, None)
                elif code != 0:
                    log.error("worker %d did not drain cleanly (exit %s)", w.index, code)
                    status = 1
        if released or stopping["why"] is not None or not all(w.warm for w in workers):
            continue
        released = True
        for w in workers:
            try:
                w.conn.send(("serve",))
            except OSError:
                pass
        log.info("all %d workers warm: SERVING", n)
    return status


def _relay(w: _Worker, workers: list[_Worker]) -> None:
    """A message from worker `w`: it is warm, or it announced a swap/load/unload the others follow."""
    try:
        while w.conn.poll():
            msg = w.conn.recv()
            if msg[0] == "warm":
                w.warm = True
            elif msg[0] == "peer":
                log.info("worker %d: %s %s; the other workers follow", w.index, msg[1], msg[2])
                for other in workers:
                    if other is not w and not other.exited:
                        try:
                            other.conn.send(msg)
                        except OSError:
                            pass
    except (EOFError, OSError):
        pass  # it is exiting; its sentinel says so


# ── a worker ──────────────────────────────────────────────────────────────────────────────────
def worker_main(settings: ServerSettings, index: int, conn: Connection, folder: str, level: int) -> None:
    """The worker process (spawned): one Server on the shared port, linked to the supervisor by `conn`."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=level,
        format=f"worker {index}: %(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the supervisor, which drains us
    try:
        code = asyncio.run(_run_worker(settings, index, conn, Path(folder)))
    except Exception:
        logging.getLogger(__name__).exception("worker %d failed", index)
        code = 1
    raise SystemExit(code)


async def _run_worker(settings: ServerSettings, index: int, conn: Connection, folder: Path) -> int:
    from .server import Server

    class Worker(Server):
        reuse_port = True

        async def before_serving(self) -> None:
            await super().before_serving()
            for model in self.models.models():  # the serving version's statistics exist, at zero
                model.stats
            conn.send(("warm",))
            await released.wait()

    loop = asyncio.get_running_loop()
    released = asyncio.Event()
    server = Worker(settings)
    server.models.share_stats(folder)
    server.loader.announce = lambda event, name: conn.send(("peer", event, name))

    def readable() -> None:
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "serve":
                    released.set()
                elif msg[0] == "peer":
                    task = asyncio.ensure_future(server.loader.follow(msg[1], msg[2]))
                    task.add_done_callback(_log_failure)
        except (EOFError, OSError):  # the supervisor is gone: nobody would stop us, so drain now
            loop.remove_reader(conn.fileno())
            log.error("the supervisor went away: draining")
            released.set()
            server.stop()

    def terminate() -> None:  # the supervisor's SIGTERM, also while warming up or waiting for the others
        released.set()
        server.stop()

    loop.add_reader(conn.fileno(), readable)
    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        await server.start()
    except BaseException:
        await server.drain()
        raise
    return await server.wait(handle_signals=False)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("following another worker failed: %s", task.exception())
