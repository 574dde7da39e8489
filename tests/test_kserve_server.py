"""`attnrec serve`'s own KServe V2 surface: tritonclient (unchanged, from PyPI) against the real
server, host and batchers — the same answers as the domain API and the bare ONNX session."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from serving import RunningServer, settings
from tritonclient.utils import InferenceServerException

from attnrec.engine.client import RecommenderClient
from attnrec.engine.encoder import OnnxEncoder
from attnrec.engine.pipeline import encode
from attnrec.engine.repository import newest_valid_version


@pytest.fixture(scope="module")
def served(trained_repo):
    _, repo = trained_repo
    with RunningServer(settings(repo, max_batch_size=8, max_queue_delay_us=500)) as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    c = tc.InferenceServerClient(served.target)
    yield c
    c.close()


def test_server_lists_the_models_and_their_batching(client, served):
    assert client.is_server_live() and client.is_server_ready()
    names = [m.name for m in client.get_model_repository_index().models]
    assert names == ["encoder", "ranker", "pipeline"]  # the fixture trains a ranker too
    version = str(served.server.models.slot.current.version)
    for name in names:
        assert client.is_model_ready(name) and client.is_model_ready(name, version)
        config = client.get_model_config(name).config
        assert config.max_batch_size == 8
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
    optional = {i.name for i in client.get_model_config("pipeline").config.input if i.optional}
    assert optional == {
        "k",
        "exclude",
        "n_candidates",
        "user_id",
        "history_timestamps",
        "include_attributes",
        "exclude_attributes",
        "diversity",
        "popularity_calibration",
    }
    meta = client.get_model_metadata("pipeline")
    assert meta.platform == "attnrec_pipeline" and meta.versions == [version]
    assert {t.name for t in meta.inputs} >= {"history", "k"}


def test_encoder_infer_equals_the_onnx_session(client, trained_repo):
    path, manifest = newest_valid_version(trained_repo[1], "seq")
    session = OnnxEncoder(path / "encoder.onnx", manifest.model.max_len)
    tokens = np.array([[0, 0, 3, 9, 2], [4, 1, 7, 7, 5]], dtype=np.int64)
    inp = tc.InferInput("history", list(tokens.shape), "INT64")
    inp.set_data_from_numpy(tokens)
    got = client.infer("encoder", [inp], outputs=[tc.InferRequestedOutput("query")]).as_numpy("query")
    np.testing.assert_allclose(got, encode(session, tokens)["query"], atol=1e-5)


def test_pipeline_infer_equals_recommend(client, served):
    ids = served.server.models.slot.current.compute.item_ids.astype(str)
    history = np.array([[ids[5].encode(), ids[11].encode(), ids[2].encode()]], dtype=object)
    inputs = [tc.InferInput("history", [1, 3], "BYTES"), tc.InferInput("k", [1, 1], "INT64")]
    inputs[0].set_data_from_numpy(history)
    inputs[1].set_data_from_numpy(np.array([[7]], dtype=np.int64))
    result = client.infer("pipeline", inputs)
    with RecommenderClient(served.target) as rc:
        want = rc.recommend([ids[5], ids[11], ids[2]], 7)
    assert [x.decode() for x in result.as_numpy("items")[0]] == want.items
    np.testing.assert_allclose(result.as_numpy("scores")[0], want.scores, atol=1e-6)
    stats = client.get_inference_statistics("pipeline").model_stats[0]
    assert stats.inference_stats.success.count >= 1 and stats.execution_count >= 1


def test_bad_tensor_and_unknown_model_get_status_codes(client):
    bad = tc.InferInput("history", [1, 2], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 2), np.float32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("encoder", [bad])
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT" and "history" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("no-such-model")
    assert exc.value.status() == "StatusCode.NOT_FOUND"


def test_reflection_lists_every_service(served):
    import grpc

    with grpc.insecure_channel(served.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"attnrec.v1.Recommender", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        method = db.FindFileContainingSymbol("inference.GRPCInferenceService")
        assert any(s.name == "GRPCInferenceService" for s in method.service)
