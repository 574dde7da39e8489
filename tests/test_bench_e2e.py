"""The e2e and peer benchmark stages and their load generator, on tiny sizes: consistency, not timings."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attnrec.benchmarks import loadgen
from attnrec.benchmarks.loadgen import (
    ClientPool,
    ClosedLoop,
    OpenLoop,
    RecommendTarget,
    ServerProbe,
    run_point,
    schedule,
)
from attnrec.benchmarks.peer import mlserver
from attnrec.benchmarks.timing import Method

ROOT = Path(__file__).resolve().parents[1]
DATE = "2000-01-01"
METHOD = Method(duration_s=0.4, warmup_s=0.1, repeats=2)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-e2e")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # MLServer only: Ray Serve starts a Ray cluster (minutes on a loaded 2-core machine); its own test
    # (tests/test_rayserve.py) talks to it, and test_peer_report_* below checks its rows in the report.
    cmd = [sys.executable, "-m", "benchmarks", "--stages", "e2e,peer", "--tiny", "--no-peer-setup", "--date", DATE]
    cmd += ["--peers", "mlserver"]
    cmd += ["--duration", "0.3", "--warmup", "0.1", "--repeats", "2", "--threads", "1"]
    cmd += ["--out", str(out / "results"), "--work-dir", str(out / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "results"


def _load(results: Path, stage: str) -> dict:
    return json.loads((results / f"bench-{stage}-{DATE}.json").read_text())


def _check_point(p: dict, duration_s: float) -> None:
    assert p["errors_by_code"] == {} and p["errors"] == 0
    assert len(p["repeats"]) == 2
    for r in p["repeats"]:
        assert r["requests"] > 0
        assert r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["throughput_rps"] == pytest.approx(r["requests"] / duration_s)
        assert r["client_cpu_cores"] >= 0
        assert r["server_cpu_ms_per_req"] > 0
    for key in ("p50_ms", "p99_ms", "throughput_rps"):
        lo, hi = p[f"{key}_spread"]
        assert lo <= p[key] <= hi
        assert p[key] == pytest.approx(float(np.median([r[key] for r in p["repeats"]])))


def test_e2e_stage_reports_consistent_points(bench_run):
    report = _load(bench_run, "e2e")
    data = report["data"]
    assert data["model"]["ranker"] == "synthetic"
    assert "SYNTHETIC ranker" in " ".join(report["notes"])
    pts = data["points"]
    closed = {(p["server"], p["concurrency"]) for p in pts if p["mode"] == "closed"}
    assert closed == {(s, c) for s in ("attnrec", "echo", "naive torch+FAISS") for c in (1, 4)}
    for p in pts:
        _check_point(p, 0.3)
    for p in (p for p in pts if p["server"] == "attnrec"):
        for stage in ("queue", "encoder", "search", "ranker", "total"):
            assert p[f"server_{stage}_ms"] >= 0
        assert p["server_encoder_ms"] > 0 and p["server_ranker_ms"] > 0
        assert p["server_total_ms"] >= p["server_queue_ms"]
        assert 1 <= p["server_batch_size"] <= 32
    opens = [p for p in pts if p["mode"] == "open"]
    assert len(opens) == 1
    for r in opens[0]["repeats"]:
        assert r["sent"] == r["requests"] + r["errors"] + r["unfinished"]
        assert r["achieved_rps"] == pytest.approx(r["sent"] / 0.3)
    ceil = data["ceiling"]
    assert set(ceil) == {"1", "32"} and ceil["32"]["items_per_s"] > 0
    checks = data["checks"]
    t = checks["p50_c1_vs_floor_plus_ceiling"]
    assert t["excess_ms"] == pytest.approx(t["attnrec_p50_ms"] - t["echo_p50_ms"] - t["in_process_p50_ms"])
    paced = data["ceiling_paced"]  # paced by the last round's echo c=1 p50
    echo1 = next(p for p in pts if p["server"] == "echo" and p["concurrency"] == 1)
    assert paced["gap_ms"] == pytest.approx(echo1["repeats"][-1]["p50_ms"])
    assert t["excess_over_paced_ms"] == pytest.approx(t["attnrec_p50_ms"] - t["echo_p50_ms"] - paced["p50_ms"])
    f = checks["throughput_fraction_of_ceiling"]
    assert f["fraction"] == pytest.approx(f["attnrec_rps"] / ceil["32"]["items_per_s"])
    sh = data["stored_history"]
    assert (sh["users"], sh["events"], sh["history"]) == (64, 640, 10)  # tiny: 64 users, history 10
    for kind in ("carried", "stored"):
        _check_point(sh[kind], 0.3)
    t = checks["stored_history_added_p50"]
    assert t["added_ms"] == pytest.approx(sh["stored"]["p50_ms"] - sh["carried"]["p50_ms"])
    md = (bench_run / f"bench-e2e-{DATE}.md").read_text()
    assert "user_id (stored history)" in md
    assert "| Targets" not in md and "**Targets**" in md and f"![e2e](bench-e2e-{DATE}.png)" in md


def test_peer_stage_rows_for_both_servers(bench_run):
    data = _load(bench_run, "peer")["data"]
    pts = data["points"]
    for rpc in ("ModelInfer", "Recommend"):  # attnrec's encoder and its whole pipeline
        assert {p["concurrency"] for p in pts if p["server"] == "attnrec" and p["rpc"] == rpc} == {1, 4}
    assert not any(p["server"] == "Ray Serve" for p in pts) and data["peers"] == ["mlserver"]
    for p in pts:
        _check_point(p, 0.3)
    if not mlserver.venv_ready():
        assert "no MLServer environment" in data["skipped"]["MLServer"]
        pytest.skip(
            f"no MLServer environment at {mlserver.DEFAULT_VENV}: python -m attnrec.benchmarks.peer.mlserver --setup"
        )
    assert {p["concurrency"] for p in pts if p["server"] == "MLServer"} == {1, 4}
    # attnrec batching by MLServer's rule (its 2 ms window) is what the target is judged on; the default beside it
    from attnrec.benchmarks.stages.peer import SAME_WINDOW

    same = [p for p in pts if p["server"] == SAME_WINDOW]
    assert {p["concurrency"] for p in same} == {1, 4} and {p["max_queue_delay_us"] for p in same} == {2000}
    check = data["checks"]["MLServer"]
    assert check["throughput_ratio"] > 0 and check["attnrec"] == SAME_WINDOW
    judged = next(p for p in same if p["concurrency"] == 4)["throughput_rps"]
    assert check["attnrec_rps"] == judged and check["default_ratio"] > 0


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    from attnrec.benchmarks.servers import echo_server

    with echo_server(10, tmp_path_factory.mktemp("echo")) as server:
        yield server


def _requests(n: int = 8) -> list[bytes]:
    from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as pb

    return [pb.RecommendRequest(history=[str(i), str(i + 1)], k=10).SerializeToString() for i in range(n)]


def test_open_loop_keeps_a_low_rate_and_closed_loop_counts_add_up(echo):
    with ClientPool(RecommendTarget(echo.address, _requests()), processes=2) as clients:
        p = run_point(clients, OpenLoop(100.0), METHOD, ServerProbe(echo.pid))
        for r in p["repeats"]:
            assert r["achieved_rps"] == pytest.approx(100.0, rel=0.1)
            assert r["throughput_rps"] == pytest.approx(100.0, rel=0.1)
            assert r["dropped"] == 0 and r["unfinished"] == 0 and r["errors"] == 0
            assert r["server_cpu_ms_per_req"] > 0
        c = run_point(clients, ClosedLoop(2), METHOD)
        assert c["errors"] == 0 and c["requests"] > 0
        assert c["p50_ms"] <= c["p99_ms"]


class _RecordingClients:
    """A ClientPool stand-in: records when each window reached the clients, and whether the probe's
    stage scrape came before the window, its CPU reads at the window's edges."""

    def __init__(self, probe_log: list):
        self._conns = [self]
        self.sent: list[tuple[float, float, float, float]] = []
        self.probe_log = probe_log

    def send(self, msg):
        load, t0, ws, we = msg
        self.sent.append((time.monotonic(), t0, ws, we))
        self.probe_log.append(("window", time.monotonic()))

    def _recv(self, conn, timeout):
        self.probe_log.append(("results", time.monotonic()))
        return {"latencies": [0.001], "errors": {}, "client_cpu_s": 0.0}


