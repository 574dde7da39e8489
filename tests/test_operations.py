"""Operating the server safely: health Watch, model control off unless asked for (and guarded by the
admin token), readiness that follows the models the server needs, /metrics on --metrics-address,
startup errors (ports in use, no repository) as one line and exit 2 before anything binds, a drain
that answers UNAVAILABLE from its first moment, and the version policy (refusals counted and
reported; the newest valid, loadable version on disk serves)."""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import RunningServer, clone_version, free_port, settings

from attnrec.engine.client import RecommenderClient, request
from attnrec.engine.repository import newest_valid_version
from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as rpb
from attnrec.engine.rpc.attnrec.v1 import recommender_pb2_grpc as rpb_grpc
from attnrec.engine.rpc.inference import grpc_service_pb2 as ipb
from attnrec.engine.rpc.inference import grpc_service_pb2_grpc as ipb_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture()
def own_repo(trained_repo, tmp_path):
    src, _ = newest_valid_version(trained_repo[1], "seq")
    clone_version(src, tmp_path / "repo")
    return tmp_path / "repo"


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _health(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_watch_streams_serving_then_not_serving_on_drain(own_repo):
    s = RunningServer(settings(own_repo, grace=5))
    seen: queue.Queue = queue.Queue()
    channel = grpc.insecure_channel(s.target)
    watches = {
        name: health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=name), timeout=60)
        for name in ("", "attnrec.v1.Recommender")
    }

    def read(name, watch):
        try:
            for reply in watch:
                seen.put((name, reply.status))
        except grpc.RpcError as exc:
            seen.put((name, exc.code()))

    readers = [threading.Thread(target=read, args=item, daemon=True) for item in watches.items()]
    try:
        for t in readers:
            t.start()
        first = {seen.get(timeout=10), seen.get(timeout=10)}
        assert first == {("", SERVING), ("attnrec.v1.Recommender", SERVING)}  # was INTERNAL
    finally:
        started = time.monotonic()
        s.stop()  # the drain: NOT_SERVING first, then the streams end with the server
    for t in readers:
        t.join(10)
    got = [seen.get_nowait() for _ in range(seen.qsize())]
    for name in watches:
        statuses = [status for who, status in got if who == name]
        assert statuses[0] == NOT_SERVING and grpc.StatusCode.INTERNAL not in statuses, statuses
    assert time.monotonic() - started < 4  # open Watch streams do not hold the drain for its grace period
    channel.close()


def test_model_control_is_off_unless_asked_for(own_repo):
    with RunningServer(settings(own_repo)) as s, grpc.insecure_channel(s.target) as ch:
        kserve, rec = ipb_grpc.GRPCInferenceServiceStub(ch), rpb_grpc.RecommenderStub(ch)
        for call in (
            lambda: kserve.RepositoryModelUnload(ipb.RepositoryModelUnloadRequest(model_name="pipeline")),
            lambda: kserve.RepositoryModelLoad(ipb.RepositoryModelLoadRequest(model_name="pipeline")),
            lambda: rec.ReloadModel(rpb.ReloadModelRequest()),
        ):
            assert _code(call) == grpc.StatusCode.PERMISSION_DENIED
        assert kserve.ServerReady(ipb.ServerReadyRequest()).ready and _health(ch) == SERVING
        assert len(rec.Recommend(request(["1"], 3), timeout=10).items) == 3


def test_the_admin_token_guards_model_control_and_unloading_pipeline_takes_readiness_down(own_repo):
    user, admin = (("authorization", "Bearer usr"),), (("authorization", "Bearer adm"),)
    with (
        RunningServer(settings(own_repo, auth_token="usr", admin_token="adm")) as s,
        grpc.insecure_channel(s.target) as ch,
    ):
        kserve, rec = ipb_grpc.GRPCInferenceServiceStub(ch), rpb_grpc.RecommenderStub(ch)
        unload = lambda md: kserve.RepositoryModelUnload(  # noqa: E731
            ipb.RepositoryModelUnloadRequest(model_name="pipeline"), metadata=md, timeout=30
        )
        assert _code(lambda: unload(())) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: unload((("authorization", "Bearer nope"),))) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: unload(user)) == grpc.StatusCode.PERMISSION_DENIED
        assert (
            _code(lambda: rec.ReloadModel(rpb.ReloadModelRequest(), metadata=user)) == grpc.StatusCode.PERMISSION_DENIED
        )
        assert rec.ReloadModel(rpb.ReloadModelRequest(), metadata=admin, timeout=60).version == 1
        assert len(rec.Recommend(request(["1"], 3), metadata=user, timeout=10).items) == 3  # untouched so far

        unload(admin)
        assert not kserve.ServerReady(ipb.ServerReadyRequest(), metadata=user).ready
        assert _health(ch) == _health(ch, "attnrec.v1.Recommender") == NOT_SERVING
        assert _health(ch, "inference.GRPCInferenceService") == SERVING  # its encoder still serves
        assert _code(lambda: rec.Recommend(request(["1"], 3), metadata=user, timeout=10)) == grpc.StatusCode.UNAVAILABLE

        kserve.RepositoryModelLoad(ipb.RepositoryModelLoadRequest(model_name="pipeline"), metadata=admin, timeout=60)
        assert kserve.ServerReady(ipb.ServerReadyRequest(), metadata=user).ready
        assert _health(ch) == _health(ch, "attnrec.v1.Recommender") == SERVING
        assert len(rec.Recommend(request(["1"], 3), metadata=admin, timeout=10).items) == 3  # admin may serve too


