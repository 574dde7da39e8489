"""Peer stage: the same ONNX encoder served by Seldon MLServer and by attnrec's V2 ModelInfer, same client.

Both servers get the same encoder.onnx (a cached 10,000-item SASRec, history 50, dim 64, 2 blocks,
trained on the synthetic log by benchmarks/bench_models.py; or the encoder of `--model VERSION_DIR`)
and the same tritonclient.grpc.aio load (benchmarks/loadgen.py V2Target: one (1, 50) INT64
`history` per request), closed loop over the same concurrency levels, in the same run. MLServer
1.7.1 runs in its own virtual environment with a custom onnxruntime runtime and adaptive batching
(max batch 32, 2 ms); attnrec serves the version's `encoder` model with its dynamic batcher (max
batch 32). MLServer's environment is created on first use (pip, a minute or two) unless
`--no-peer-setup`; then its rows are skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..report import Section, fmt_spread
from ..settings import Settings

TITLE = "Peer: attnrec V2 ModelInfer vs Seldon MLServer, same ONNX encoder, same client"
TARGET_RATIO = 2.0  # attnrec's throughput at c=32 over MLServer's, at a p99 no worse


def grid(settings: Settings) -> dict:
    if settings.tiny:
        return dict(closed=(1, 4), history=10, requests=64)
    if settings.quick:
        return dict(closed=(1, 32), history=50, requests=512)
    return dict(closed=(1, 4, 16, 32, 64, 128), history=50, requests=2048)


def run(settings: Settings, section: Section) -> None:
    from attnrec.engine.repository import open_version

    from ..bench_models import bench_version
    from ..loadgen import ClientPool, ClosedLoop, ServerProbe, V2Target, run_point
    from ..peer import mlserver
    from ..servers import attnrec_serve

    g = grid(settings)
    v = bench_version(settings, "peer")
    manifest = open_version(v.path)
    onnx_path = v.path / manifest.files.encoder.path
    n_items = manifest.model.n_items
    rng = np.random.default_rng(settings.seed)
    tokens = [rng.integers(1, n_items + 1, size=(1, g["history"]), dtype=np.int64) for _ in range(g["requests"])]
    cfg = mlserver.MLServerConfig(max_batch_size=32, max_batch_time_s=0.002, intra_op_threads=settings.threads)
    shape = manifest.model.shape()
    section.data.update(model=v.to_dict(), encoder=str(onnx_path), shape=shape, grid=g, mlserver_config=cfg.__dict__)
    section.note(
        f"Encoder: {onnx_path.name} of {v.source} ({shape}); requests: {len(tokens)} pre-built (1, {g['history']}) "
        "INT64 histories, cycled; client: tritonclient.grpc.aio in one separate process (benchmarks/loadgen.py), "
        f"closed loop; {settings.method.warmup_s}s warm-up + {settings.method.duration_s}s window, "
        f"{settings.method.repeats} repeats → median [min–max]."
    )
    section.note(
        f"MLServer {mlserver.MLSERVER_VERSION} (own venv, custom onnxruntime runtime, adaptive batching max batch "
        f"{cfg.max_batch_size}, {cfg.max_batch_time_s * 1e3:g} ms, {cfg.parallel_workers} worker); attnrec serve "
        "`encoder` model, dynamic batcher max batch 32. Server CPU = its process tree (MLServer's workers included)."
    )
    logs = Path(settings.work_dir) / "peer-logs"
    points: list[dict] = section.data.setdefault("points", [])  # filled as measured: a failure keeps them

    def measure(name: str, address: str, model: str, pid: int) -> None:
        with ClientPool(V2Target(address, model, tokens)) as clients:
            for c in g["closed"]:
                settings.progress("peer", f"{name} c={c}")
                p = run_point(clients, ClosedLoop(c), settings.method, ServerProbe(pid))
                points.append({"server": name, "mode": "closed", "concurrency": c, **p})

    with attnrec_serve(v.repo, v.name, logs, threads=settings.threads) as server:
        measure("attnrec", server.address, "encoder", server.pid)

    skipped = None
    if not mlserver.venv_ready():
        if settings.peer_setup:
            mlserver.ensure_venv(log=lambda m: settings.progress("peer", m))
        else:
            skipped = f"no MLServer environment at {mlserver.DEFAULT_VENV} and --no-peer-setup: MLServer rows skipped"
    if skipped is None:
        try:
            with mlserver.MLServer(onnx_path, cfg, work_dir=Path(settings.work_dir) / "mlserver-run") as peer:
                measure("MLServer", peer.grpc_address, peer.model_name, peer.process.pid)
        except (RuntimeError, TimeoutError, OSError) as exc:  # a peer that will not start is a result, not a crash
            skipped = f"MLServer failed: {type(exc).__name__}: {exc}"[:2000]
    if skipped is not None:
        section.note(skipped)
        settings.progress("peer", skipped.splitlines()[0])
    section.data["skipped"] = skipped
    report(section, points, g)


def report(section: Section, points: list[dict], g: dict) -> None:
    """The tables, the target check and the figure. A peer that completed no request has 0 req/s and
    its errors in its rows, and the target line says there was nothing to compare with."""
    from .. import plots

    section.table(
        "Closed loop, V2 ModelInfer of the encoder; median [min–max] over repeats",
        ["server", "concurrency", "p50 ms", "p90", "p95", "p99 ms", "req/s", "errors", "client cores",
         "server CPU ms/req", "server cores"],
        [[p["server"], p["concurrency"], fmt_spread(p, "p50_ms"), p["p90_ms"], p["p95_ms"], fmt_spread(p, "p99_ms"),
          fmt_spread(p, "throughput_rps"), _errors(p), p["client_cpu_cores"],
          p.get("server_cpu_ms_per_req"), p.get("server_cpu_cores")] for p in points],
    )  # fmt: skip
    c = 32 if 32 in g["closed"] else max(g["closed"])
    a = next((p for p in points if p["server"] == "attnrec" and p["concurrency"] == c), None)
    m = next((p for p in points if p["server"] == "MLServer" and p["concurrency"] == c), None)
    if a and m:
        if m["throughput_rps"] > 0 and a["throughput_rps"] > 0:
            ratio = a["throughput_rps"] / m["throughput_rps"]
            met = ratio >= TARGET_RATIO and a["p99_ms"] <= m["p99_ms"]
            result, shown = ("met" if met else "MISSED"), f"{ratio:.2f}×"
        else:  # one side completed nothing in its windows: no ratio to speak of
            ratio, met = None, None
            who = "MLServer" if m["throughput_rps"] <= 0 else "attnrec"
            result, shown = f"no comparison: {who} completed no request ({_errors(m if who == 'MLServer' else a)})", "–"
        section.data["checks"] = {
            "concurrency": c, "throughput_ratio": ratio, "attnrec_p99_ms": a["p99_ms"], "mlserver_p99_ms": m["p99_ms"],
            "target_ratio": TARGET_RATIO, "met": met,
        }  # fmt: skip
        section.table(
            f"Target: attnrec ≥ 2× MLServer's throughput at c={c}, at a p99 no worse",
            ["concurrency", "attnrec req/s", "MLServer req/s", "ratio", "attnrec p99 ms", "MLServer p99 ms", "result"],
            [[c, a["throughput_rps"], m["throughput_rps"], shown, a["p99_ms"], m["p99_ms"], result]],
        )  # fmt: skip
    for p in points:
        p["label"] = f"c={p['concurrency']}"
    fig, (ax,) = plots.new_figure(1, width=8, height=5.5)
    series = {
        name: [p for p in points if p["server"] == name and p["throughput_rps"] > 0] for name in ("attnrec", "MLServer")
    }
    plots.latency_vs_throughput(
        ax, series, throughput_key="throughput_rps", labels_key="label", xlabel="throughput (requests/s)",
        title=f"V2 ModelInfer, encoder, history {g['history']} (tritonclient.grpc.aio)",
    )  # fmt: skip
    section.figure(fig)


def _errors(p: dict) -> str:
    """'0', or the errors by gRPC code: '412 (UNAVAILABLE 400, DEADLINE_EXCEEDED 12)'."""
    by_code = p.get("errors_by_code") or {}
    n = sum(by_code.values())
    return str(n) if not n else f"{n} ({', '.join(f'{k} {v}' for k, v in sorted(by_code.items()))})"