class _LoggingProbe(ServerProbe):
    def __init__(self, log):
        super().__init__(pid=os.getpid())
        self.log = log

    def begin_stages(self):
        self.log.append(("stages", time.monotonic()))

    def begin(self):
        self.log.append(("cpu-begin", time.monotonic()))
        super().begin()

    def end(self):
        self.log.append(("cpu-end", time.monotonic()))
        super().end()

    def results(self):
        self.log.append(("stages-after", time.monotonic()))
        return super().results()


def test_clients_get_each_window_before_it_starts_and_no_scrape_falls_inside_it():
    """An open loop told its window late sends the overdue part of its schedule in one burst (this
    put the e2e report's open-loop p99 at 46x c=1); a metrics scrape inside the window stalls it."""
    log: list = []
    clients = _RecordingClients(log)
    method = Method(duration_s=0.05, warmup_s=0.05, repeats=2)
    run_point(clients, ClosedLoop(1), method, _LoggingProbe(log))
    assert len(clients.sent) == 2
    for sent_at, t0, ws, we in clients.sent:
        assert sent_at < t0 < ws < we
    events = [name for name, _ in log]
    assert events == ["window", "stages", "cpu-begin", "cpu-end", "results", "stages-after"] * 2
    starts = [t for name, t in log if name == "cpu-begin"]
    stages = [t for name, t in log if name == "stages"]
    for (_, t0, ws, we), begin, scrape in zip(clients.sent, starts, stages):
        assert scrape < ws <= begin < ws + 0.02


