"""The suite's gRPC load generator: client processes separate from the servers, closed and open loop.

    with ClientPool(RecommendTarget(address, requests), processes=1) as clients:
        point = run_point(clients, ClosedLoop(32), method, probe=ServerProbe(pid, metrics_url))
        point = run_point(clients, OpenLoop(500.0), method)

Method (the conventions of benchmarks/timing.py):
- Requests are built and serialised before timing, in the client process; the client runs in its
  own process(es) (multiprocessing, spawn), never in the measured server's, and reports its own
  CPU time, so a reader can see whether the client starved the server of cores.
- Each repeat of a point: a warm-up (unrecorded), then a fixed window. Every process aligns to the
  same CLOCK_MONOTONIC instants, so windows line up across processes and with the server probes.
  Closed loop: a request counts when it completes inside the window (throughput = completions /
  window). Open loop: a request counts when it is *scheduled* inside the window, and is followed
  to its end (up to DRAIN_S after the window; still running then = "unfinished").
- Closed loop: C callers each send their next request when their previous reply arrives.
- Open loop: a precomputed send schedule at a fixed rate (uniform gaps, or Poisson with
  `poisson=True`); latency runs from the *scheduled* send time, so a server that falls behind
  shows its queueing (no coordinated omission). Sends more than LATE_S behind schedule are
  counted as late; sends beyond `max_outstanding` in flight are dropped (counted, not sent).
- Server side (ServerProbe, read by the parent): CPU time of the server's process tree from
  /proc/<pid>/stat (utime + stime, children included: MLServer's workers) at the window's edges, per
  completed request; and, for attnrec, the Prometheus stage histograms' _sum/_count deltas, scraped
  in the warm-up and after the window's drain (a scrape stalls the server; see ServerProbe).
- The clients are told each window before its start (t0 − 50 ms), so an open loop's schedule starts
  on time instead of bursting its overdue part.
- Repeats → each figure's median with its [min, max] (`timing.aggregate`); errors by gRPC code summed.

Targets (pluggable; each builds its calls in the client process):
  RecommendTarget  attnrec.v1.Recommender/Recommend with pre-serialised requests (attnrec, echo, naive)
  V2Target         KServe V2 ModelInfer through tritonclient.grpc.aio (attnrec's `encoder`, MLServer)

The echo server (`echo_server`) is the floor: a bare grpc.aio server answering the same RPC
with a pre-built reply of the same size, no compute.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .timing import PERCENTILES, Method, aggregate

LATE_S = 0.001  # an open-loop send this far behind its schedule is "late"
DRAIN_S = 10.0  # open loop: how long after the window its requests may still complete
RECOMMEND = "/attnrec.v1.Recommender/Recommend"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ── targets ────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class RecommendTarget:
    """attnrec.v1 Recommend; `requests` are serialised RecommendRequest bytes (sent as they are).
    `connections` > 1: that many channels, each its own TCP connection, requests spread over them
    round-robin — what `attnrec serve --workers N` needs, since SO_REUSEPORT spreads connections,
    not requests, over its workers."""

    address: str
    requests: list[bytes]
    timeout_s: float = 30.0
    connections: int = 1

    async def open(self):
        import grpc

        options = [("grpc.use_local_subchannel_pool", 1)] if self.connections > 1 else []
        channels = [grpc.aio.insecure_channel(self.address, options=options) for _ in range(self.connections)]
        # No serializers: the pre-built bytes go out as they are and the reply is not parsed.
        calls = [channel.unary_unary(RECOMMEND) for channel in channels]
        reqs, timeout, n = self.requests, self.timeout_s, len(calls)

        async def send(i: int) -> None:
            await calls[i % n](reqs[i % len(reqs)], timeout=timeout)

        async def close() -> None:
            for channel in channels:
                await channel.close()

        return send, close


@dataclass(frozen=True)
class V2Target:
    """KServe V2 ModelInfer via tritonclient.grpc.aio: one INT64 `history` tensor (B, L) per request."""

    address: str
    model: str
    tokens: list[np.ndarray]  # one (B, L) int64 array per request
    output: str = "query"
    timeout_s: float = 30.0

    async def open(self):
        import tritonclient.grpc.aio as tc

        client = tc.InferenceServerClient(self.address)
        inputs = []
        for t in self.tokens:  # built before timing
            inp = tc.InferInput("history", list(t.shape), "INT64")
            inp.set_data_from_numpy(np.ascontiguousarray(t, dtype=np.int64))
            inputs.append([inp])
        outputs = [tc.InferRequestedOutput(self.output)]
        model, timeout = self.model, self.timeout_s

        async def send(i: int) -> None:
            await client.infer(model, inputs[i % len(inputs)], outputs=outputs, client_timeout=timeout)

        return send, client.close


def _code(exc: BaseException) -> str:
    """The gRPC status name of a failed call (grpc.aio and tritonclient errors alike)."""
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            code = code()
        except Exception:  # noqa: BLE001
            code = None
    if code is None and hasattr(exc, "status"):
        code = exc.status()
    name = getattr(code, "name", None) or (str(code) if code else type(exc).__name__)
    return name.replace("StatusCode.", "")


# ── load shapes ────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class ClosedLoop:
    concurrency: int

    @property
    def label(self) -> str:
        return f"c={self.concurrency}"


@dataclass(frozen=True)
class OpenLoop:
    rate: float  # requests/s over all client processes
    poisson: bool = False
    max_outstanding: int = 1024  # per process; beyond it a scheduled send is dropped
    seed: int = 0

    @property
    def label(self) -> str:
        return f"{self.rate:g}/s"


def schedule(load: OpenLoop, t0: float, end: float, process: int, processes: int) -> np.ndarray:
    """Send instants (monotonic seconds) of one process: every `processes`-th of the whole schedule."""
    n = int((end - t0) * load.rate) + 1
    if load.poisson:
        gaps = np.random.default_rng(load.seed).exponential(1.0 / load.rate, n)
        times = t0 + np.concatenate([[0.0], np.cumsum(gaps)[:-1]])
    else:
        times = t0 + np.arange(n) / load.rate
    return times[times < end][process::processes]


# ── the client process ─────────────────────────────────────────────────────────────────────
async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _run_closed(send, load: ClosedLoop, offset: int, stride: int, t0: float, ws: float, we: float) -> dict:
    lat: list[float] = []
    errors: Counter = Counter()
    await _sleep_until(t0)

    async def caller(j: int) -> None:
        n = offset + j * stride
        while True:
            t = time.monotonic()
            if t >= we:
                return
            try:
                await send(n)
                code = None
            except Exception as exc:  # noqa: BLE001 — every failure is counted by its status code
                code = _code(exc)
            done = time.monotonic()
            if ws <= done <= we:
                if code is None:
                    lat.append(done - t)
                else:
                    errors[code] += 1
            n += load.concurrency * stride

    await asyncio.gather(*(caller(j) for j in range(load.concurrency)))
    return {"latencies": lat, "errors": dict(errors)}


async def _run_open(send, load: OpenLoop, process: int, processes: int, t0: float, ws: float, we: float) -> dict:
    times = schedule(load, t0, we, process, processes)
    lat: list[float] = []
    errors: Counter = Counter()
    counts = {"sent": 0, "late": 0, "dropped": 0, "unfinished": 0}
    outstanding: set = set()

    async def one(i: int, due: float, in_window: bool) -> None:
        try:
            await send(i)
            code = None
        except Exception as exc:  # noqa: BLE001
            code = _code(exc)
        if not in_window:
            return
        if code is None:
            lat.append(time.monotonic() - due)  # from the scheduled instant: queueing behind a slow server shows
        else:
            errors[code] += 1

    for i, due in enumerate(times):
        await _sleep_until(due)
        in_window = ws <= due < we
        if len(outstanding) >= load.max_outstanding:
            counts["dropped"] += in_window
            continue
        if in_window:
            counts["sent"] += 1
            counts["late"] += time.monotonic() - due > LATE_S
        task = asyncio.ensure_future(one(i * processes + process, due, in_window))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
    # Requests scheduled inside the window are followed to their end (up to DRAIN_S after it).
    _, pending = await asyncio.wait(list(outstanding), timeout=max(0.0, we + DRAIN_S - time.monotonic()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    counts["unfinished"] = len(pending)
    return {"latencies": lat, "errors": dict(errors), **counts}


async def _client_loop(target, conn, process: int, processes: int) -> None:
    send, close = await target.open()
    try:
        try:  # connect and warm the channel before reporting ready
            await send(process)
        except Exception:  # noqa: BLE001 - a server that fails every call is measured so (0 req/s, its errors)
            pass
        conn.send(("ready", None))
        while True:
            msg = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            if msg is None:
                return
            load, t0, ws, we = msg
            cpu = asyncio.ensure_future(_cpu_window(ws, we))
            if isinstance(load, ClosedLoop):
                out = await _run_closed(send, load, process, processes, t0, ws, we)
            else:
                out = await _run_open(send, load, process, processes, t0, ws, we)
            out["client_cpu_s"] = await cpu
            conn.send(("result", out))
    finally:
        res = close()
        if asyncio.iscoroutine(res):
            await res


async def _cpu_window(ws: float, we: float) -> float:
    await _sleep_until(ws)
    a = os.times()
    await _sleep_until(we)
    b = os.times()
    return (b.user + b.system) - (a.user + a.system)


def _client_main(target, conn, process: int, processes: int) -> None:
    try:
        asyncio.run(_client_loop(target, conn, process, processes))
    except Exception as exc:  # noqa: BLE001 — reported to the parent, which raises
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ClientPool:
    """`processes` client processes holding open connections to one target; `run` drives one window."""

    def __init__(self, target, processes: int = 1, *, start_timeout_s: float = 60.0) -> None:
        self.target, self.processes, self.start_timeout_s = target, processes, start_timeout_s
        self._procs: list = []
        self._conns: list = []

    def __enter__(self) -> "ClientPool":
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited grpc state or threads
        for p in range(self.processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(self.target, child, p, self.processes), daemon=True)
            proc.start()
            self._procs.append(proc)
            self._conns.append(parent)
        for conn in self._conns:
            self._recv(conn, self.start_timeout_s)
        return self

    def _recv(self, conn, timeout: float):
        if not conn.poll(timeout):
            raise TimeoutError(f"load-generator process gave no answer in {timeout:.0f}s")
        kind, value = conn.recv()
        if kind == "error":
            raise RuntimeError(f"load-generator process failed: {value}")
        return value

    def __exit__(self, *exc: object) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join()


# ── the server side ────────────────────────────────────────────────────────────────────────
def process_tree_cpu_s(pid: int) -> float:
    """utime + stime (seconds) of `pid` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
        ppid, utime, stime = int(fields[1]), int(fields[11]), int(fields[12])
        stats[int(entry)] = (ppid, (utime + stime) / CLK_TCK)
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo += children.get(p, [])
    return total


