"""Closed-loop gRPC load generator for `attnrec serve`, with a bare grpc.aio echo server as the floor.

    python -m benchmarks.serving_load --repo /tmp/s10k-repo --model s10k \\
        --concurrency 1,32 --duration 10 --history 50 --k 10 --json out.json

Starts `attnrec serve` and an echo server (the same Recommend RPC answering a pre-built reply of
the same size, no compute) as separate processes, then, in this process, sends pre-built
requests (random histories of --history catalogue ids, built before timing starts) from
C concurrent callers, each sending its next request when the previous reply arrives (closed
loop), for a warm-up then a fixed window. Reports p50/p95/p99 latency and throughput per
concurrency for both servers. Reusable pieces: `run_closed_loop`, `EchoServicer`, `summarise`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.repository import newest_valid_version
from engine.rpc.attnrec.v1 import recommender_pb2 as pb
from engine.rpc.attnrec.v1 import recommender_pb2_grpc as pb_grpc


# ── the floor: a bare grpc.aio server with the same RPC and a reply of the same size ───────────
class EchoServicer(pb_grpc.RecommenderServicer):
    def __init__(self, k: int) -> None:
        self.reply = pb.RecommendReply(
            items=[str(100000 + i) for i in range(k)], scores=[0.5] * k, model="echo", model_version=1
        )

    async def Recommend(self, request, context):
        return self.reply


async def _echo_main(port: int, k: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_RecommenderServicer_to_server(EchoServicer(k), server)
    server.add_insecure_port(f"localhost:{port}")
    await server.start()
    await server.wait_for_termination()


# ── the client ──────────────────────────────────────────────────────────────────────────────
async def run_closed_loop(
    target: str, requests: list, concurrency: int, warmup_s: float, duration_s: float
) -> dict[str, float]:
    """C callers, each sending its next pre-built request as soon as its reply arrives.
    Latencies of requests completing inside the measurement window are kept."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        await stub.Recommend(requests[0], timeout=10)
        start = time.perf_counter() + warmup_s
        end = start + duration_s
        latencies: list[float] = []
        errors = [0]

        async def caller(i: int) -> None:
            n = i
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                try:
                    await stub.Recommend(requests[n % len(requests)], timeout=10)
                except grpc.aio.AioRpcError:
                    errors[0] += 1
                t1 = time.perf_counter()
                if t0 >= start and t1 <= end:
                    latencies.append(t1 - t0)
                n += concurrency

        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return summarise(np.array(latencies), duration_s, errors[0])


def summarise(latencies: np.ndarray, duration_s: float, errors: int = 0) -> dict[str, float]:
    ms = latencies * 1e3
    return {
        "requests": int(len(ms)),
        "errors": errors,
        "throughput_rps": len(ms) / duration_s,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p95_ms": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "mean_ms": float(ms.mean()) if len(ms) else float("nan"),
    }


def build_requests(item_ids: np.ndarray, n: int, history: int, k: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [
        pb.RecommendRequest(history=[str(x) for x in rng.choice(item_ids, size=history, replace=False)], k=k)
        for _ in range(n)
    ]


def wait_serving(target: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with grpc.insecure_channel(target) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{target} did not become SERVING")


def wait_port(target: str, timeout: float = 30) -> None:
    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", default="1,32", help="comma-separated concurrency levels (default: 1,32)")
    ap.add_argument("--duration", type=float, default=10.0, help="measurement window per level, seconds")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up per level, seconds (not measured)")
    ap.add_argument("--history", type=int, default=50, help="history length of each request")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--requests", type=int, default=2000, help="distinct pre-built requests, cycled")
    ap.add_argument("--port", type=int, default=18001)
    ap.add_argument("--echo-port", type=int, default=18002)
    ap.add_argument("--no-echo", action="store_true", help="skip the echo floor")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    ap.add_argument("serve_args", nargs="*", help="extra `attnrec serve` flags, after --")
    args = ap.parse_args(argv)

    version_dir, manifest = newest_valid_version(args.repo, args.model)
    item_ids = np.asarray(json.loads((version_dir / manifest.files["item_ids"].path).read_text()))
    requests = build_requests(item_ids, args.requests, args.history, args.k)
    levels = [int(c) for c in args.concurrency.split(",")]
    serve_cmd = [sys.executable, "-m", "export.cli", "-q", "serve", "--repo", str(args.repo), "--model", args.model]
    serve_cmd += ["--port", str(args.port), "--metrics-port", "0", "--address", "localhost", *args.serve_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {"attnrec": subprocess.Popen(serve_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)}
    if not args.no_echo:
        echo_code = (
            f"import asyncio, benchmarks.serving_load as s; asyncio.run(s._echo_main({args.echo_port}, {args.k}))"
        )
        procs["echo"] = subprocess.Popen([sys.executable, "-c", echo_code], env=env)
    results: dict = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "model": {"name": manifest.name, "version": manifest.version, "n_items": len(item_ids)},
        "config": {**{k: v for k, v in vars(args).items() if k not in ("repo", "json")}, "repo": str(args.repo)},
        "runs": [],
    }
    try:
        wait_serving(f"localhost:{args.port}")
        targets = [("attnrec", f"localhost:{args.port}")]
        if not args.no_echo:
            wait_port(f"localhost:{args.echo_port}")
            targets.append(("echo", f"localhost:{args.echo_port}"))
        for name, target in targets:
            for c in levels:
                r = asyncio.run(run_closed_loop(target, requests, c, args.warmup, args.duration))
                results["runs"].append({"server": name, "concurrency": c, **r})
                print(
                    f"{name:8s} c={c:<3d} p50 {r['p50_ms']:.3f} ms  p95 {r['p95_ms']:.3f}  p99 {r['p99_ms']:.3f}  "
                    f"{r['throughput_rps']:,.0f} req/s  ({r['requests']} requests, {r['errors']} errors)",
                    flush=True,
                )
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(30)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
