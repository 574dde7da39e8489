"""Operating the server: health and reflection, hot swap and SIGTERM drain under load with zero
failed requests, bearer tokens and mutual TLS, Prometheus metrics, settings, no torch."""

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import RunningServer, clone_version, free_port, settings

from attnrec.engine.client import RecommenderClient, request
from attnrec.engine.repository import newest_valid_version
from attnrec.engine.rpc.attnrec.v1 import recommender_pb2_grpc as pb_grpc
from attnrec.engine.settings import ServerSettings, add_arguments, from_args

ROOT = Path(__file__).resolve().parents[1]


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture()
def own_repo(trained_repo, tmp_path):
    """A private repository with a copy of the trained version (tests here add versions)."""
    src, _ = newest_valid_version(trained_repo[1], "seq")
    clone_version(src, tmp_path / "repo")
    return tmp_path / "repo"


def test_not_serving_until_warmed_up_then_reflection_lists_and_calls(own_repo):
    s = RunningServer(settings(own_repo), start=False)
    release = threading.Event()
    real_start = s.server.loader.start

    async def slow_start():
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        await real_start()

    s.server.loader.start = slow_start
    started = asyncio.run_coroutine_threadsafe(s.server.start(), s.loop)
    try:
        for _ in range(100):
            if s.server.port:
                break
            time.sleep(0.05)
        assert health(s.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            RecommenderClient(s.target).recommend(["1"], 3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        started.result(60)
        assert health(s.target) == health(s.target, "attnrec.v1.Recommender") == health_pb2.HealthCheckResponse.SERVING

        # a reflection client (what grpcurl does): list the services, then call Recommend knowing nothing else
        from google.protobuf.descriptor_pool import DescriptorPool
        from google.protobuf.message_factory import GetMessageClass
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

        with grpc.insecure_channel(s.target) as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            assert {
                "attnrec.v1.Recommender",
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            } <= set(db.get_services())
            pool = DescriptorPool(db)
            method = pool.FindServiceByName("attnrec.v1.Recommender").methods_by_name["Recommend"]
            req_cls, reply_cls = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
            call = ch.unary_unary(
                "/attnrec.v1.Recommender/Recommend",
                request_serializer=req_cls.SerializeToString,
                response_deserializer=reply_cls.FromString,
            )
            reply = call(req_cls(history=["1", "2"], k=4), timeout=10)
        assert len(reply.items) == 4 and reply.model_version == 1
    finally:
        release.set()
        s.stop()


def _load(target: str, stop: threading.Event, results: list, concurrency: int = 8) -> None:
    """Closed-loop load until `stop`: each reply's version, or the error."""

    async def worker(stub, i):
        n = 0
        while not stop.is_set():
            try:
                r = await stub.Recommend(request([str(1 + (i + n) % 50), "7"], 5), timeout=10)
                results.append(r.model_version)
            except grpc.aio.AioRpcError as exc:
                results.append(exc)
            n += 1

    async def main():
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.RecommenderStub(ch)
            await asyncio.gather(*(worker(stub, i) for i in range(concurrency)))

    asyncio.run(main())


def test_hot_swap_under_load_with_zero_failed_requests_and_broken_versions_refused(own_repo, caplog):
    with RunningServer(settings(own_repo, poll_interval=0.1)) as s:
        stop, results = threading.Event(), []
        load = threading.Thread(target=_load, args=(s.target, stop, results))
        load.start()
        try:
            time.sleep(0.5)
            clone_version(own_repo / "seq" / "1", own_repo)  # version 2, published atomically
            for _ in range(100):
                if s.server.models.slot.current.version == 2:
                    break
                time.sleep(0.1)
            time.sleep(0.5)
            # version 3 with a file that does not match its checksum: refused, 2 keeps serving
            broken = own_repo / "seq" / ".building-3"
            shutil.copytree(own_repo / "seq" / "2", broken)
            manifest = json.loads((broken / "manifest.json").read_text())
            manifest["version"] = 3
            (broken / "manifest.json").write_text(json.dumps(manifest))
            with open(broken / "item_popularity.npy", "r+b") as f:
                f.seek(-1, 2)
                f.write(b"\x01")
            os.rename(broken, own_repo / "seq" / "3")
            time.sleep(1.0)
        finally:
            stop.set()
            load.join(30)
        assert s.server.models.slot.current.version == 2
    errors = [r for r in results if not isinstance(r, int)]
    assert not errors, errors[:3]
    versions = [r for r in results if isinstance(r, int)]
    assert set(versions) == {1, 2} and versions.index(2) > 0 and len(versions) > 100
    assert any("does not match the manifest" in r.message for r in caplog.records)


def test_sigterm_drains_in_flight_requests_and_exits_0(own_repo):
    port = free_port()
    cmd = [sys.executable, "-m", "attnrec", "-q", "serve", "--repo", str(own_repo), "--port", str(port)]
    env = {**os.environ, "ATTNREC_METRICS_PORT": "0", "ATTNREC_INTRA_OP_THREADS": "1", "ATTNREC_GRACE": "20"}
    env["ATTNREC_HISTORY_STORE"] = f"file://{own_repo.parent / 'sigterm-history.sqlite'}"  # not in the checkout
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = f"localhost:{port}"
    try:
        for _ in range(300):
            try:
                if health(target) == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("server did not become ready")
        sent = []

        def requests():  # a bulk stream that is mid-way when SIGTERM arrives
            for i in range(600):
                if i == 200:
                    proc.send_signal(signal.SIGTERM)
                    time.sleep(0.2)
                sent.append(i)
                yield request([str(1 + i % 100)], 5, request_id=str(i))

        with RecommenderClient(target) as client:
            replies = list(client.recommend_stream(requests()))
        assert [r.request_id for r in replies] == [str(i) for i in range(600)]
        assert all(r.error is None and len(r.items) == 5 for r in replies)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "draining" in out and "stopped" in out, out


def _certs(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate, made with openssl."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")

    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    (tmp / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    for who in ("server", "client"):
        ssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{who}.key",
            "-out",
            f"{who}.csr",
            "-subj",
            "/CN=localhost",
        )
        sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "san.ext"]
        ssl("x509", "-req", "-in", f"{who}.csr", "-out", f"{who}.pem", *sign)
    return {n: tmp / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_mutual_tls_and_bearer_token(own_repo, tmp_path):
    c = _certs(tmp_path)
    cfg = settings(
        own_repo, tls_cert=c["server.pem"], tls_key=c["server.key"], tls_client_ca=c["ca.pem"], auth_token="s3cret"
    )
    with RunningServer(cfg) as s:
        tls = {"tls_ca": c["ca.pem"], "tls_cert": c["client.pem"], "tls_key": c["client.key"]}
        assert len(RecommenderClient(s.target, token="s3cret", **tls).recommend(["1"], 3).items) == 3
        for token, code in (("", grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.UNAUTHENTICATED)):
            with pytest.raises(grpc.RpcError) as err:
                RecommenderClient(s.target, token=token, **tls).recommend(["1"], 3)
            assert err.value.code() == code
        with pytest.raises(grpc.RpcError) as err:  # a stream is refused the same way
            list(RecommenderClient(s.target, **tls).recommend_stream([request(["1"], 3)]))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:  # no client certificate: the handshake fails
            RecommenderClient(s.target, token="s3cret", tls_ca=c["ca.pem"], timeout=3).recommend(["1"], 3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.secure_channel(
            s.target,
            grpc.ssl_channel_credentials(
                c["ca.pem"].read_bytes(), c["client.key"].read_bytes(), c["client.pem"].read_bytes()
            ),
        ) as ch:  # health checks need no token (orchestrators probe without one)
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def _scrape_until(url: str, done, timeout: float = 10.0) -> str:
    """/metrics, read again (bounded) until `done(text)`: the server counts an RPC as it finishes,
    which may be just after the client has its reply."""
    deadline = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        if done(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def _metric(text: str, prefix: str) -> float | None:
    return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(prefix)), None)


def test_prometheus_metrics(own_repo):
    port = free_port()
    ok = 'attnrec_requests_total{code="OK",method="/attnrec.v1.Recommender/Recommend"}'
    bad = 'attnrec_requests_total{code="INVALID_ARGUMENT",method="/attnrec.v1.Recommender/Recommend"}'
    with RunningServer(settings(own_repo, metrics_port=port)) as s:
        client = RecommenderClient(s.target)
        for i in range(5):
            client.recommend([str(i + 1)], 3)
        with pytest.raises(grpc.RpcError):
            client.recommend(["1"], 1001)  # over --max-k
        text = _scrape_until(
            f"http://localhost:{port}/metrics",
            lambda t: _metric(t, ok) == 5 and _metric(t, bad) == 1 and _metric(t, "attnrec_in_flight_requests") == 0,
        )
    assert _metric(text, ok) == 5 and _metric(text, bad) == 1
    for stage in ("queue", "encoder", "search", "total"):
        assert _metric(text, f'attnrec_stage_seconds_count{{model="pipeline",stage="{stage}"}}') >= 5
    assert _metric(text, 'attnrec_batch_size_count{model="pipeline"}') >= 5
    assert _metric(text, 'attnrec_model_version{model="seq"}') == 1
    assert _metric(text, "attnrec_in_flight_requests") == 0


def test_settings_precedence_flag_env_file_default(tmp_path):
    cfg = tmp_path / "serve.toml"
    cfg.write_text('repo = "/models"\nport = 9000\nmax-batch-size = 8\ngrace = 3.5\n')
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(cfg), "--port", "9100"])
    s = from_args(args, {"ATTNREC_MAX_BATCH_SIZE": "64", "ATTNREC_TLS_CERT": "/c.pem"})
    assert (s.repo, s.port, s.max_batch_size, s.grace, s.tls_cert) == (Path("/models"), 9100, 64, 3.5, Path("/c.pem"))
    assert s.max_queue_size == ServerSettings.max_queue_size and s.batching.max_batch_size == 64
    with pytest.raises(ValueError, match="ATTNREC_PORT"):
        from_args(parser.parse_args(["--repo", "x"]), {"ATTNREC_PORT": "eighty"})
    cfg.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="unknown settings"):
        from_args(parser.parse_args(["--config", str(cfg)]), {})