def scrape_stages(url: str) -> dict[str, float]:
    """attnrec's stage histograms as {'<stage>_sum': s, '<stage>_count': n, 'batch_sum': ..., ...}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("attnrec_stage_seconds", "attnrec_batch_size"):
            continue
        for s in family.samples:
            if s.name.endswith(("_sum", "_count")):
                key = "batch" if family.name == "attnrec_batch_size" else s.labels["stage"]
                suffix = s.name.rsplit("_", 1)[1]
                out[f"{key}_{suffix}"] = out.get(f"{key}_{suffix}", 0.0) + s.value
    return out


STAGES = ("queue", "encoder", "search", "ranker", "total")


@dataclass
class ServerProbe:
    """What the parent reads around a window: the server's CPU time (at the window's edges) and, for
    attnrec, its stage metrics (before the window and after its drain).

    The two are read at different instants on purpose. A /proc read costs the server nothing, so CPU
    is read exactly at the window's edges. A Prometheus scrape is served by the server's own process
    and, under load, holds its interpreter for tens of ms (measured: 20-60 ms at 280-565 req/s), which
    delays every request then in flight; scraped at the window's start, that stall alone put the
    open-loop p99 at 100+ ms. So the stages are scraped in the warm-up, before the window, and once the
    window's requests have all completed: the stage means cover the window (plus the tail of its
    warm-up, under the same load) and no measured request waits behind a scrape."""

    pid: int | None = None
    metrics_url: str | None = None
    _cpu: float = field(default=0.0, init=False)
    _cpu_s: float | None = field(default=None, init=False)
    _stages: dict = field(default_factory=dict, init=False)

    def begin_stages(self) -> None:
        """In the warm-up: the stage metrics' starting values."""
        self._stages = scrape_stages(self.metrics_url) if self.metrics_url else {}

    def begin(self) -> None:
        """At the window's start: the server's CPU time."""
        self._cpu = process_tree_cpu_s(self.pid) if self.pid else 0.0

    def end(self) -> None:
        """At the window's end: the server's CPU time over the window."""
        self._cpu_s = process_tree_cpu_s(self.pid) - self._cpu if self.pid else None

    def results(self) -> dict[str, float]:
        """After the window's requests completed: server_cpu_s, and the mean of each stage (ms) and of
        the batch size since `begin_stages`."""
        out: dict[str, float] = {}
        if self._cpu_s is not None:
            out["server_cpu_s"] = self._cpu_s
        if self.metrics_url:
            after = scrape_stages(self.metrics_url)
            for stage in (*STAGES, "batch"):
                n = after.get(f"{stage}_count", 0.0) - self._stages.get(f"{stage}_count", 0.0)
                s = after.get(f"{stage}_sum", 0.0) - self._stages.get(f"{stage}_sum", 0.0)
                mean = s / n if n else float("nan")
                out["server_batch_size" if stage == "batch" else f"server_{stage}_ms"] = (
                    mean if stage == "batch" else mean * 1e3
                )
        return out