def test_requests_spread_over_several_connections(echo):
    """What a --workers server needs from its client: SO_REUSEPORT spreads connections, not requests."""
    with ClientPool(RecommendTarget(echo.address, _requests(), connections=3)) as clients:
        p = run_point(clients, ClosedLoop(6), METHOD)
    assert p["errors"] == 0 and p["requests"] > 0


def test_errors_are_counted_by_status_code(echo):
    from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as pb

    # The echo server parses requests: bytes that are no RecommendRequest fail with INTERNAL.
    bad = [b"\xff\xff\xff"] + [pb.RecommendRequest(k=1).SerializeToString()]
    with ClientPool(RecommendTarget(echo.address, bad[1:] + bad)) as clients:
        p = run_point(clients, ClosedLoop(1), METHOD)
    assert p["errors"] > 0 and sum(p["errors_by_code"].values()) == sum(r["errors"] for r in p["repeats"])
    assert set(p["errors_by_code"]) <= {"INTERNAL", "UNKNOWN", "INVALID_ARGUMENT"}
    assert p["requests"] > 0


def test_schedule_is_split_between_processes_without_overlap():
    load = OpenLoop(1000.0)
    parts = [schedule(load, 10.0, 11.0, p, 3) for p in range(3)]
    merged = np.sort(np.concatenate(parts))
    assert len(merged) == 1000
    assert np.allclose(np.diff(merged), 1e-3)
    poisson = schedule(OpenLoop(1000.0, poisson=True), 0.0, 5.0, 0, 1)
    assert len(poisson) == pytest.approx(5000, rel=0.05)


def test_process_tree_cpu_counts_children():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass\ntime.sleep(5)",
        ]
    )
    try:
        import time

        time.sleep(1.0)
        assert loadgen.process_tree_cpu_s(os.getpid()) >= loadgen.process_tree_cpu_s(proc.pid) >= 0.25
    finally:
        proc.kill()
        proc.wait()


def test_a_server_that_completes_nothing_is_measured_as_zero_with_its_errors():
    """Nothing listens: every call fails; the point says 0 req/s and why, and nothing crashes."""
    from attnrec.benchmarks.peer.mlserver import free_port

    with ClientPool(RecommendTarget(f"127.0.0.1:{free_port()}", _requests(), timeout_s=2.0)) as clients:
        p = run_point(clients, ClosedLoop(2), METHOD)
    assert p["throughput_rps"] == 0 and p["requests"] == 0
    assert p["errors"] > 0 and set(p["errors_by_code"]) == {"UNAVAILABLE"}


def _point(
    server: str, c: int, rps: float, p50: float, p99: float, errors: dict | None = None, rpc: str = "ModelInfer"
) -> dict:
    from attnrec.benchmarks.timing import aggregate

    window = {"requests": int(rps * 0.3), "errors": sum((errors or {}).values()), "throughput_rps": rps,
              "p50_ms": p50, "p90_ms": p99, "p95_ms": p99, "p99_ms": p99, "client_cpu_cores": 0.5}  # fmt: skip
    return {"server": server, "rpc": rpc, "mode": "closed", "concurrency": c, **aggregate([window, window]),
            "errors_by_code": errors or {}, "load": f"c={c}"}  # fmt: skip


def test_peer_report_when_the_peer_completed_no_request():
    from attnrec.benchmarks.report import Section
    from attnrec.benchmarks.stages import peer

    nan = float("nan")
    points = [_point("attnrec", 1, 900.0, 1.0, 2.0), _point("attnrec", 32, 3000.0, 9.0, 20.0),
              _point("MLServer", 1, 0.0, nan, nan, {"UNAVAILABLE": 412}),
              _point("MLServer", 32, 0.0, nan, nan, {"UNAVAILABLE": 7000, "DEADLINE_EXCEEDED": 3})]  # fmt: skip
    section = Section("peer", "peer")
    peer.report(section, points, {"closed": (1, 32), "history": 50})
    check = section.data["checks"]["MLServer"]
    assert check["met"] is None and check["throughput_ratio"] is None
    target = section.tables[-1]
    assert (
        target.rows[0][-1]
        == "no comparison: MLServer completed no request (7003 (DEADLINE_EXCEEDED 3, UNAVAILABLE 7000))"
    )
    rows = {(r[0], r[1]): r for r in section.tables[0].rows}
    assert rows[("MLServer", 32)][6].startswith("0 ") and "UNAVAILABLE 7000" in rows[("MLServer", 32)][7]