def test_serving_commands_never_import_torch(own_repo):
    code = f"""
import asyncio, sys
from attnrec.cli import build_parser
args = build_parser(["serve"]).parse_args(["serve", "--repo", {str(own_repo)!r}, "--port", "0", "--metrics-port", "0"])
from attnrec.engine.settings import from_args
from attnrec.engine.server import Server
import attnrec.engine.client, attnrec.engine.cli
async def main():
    s = Server(from_args(args, {{"ATTNREC_HISTORY_STORE": {f"file://{own_repo.parent / 'no-torch.sqlite'}"!r}}}))
    await s.start()
    await s.drain()
asyncio.run(main())
build_parser(["query"]).parse_args(["query", "--server", "x:1", "--info"])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))
print("BAD", bad)
sys.exit(1 if bad else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_query_command(own_repo, capsys):
    from attnrec.cli import main

    with RunningServer(settings(own_repo)) as s:
        assert main(["query", "--server", s.target, "--history", "1,2,3", "--k", "4", "--json"]) == 0
        out = capsys.readouterr().out  # (the in-process server's log lines come first)
        reply = json.loads(out[out.index("{\n") :])
        assert len(reply["items"]) == 4 and reply["version"] == 1
        assert main(["query", "--server", s.target, "--history", "1", "--k", "1001"]) == 1  # over --max-k
    assert np.isfinite(reply["scores"]).all()