# ── one point ──────────────────────────────────────────────────────────────────────────────
def summarise_window(results: list[dict], load, duration_s: float) -> tuple[dict[str, Any], dict[str, int]]:
    """The client processes' results of one window → one flat dict of numbers (+ errors by code)."""
    lat = np.concatenate([np.asarray(r["latencies"], dtype=np.float64) for r in results]) * 1e3
    errors: Counter = Counter()
    for r in results:
        errors.update(r["errors"])
    n = len(lat)
    out: dict[str, Any] = {"requests": n, "errors": int(sum(errors.values())), "throughput_rps": n / duration_s}
    pct = np.percentile(lat, PERCENTILES) if n else [float("nan")] * len(PERCENTILES)
    for p, v in zip(PERCENTILES, pct):
        out[f"p{p}_ms"] = float(v)
    out["mean_ms"] = float(lat.mean()) if n else float("nan")
    cpu = sum(r["client_cpu_s"] for r in results)
    out["client_cpu_cores"] = cpu / duration_s
    out["client_cpu_ms_per_req"] = cpu * 1e3 / n if n else float("nan")
    if isinstance(load, OpenLoop):
        for key in ("sent", "late", "dropped", "unfinished"):
            out[key] = int(sum(r[key] for r in results))
        out["target_rps"] = load.rate
        out["achieved_rps"] = out["sent"] / duration_s
    return out, dict(errors)