def test_peer_report_has_ray_serve_rows_and_both_targets():
    """attnrec, MLServer and Ray Serve rows at c=1, 32, 128; MLServer's target is 2.5× at c=32 (p99 no
    worse), Ray Serve's 2× at c=32 with a lower p50 at c=1; a Ray Serve that completed nothing at c=128
    is a 0 req/s row with its errors."""
    from attnrec.benchmarks.report import Section
    from attnrec.benchmarks.stages import peer

    nan = float("nan")
    points = [_point("attnrec", 1, 900.0, 1.0, 2.0), _point("attnrec", 32, 3000.0, 9.0, 20.0),
              _point("attnrec", 128, 3100.0, 40.0, 60.0),
              _point("MLServer", 1, 500.0, 1.8, 3.0), _point("MLServer", 32, 1300.0, 20.0, 30.0),
              _point("MLServer", 128, 1300.0, 90.0, 99.0),
              _point("attnrec", 1, 400.0, 2.4, 4.0, rpc="Recommend"),
              _point("attnrec", 32, 1000.0, 30.0, 50.0, rpc="Recommend"),
              _point("attnrec", 128, 1000.0, 120.0, 150.0, rpc="Recommend"),
              _point("Ray Serve", 1, 150.0, 6.5, 9.0, rpc="Recommend"),
              _point("Ray Serve", 32, 400.0, 75.0, 99.0, rpc="Recommend"),
              _point("Ray Serve", 128, 0.0, nan, nan, {"DEADLINE_EXCEEDED": 128}, rpc="Recommend")]  # fmt: skip
    section = Section("peer", "peer")
    peer.report(section, points, {"closed": (1, 32, 128), "history": 50})
    encoder, pipeline, targets = section.tables
    assert {(r[0], r[1]) for r in encoder.rows} == {(s, c) for s in ("attnrec", "MLServer") for c in (1, 32, 128)}
    assert {(r[0], r[1]) for r in pipeline.rows} == {(s, c) for s in ("attnrec", "Ray Serve") for c in (1, 32, 128)}
    ray_128 = next(r for r in pipeline.rows if r[:2] == ["Ray Serve", 128])
    assert ray_128[6].startswith("0 ") and ray_128[7] == "128 (DEADLINE_EXCEEDED 128)"
    ml, ray = section.data["checks"]["MLServer"], section.data["checks"]["Ray Serve"]
    assert ml["throughput_ratio"] == pytest.approx(3000 / 1300) and ml["target_ratio"] == 2.5 and ml["met"] is False
    assert ray["throughput_ratio"] == pytest.approx(2.5) and ray["target_ratio"] == 2.0 and ray["met"] is True
    assert (ray["attnrec_p50_c1_ms"], ray["peer_p50_c1_ms"]) == (2.4, 6.5)
    assert [r[-1] for r in targets.rows] == ["MISSED", "met"]
    assert targets.rows[1][5] == "2.50×" and targets.rows[1][6] == "p50 at c=1 2.40 vs 6.50 ms"


def test_e2e_targets_are_invalid_when_floors_exceed_the_server():
    """A loaded machine slowed the floors more than the server: no 'met' out of a negative excess."""
    from attnrec.benchmarks.report import Section
    from attnrec.benchmarks.stages import e2e
    from attnrec.benchmarks.timing import aggregate

    points = [_point("attnrec", 1, 150.0, 6.7, 9.0), _point("attnrec", 32, 125.0, 200.0, 300.0),
              _point("echo", 1, 1300.0, 0.75, 1.5), _point("echo", 32, 5000.0, 6.0, 9.0)]  # fmt: skip
    inproc = lambda p50, per_s: aggregate([{"p50_ms": p50, "p99_ms": p50 * 2, "items_per_s": per_s}] * 2)  # noqa: E731
    ceil = {1: inproc(12.2, 80.0), 32: inproc(300.0, 81.0)}
    section = Section("e2e", "e2e")
    e2e._report(section, points, ceil, {"closed": (1, 32)})
    checks = section.data["checks"]
    assert not checks["p50_c1_vs_floor_plus_ceiling"]["valid"] and not checks["p50_c1_vs_floor_plus_ceiling"]["met"]
    assert not checks["throughput_fraction_of_ceiling"]["valid"]
    results = [row[-1] for row in section.tables[-1].rows]
    assert results and all(r.startswith("INVALID") for r in results)
    # the same floors under a faster server: a real verdict again
    points[0] = _point("attnrec", 1, 150.0, 14.0, 20.0)
    section = Section("e2e", "e2e")
    e2e._report(section, points, ceil, {"closed": (1, 32)})
    assert section.data["checks"]["p50_c1_vs_floor_plus_ceiling"]["valid"]
