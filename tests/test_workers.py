"""`attnrec serve --workers 2` over a real port: both workers serve, the metrics endpoint and
ModelStatistics merge them, a hot swap reaches every worker, and SIGTERM drains them together."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import clone_version, free_port

from attnrec.engine.repository import newest_valid_version
from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as pb
from attnrec.engine.rpc.attnrec.v1 import recommender_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
LOCAL = [("grpc.use_local_subchannel_pool", 1)]
RECOMMEND = "/attnrec.v1.Recommender/Recommend"  # a channel of its own: a new connection, any worker


def _health(target: str) -> int | None:
    try:
        with grpc.insecure_channel(target, options=LOCAL) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError:
        return None


def _workers(pid: int) -> list[int]:
    """The supervisor's worker processes (multiprocessing's spawned interpreters, its helpers left out)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid and b"spawn_main" in cmd:
            out.append(int(entry))
    return sorted(out)


def _recommends_served(pid: int) -> float:
    """Recommend calls answered OK by one worker: its own prometheus-client multiprocess file, in the
    folder the supervisor gave it (PROMETHEUS_MULTIPROC_DIR in the worker's environment)."""
    from prometheus_client.mmap_dict import MmapedDict

    env = dict(x.split(b"=", 1) for x in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in x)
    path = Path(env[b"PROMETHEUS_MULTIPROC_DIR"].decode()) / f"counter_{pid}.db"
    total = 0.0
    for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
        _, sample, labels, _ = json.loads(key)
        if sample == "attnrec_requests_total" and labels == {"method": RECOMMEND, "code": "OK"}:
            total += value
    return total


def _recommend_on_new_connections(target: str, ids: list[str], n: int) -> list[int]:
    versions = []
    for i in range(n):
        with grpc.insecure_channel(target, options=LOCAL) as ch:
            stub = pb_grpc.RecommenderStub(ch)
            for j in range(5):
                reply = stub.Recommend(pb.RecommendRequest(history=ids[(i + j) % 9 : (i + j) % 9 + 3], k=5), timeout=30)
                versions.append(reply.model_version)
    return versions


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(\{{{re.escape(want)}\}})? (\S+)$" if want else rf"^{name} (\S+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            return float(m.groups()[-1])
    raise AssertionError(f"{name}{{{want}}} not in the metrics")


def test_two_workers_share_the_port_merge_metrics_follow_swaps_and_drain(trained_repo, tmp_path):
    src, _ = newest_valid_version(trained_repo[1], "seq")
    repo = tmp_path / "repo"
    clone_version(src, repo)
    ids = [str(x) for x in json.loads((src / "item_ids.json").read_text())[:12]]
    port, metrics = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "attnrec", "-q", "serve", "--repo", str(repo), "--workers", "2"]
    cmd += ["--address", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics), "--intra-op-threads", "1"]
    cmd += ["--history-store", f"file://{tmp_path / 'history.sqlite'}", "--shutdown-delay", "5", "--grace", "5"]
    cmd += ["--model-control"]  # every worker gets it: ReloadModel below is model control
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while _health(target) != health_pb2.HealthCheckResponse.SERVING:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        workers = _workers(proc.pid)
        assert len(workers) == 2
        # SERVING only once both are warm: every connection, whichever worker takes it, says so
        assert all(_health(target) == health_pb2.HealthCheckResponse.SERVING for _ in range(8))

        # both serve: 40 connections of 5 requests each, spread by the kernel over the two
        versions = _recommend_on_new_connections(target, ids, 40)
        assert versions == [1] * 200
        served = {w: _recommends_served(w) for w in workers}
        assert sum(served.values()) == 200 and all(n >= 5 for n in served.values()), served

        # one metrics endpoint for both, and ModelStatistics (from either worker) agrees with it
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        ok = _metric(text, "attnrec_requests_total", code="OK", method="/attnrec.v1.Recommender/Recommend")
        assert ok == 200
        assert _metric(text, "nv_inference_request_success", model="pipeline", version="1") == 200
        assert _metric(text, "attnrec_in_flight_requests") == 0
        client = tc.InferenceServerClient(target)
        try:
            stats = client.get_inference_statistics("pipeline").model_stats[0]
        finally:
            client.close()
        assert stats.inference_stats.success.count == 200
        assert _metric(text, "nv_inference_count", model="pipeline", version="1") == stats.inference_count

        # the history store is shared: events recorded through one connection (one worker) are read by
        # Recommends on new connections, whichever worker takes them; and an item made unavailable is
        # never returned by either
        with grpc.insecure_channel(target, options=LOCAL) as ch:
            stub = pb_grpc.RecommenderStub(ch)
            assert stub.RecordEvents(pb.RecordEventsRequest(user_id="u1", items=ids[:4]), timeout=30).stored_events == 4
            stub.SetItemAvailability(pb.SetItemAvailabilityRequest(items=ids[4:8], available=False), timeout=30)
        for _ in range(8):
            with grpc.insecure_channel(target, options=LOCAL) as ch:
                reply = pb_grpc.RecommenderStub(ch).Recommend(pb.RecommendRequest(user_id="u1", k=8), timeout=30)
            assert reply.stored_events == 4
            assert not set(reply.items) & set(ids[:8]), list(reply.items)

        # a hot swap asked of one worker reaches the other
        clone_version(src, repo)
        with grpc.insecure_channel(target, options=LOCAL) as ch:
            assert pb_grpc.RecommenderStub(ch).ReloadModel(pb.ReloadModelRequest(), timeout=120).version == 2
        deadline = time.monotonic() + 120
        while set(_recommend_on_new_connections(target, ids, 8)) != {2}:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        assert _metric(text, "attnrec_model_version", model="seq") == 2  # the oldest any worker serves

        # SIGTERM: every worker reports NOT_SERVING during the shutdown delay, then all exit cleanly
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 4  # within the shutdown delay (5 s), both workers say NOT_SERVING
        while True:
            statuses = [_health(target) for _ in range(8)]
            if all(s == health_pb2.HealthCheckResponse.NOT_SERVING for s in statuses) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert all(s == health_pb2.HealthCheckResponse.NOT_SERVING for s in statuses), statuses
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()
        assert not any(Path(f"/proc/{w}").exists() for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "serve.log").read_text()
    assert "all 2 workers warm: SERVING" in out and "the other workers follow" in out


@pytest.mark.parametrize("value, n", [("1", 1), ("3", 3), ("auto", len(os.sched_getaffinity(0)))])
def test_worker_count(value, n, tmp_path):
    from attnrec.engine.settings import ServerSettings

    assert ServerSettings(repo=tmp_path, workers=value).worker_count == n


def test_worker_count_refuses_nonsense(tmp_path):
    from attnrec.engine.settings import ServerSettings

    for bad in ("0", "-2", "many"):
        with pytest.raises(ValueError, match="--workers"):
            ServerSettings(repo=tmp_path, workers=bad).worker_count


def test_workers_refuse_a_port_in_use_before_starting_any(trained_repo, tmp_path):
    """The supervisor checks the ports once (as one server does): one line, exit 2, no worker spawned."""
    import socket

    src, _ = newest_valid_version(trained_repo[1], "seq")
    repo = tmp_path / "repo"
    clone_version(src, repo)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "attnrec", "-q", "serve", "--repo", str(repo), "--workers", "2"]
        cmd += ["--address", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"--port {port} is in use" in out.stdout + out.stderr
    assert "workers starting" not in out.stdout + out.stderr