def run_point(clients: ClientPool, load, method: Method, probe: ServerProbe | None = None) -> dict:
    """`method.repeats` windows of one load level → medians with spreads, plus errors by code (summed)."""
    windows, errors = [], Counter()
    for _ in range(method.repeats):
        t0 = time.monotonic() + 0.05
        ws = t0 + method.warmup_s
        we = ws + method.duration_s
        # The clients get the window before it starts (an open loop told late would send its whole
        # overdue warm-up schedule at once, a burst that is then measured as queueing).
        pending = _Pending(clients, load, t0, ws, we)
        if probe is not None:
            time.sleep(max(0.0, t0 + method.warmup_s / 2 - time.monotonic()))
            probe.begin_stages()
            time.sleep(max(0.0, ws - time.monotonic()))
            probe.begin()
            time.sleep(max(0.0, we - time.monotonic()))
            probe.end()
        results = pending.results()
        server = probe.results() if probe is not None else {}
        window, errs = summarise_window(results, load, method.duration_s)
        if "server_cpu_s" in server:  # per request: divided by what the window completed
            cpu = server.pop("server_cpu_s")
            done = window["requests"] + window["errors"]
            server["server_cpu_cores"] = cpu / method.duration_s
            server["server_cpu_ms_per_req"] = cpu * 1e3 / done if done else float("nan")
        windows.append({**window, **server})
        errors.update(errs)
    point = aggregate(windows)
    point["errors_by_code"] = dict(errors)
    point["load"] = load.label
    return point


class _Pending:
    """Start one window in the client processes without blocking, collect it later."""

    def __init__(self, clients: ClientPool, load, t0: float, ws: float, we: float) -> None:
        self.clients, self.we = clients, we
        for conn in clients._conns:
            conn.send((load, t0, ws, we))

    def results(self) -> list[dict]:
        return [self.clients._recv(conn, self.we - time.monotonic() + 60) for conn in self.clients._conns]


# ── the floor ──────────────────────────────────────────────────────────────────────────────
def echo_reply(k: int) -> bytes:
    """A RecommendReply of the size attnrec sends for k items (ids of 6 digits, a model name, a version)."""
    from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as pb

    return pb.RecommendReply(
        items=[str(100000 + i) for i in range(k)], scores=[0.5] * k, model="bench", model_version=2
    ).SerializeToString()


async def _echo_main(port: int, k: int) -> None:
    import grpc

    from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as pb
    from attnrec.engine.rpc.attnrec.v1 import recommender_pb2_grpc as pb_grpc

    reply = pb.RecommendReply.FromString(echo_reply(k))

    class Echo(pb_grpc.RecommenderServicer):  # parses the request, as any servicer does; no compute
        async def Recommend(self, request, context):
            return reply

    server = grpc.aio.server()
    pb_grpc.add_RecommenderServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def echo_server_main(port: int, k: int) -> None:
    """The echo floor's process: `python -c 'from attnrec.benchmarks.loadgen import echo_server_main; ...'`."""
    asyncio.run(_echo_main(port, k))