def test_metrics_listen_on_the_grpc_address_unless_told_otherwise(own_repo):
    port = free_port()
    with RunningServer(settings(own_repo, address="127.0.0.1", metrics_port=port)):
        assert b"attnrec_requests_total" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        with pytest.raises(urllib.error.URLError):  # another loopback address: nothing listens there (was 0.0.0.0)
            urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5)
    port = free_port()
    with RunningServer(settings(own_repo, address="127.0.0.1", metrics_port=port, metrics_address="127.0.0.2")):
        assert b"attnrec_requests_total" in urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5).read()


def _serve(argv: list[str], capsys) -> tuple[int, str]:
    from attnrec.cli import main

    rc = main(["serve", *argv])  # (the test sets COLUMNS: rich wraps at the terminal's width)
    out = capsys.readouterr()
    return rc, " ".join((out.out + out.err).split())  # one logical line, however rich wraps it


def test_startup_errors_are_one_line_and_exit_2_before_anything_binds(own_repo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        common = ["--repo", str(own_repo), "--address", "127.0.0.1"]
        rc, out = _serve([*common, "--port", str(taken), "--metrics-port", "0"], capsys)
        assert rc == 2 and f"--port {taken} is in use" in out and "listening" not in out and "Traceback" not in out
        free = free_port()
        rc, out = _serve([*common, "--port", str(free), "--metrics-port", str(taken)], capsys)
        assert rc == 2 and f"--metrics-port {taken} is in use" in out and "listening" not in out, out
        with socket.socket() as probe:  # the gRPC port was never bound
            probe.bind(("127.0.0.1", free))
    for extra in ([], ["--model", "seq"]):
        port = free_port()
        rc, out = _serve(["--repo", str(tmp_path / "nowhere"), "--port", str(port), *extra], capsys)
        assert rc == 2 and "the folder does not exist" in out and str(tmp_path / "nowhere") in out, out
        assert "listening" not in out
    rc, out = _serve(["--repo", str(own_repo), "--model", "other", "--port", "0", "--metrics-port", "0"], capsys)
    assert rc == 2 and "no versions of model 'other'" in out and "listening" not in out, out


def test_a_drain_answers_unavailable_from_its_first_moment(own_repo):
    s = RunningServer(settings(own_repo, grace=20))
    gate, replies, errors = threading.Event(), [], []

    def frames():
        yield request(["1"], 3, request_id="a")
        gate.wait(30)
        yield request(["2"], 3, request_id="b")

    def stream():
        try:
            replies.extend(RecommenderClient(s.target).recommend_stream(frames()))
        except grpc.RpcError as exc:
            errors.append(exc)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    drained = None
    try:
        deadline = time.monotonic() + 20
        while not replies and time.monotonic() < deadline:  # the stream is in flight
            time.sleep(0.02)
        drained = asyncio.run_coroutine_threadsafe(s.server.drain(), s.loop)
        while not s.server.drainer.refusing and time.monotonic() < deadline:
            time.sleep(0.01)
        with grpc.insecure_channel(s.target) as ch:
            for _ in range(5):
                with pytest.raises(grpc.RpcError) as err:
                    rpb_grpc.RecommenderStub(ch).Recommend(request(["1"], 3), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
                assert _code(lambda: ipb_grpc.GRPCInferenceServiceStub(ch).ServerLive(ipb.ServerLiveRequest())) == (
                    grpc.StatusCode.UNAVAILABLE
                )
            assert _health(ch) == NOT_SERVING  # health checks still answer
        gate.set()
        t.join(20)
        drained.result(30)
    finally:
        gate.set()
        if drained is None:
            s.stop()
        else:
            s.loop.call_soon_threadsafe(s.loop.stop)
            s.thread.join(10)
    assert not errors and [r.request_id for r in replies] == ["a", "b"]  # the stream in flight finished


def _corrupt_copy(repo, src_version: int, version: int) -> None:
    """Version `version`: a copy of `src_version` with one byte changed (its checksum fails)."""
    building = repo / "seq" / f".building-{version}"
    shutil.copytree(repo / "seq" / str(src_version), building)
    manifest = json.loads((building / "manifest.json").read_text())
    manifest["version"] = version
    (building / "manifest.json").write_text(json.dumps(manifest))
    with open(building / "item_popularity.npy", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    building.rename(repo / "seq" / str(version))


def test_the_newest_valid_loadable_version_serves_and_refusals_are_counted_and_reported(own_repo, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx graph")
    clone_version(own_repo / "seq" / "1", own_repo, ranker_onnx=garbage, n_candidates=20)  # 2: verifies, fails to load
    _corrupt_copy(own_repo, 1, 3)  # 3: fails verification
    with RunningServer(settings(own_repo, model_control=True)) as s:
        refused = lambda: s.server.telemetry.model_loads.labels("seq", "refused")._value.get()  # noqa: E731
        assert s.server.models.slot.current.version == 1 and refused() == 2  # was 0: only logged
        with grpc.insecure_channel(s.target) as ch:
            rec = rpb_grpc.RecommenderStub(ch)
            reply = rec.ReloadModel(rpb.ReloadModelRequest(), timeout=60)
            assert reply.version == 1 and [r.version for r in reply.refused_versions] == [3, 2]
            assert "does not match the manifest" in reply.refused_versions[0].reason
            assert "failed to load" in reply.refused_versions[1].reason
            assert refused() == 4

            clone_version(own_repo / "seq" / "1", own_repo)  # 4: good
            reply = rec.ReloadModel(rpb.ReloadModelRequest(), timeout=60)
            assert reply.version == 4 and not reply.refused_versions
            shutil.rmtree(own_repo / "seq" / "4")  # deleted while serving: the newest version that loads takes over
            reply = rec.ReloadModel(rpb.ReloadModelRequest(), timeout=60)
            assert reply.version == 1 and [r.version for r in reply.refused_versions] == [3, 2]
            assert len(rec.Recommend(request(["1"], 3), timeout=10).items) == 3
            for version in (1, 2, 3):  # nothing on disk loads: the version in memory keeps serving
                shutil.rmtree(own_repo / "seq" / str(version))
            reply = rec.ReloadModel(rpb.ReloadModelRequest(), timeout=60)
            assert reply.version == 1 and not reply.refused_versions
            assert len(rec.Recommend(request(["1"], 3), timeout=10).items) == 3


def test_the_new_settings_parse_from_flags_environment_and_file(tmp_path):
    import argparse

    from attnrec.engine.settings import add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = from_args(parser.parse_args(["--repo", "r", "--model-control", "--metrics-address", "127.0.0.2"]), {})
    assert s.model_control and s.metrics_host == "127.0.0.2"
    s = from_args(parser.parse_args(["--repo", "r", "--address", "[::1]"]), {"ATTNREC_MODEL_CONTROL": "yes"})
    assert s.model_control and s.metrics_host == "::1"  # /metrics follows --address by default
    assert not from_args(
        parser.parse_args(["--repo", "r", "--no-model-control"]), {"ATTNREC_MODEL_CONTROL": "1"}
    ).model_control
    with pytest.raises(ValueError, match="ATTNREC_MODEL_CONTROL"):
        from_args(parser.parse_args(["--repo", "r"]), {"ATTNREC_MODEL_CONTROL": "maybe"})
    (tmp_path / "a.toml").write_text('repo = "r"\nmodel-control = true\nadmin-token-file = "adm.txt"\n')
    (tmp_path / "adm.txt").write_text("sesame\n")
    s = from_args(parser.parse_args(["--config", str(tmp_path / "a.toml")]), {})
    assert s.model_control and s.admin_token_file.name == "adm.txt"
    assert from_args(
        parser.parse_args(["--repo", "r", "--admin-token-file", str(tmp_path / "adm.txt")]), {}
    ).admin() == ("sesame")
    help_text = parser.format_help()
    for flag in ("--metrics-address", "--model-control", "--admin-token", "--admin-token-file"):
        assert flag in help_text
