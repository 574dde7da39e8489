"""The KServe V2 / Triton surface of the real server (`attnrec serve`'s Server: models, batchers,
loader) over a real port with a real published version, called with tritonclient (unchanged, from
PyPI) and with our own stubs. Every V2 datatype's conversions are checked through the servicer's own
request decoding and response encoding, over the wire format (no served model takes them all)."""

from __future__ import annotations

import queue
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from serving import RunningServer, settings
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from attnrec.engine.errors import InvalidRequest
from attnrec.engine.kserve import SERVICE_NAME
from attnrec.engine.kserve.servicer import decode_inputs, encode_response
from attnrec.engine.kserve.tensors import DTYPES, encode_bytes
from attnrec.engine.model_interface import TensorSpec
from attnrec.engine.rpc.inference import grpc_service_pb2 as pb
from attnrec.engine.rpc.inference import grpc_service_pb2_grpc as pb_grpc
from attnrec.engine.rpc.inference import model_config_pb2 as mc


@pytest.fixture(scope="module")
def served(trained_repo):
    """(url, models): the real server over the `trained_repo` version, with its model registry."""
    _, repo = trained_repo
    config = settings(
        repo, address="127.0.0.1", max_batch_size=64, max_queue_delay_us=500, max_queue_size=256, model_control=True
    )
    with RunningServer(config) as s:
        yield f"127.0.0.1:{s.port}", s.server.models


@pytest.fixture(scope="module")
def client(served):
    c = tc.InferenceServerClient(served[0])
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served[0]) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _session(models):
    """The encoder session the server loaded (the answers must be exactly its own)."""
    return models.slot.current.compute.encoder.session


def _histories(host, rng):
    n = host.slot.current.compute.n_items
    tokens = rng.integers(1, n + 1, size=(5, 9)).astype(np.int64)
    tokens[1, :4] = 0  # left padding, as pad_histories makes it
    tokens[3, :8] = 0
    return tokens


def _code(exc: InferenceServerException) -> str:
    return exc.status().rsplit(".", 1)[-1]


def test_our_messages_are_wire_compatible_with_tritons():
    """Every field we declare has Triton's number and type (names from tritonclient's own stubs)."""
    theirs = {**tc.service_pb2.DESCRIPTOR.message_types_by_name, **tc.model_config_pb2.DESCRIPTOR.message_types_by_name}

    def walk(ours, other):
        for f in ours.fields:
            g = other.fields_by_name[f.name]
            assert (f.number, f.type, f.is_repeated) == (g.number, g.type, g.is_repeated), f.full_name
            if f.message_type is not None:
                walk(f.message_type, g.message_type)
            if f.enum_type is not None:
                assert {v.name: v.number for v in f.enum_type.values}.items() <= {
                    v.name: v.number for v in g.enum_type.values
                }.items()

    for fd in (pb.DESCRIPTOR, mc.DESCRIPTOR):
        for name, message in fd.message_types_by_name.items():
            walk(message, theirs[name])
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    other = tc.service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == other.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        twin = other.methods_by_name[method.name]
        assert (method.input_type.name, method.output_type.name) == (twin.input_type.name, twin.output_type.name)


def test_health_and_metadata(client, served):
    host = served[1]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("encoder")
    assert client.is_model_ready("encoder", host.get("encoder").version)
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("encoder", "999")
    meta = client.get_server_metadata()
    assert meta.name == "attnrec" and "model_configuration" in meta.extensions
    model = client.get_model_metadata("encoder")
    dim = _session(host).get_outputs()[0].shape[-1]
    assert model.platform == "onnxruntime_onnx" and list(model.versions) == [host.get("encoder").version]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("history", "INT64", [-1, -1])]
    assert ("query", "FP32", [-1, dim]) in [(t.name, t.datatype, list(t.shape)) for t in model.outputs]


def test_model_config_follows_tritons_conventions(client, served):
    config = client.get_model_config("encoder").config
    dim = _session(served[1]).get_outputs()[0].shape[-1]
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "encoder",
        "onnxruntime_onnx",
        "onnxruntime",
        64,
    )
    # dims leave the batch dimension out when max_batch_size > 0
    assert [(i.name, tc.model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("history", "TYPE_INT64", [-1])
    ]
    query = next(o for o in config.output if o.name == "query")
    assert (tc.model_config_pb2.DataType.Name(query.data_type), list(query.dims)) == ("TYPE_FP32", [dim])
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == []  # the batcher aims for no particular sizes
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 256
    # the whole-path model's BYTES item ids are Triton's TYPE_STRING
    pipeline = client.get_model_config("pipeline").config
    history = next(i for i in pipeline.input if i.name == "history")
    assert tc.model_config_pb2.DataType.Name(history.data_type) == "TYPE_STRING"


def test_infer_raw_with_tritonclient_equals_the_session(client, served):
    host = served[1]
    session = _session(host)
    tokens = _histories(host, np.random.default_rng(0))
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"history": tokens})))
    inp = tc.InferInput("history", list(tokens.shape), "INT64")
    inp.set_data_from_numpy(tokens)
    result = client.infer("encoder", [inp], request_id="r-1")
    assert result.get_response().id == "r-1"
    assert result.get_response().model_version == host.get("encoder").version
    for name, value in expected.items():
        got = result.as_numpy(name)
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_array_equal(got, value)
    only = client.infer("encoder", [inp], outputs=[tc.InferRequestedOutput("query")])
    assert [o.name for o in only.get_response().outputs] == ["query"]
    np.testing.assert_array_equal(only.as_numpy("query"), expected["query"])


def test_pipeline_rerank_inputs_with_tritonclient(client, served):
    """The pipeline model's optional FP32 inputs diversity / popularity_calibration, over the wire."""
    host = served[1]
    meta = {i.name: i.datatype for i in client.get_model_metadata("pipeline").inputs}
    assert meta["diversity"] == "FP32" and meta["popularity_calibration"] == "FP32"
    ids = host.slot.current.item_keys
    hist = np.array([[x.encode() for x in ids[[3, 9, 4]]], [x.encode() for x in ids[[7, 1, 2]]]], dtype=object)
    strengths = {
        "diversity": np.array([[0.8], [0.0]], np.float32),
        "popularity_calibration": np.array([[0.0], [0.5]], np.float32),
    }
    inputs = [tc.InferInput("history", [2, 3], "BYTES")]
    inputs[0].set_data_from_numpy(hist)
    for name, value in strengths.items():
        inputs.append(tc.InferInput(name, [2, 1], "FP32"))
        inputs[-1].set_data_from_numpy(value)
    got = client.infer("pipeline", inputs).as_numpy("items")
    pipe = host.slot.current.compute
    rows = [np.array([host.slot.current.rows_by_key[x.decode()] for x in h]) for h in hist]
    want = pipe.recommend(rows, 10, diversity=strengths["diversity"][:, 0], popularity_calibration=[0.0, 0.5])
    assert got.tolist() == [[ids[r].encode() for r in w] for w in want.rows]
    assert got.tolist() != [[ids[r].encode() for r in w] for w in pipe.recommend(rows, 10).rows]


def test_infer_typed_contents_with_our_stubs(stub, served):
    host = served[1]
    session = _session(host)
    tokens = _histories(host, np.random.default_rng(1))
    request = pb.ModelInferRequest(model_name="encoder", id="typed")
    tensor = request.inputs.add(name="history", datatype="INT64", shape=list(tokens.shape))
    tensor.contents.int64_contents.extend(tokens.reshape(-1).tolist())
    request.outputs.add(name="query")
    response = stub.ModelInfer(request)
    assert response.id == "typed" and [o.name for o in response.outputs] == ["query"]
    out = response.outputs[0]
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(out.shape))
    np.testing.assert_array_equal(got, session.run(["query"], {"history": tokens})[0])


def _sample(datatype: str, rng) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([[b"", b"item-1", "ünïcode".encode()], [b"\x00\xff", b"x" * 300, b"z"]], dtype=object)
    dtype = DTYPES[datatype]
    if dtype.kind == "b":
        return rng.integers(0, 2, size=(2, 3)).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=(2, 3), dtype=dtype, endpoint=True)
        values[0, 0], values[0, 1] = info.min, info.max
        return values
    return rng.standard_normal((2, 3)).astype(dtype)


@dataclass
class Identity:
    """Tensor specs only: `x` of one datatype → `y` (the servicer's decoding and encoding read no more)."""

    datatype: str
    max_batch_size: int = 64
    version: str = "1"

    @property
    def name(self) -> str:
        return f"identity_{self.datatype.lower()}"

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("x", self.datatype, (-1, -1))]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("y", self.datatype, (-1, -1))]


def echo(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """The request over the wire (serialised and parsed), decoded, `x` answered as `y`, encoded, and
    the response over the wire again: what a served identity model would answer."""
    request = pb.ModelInferRequest.FromString(request.SerializeToString())
    model = Identity(request.inputs[0].datatype)
    response = encode_response(model, request, {"y": decode_inputs(model, request)["x"]}, None)
    return pb.ModelInferResponse.FromString(response.SerializeToString())


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_every_datatype_round_trips_raw_and_typed(datatype):
    rng = np.random.default_rng(7)
    x = _sample(datatype, rng)
    model = f"identity_{datatype.lower()}"
    raw = serialize_byte_tensor(x).item() if datatype == "BYTES" else x.tobytes()  # tritonclient's raw form
    answer = echo(_raw_request(model, "x", datatype, list(x.shape), raw))
    # read back as tritonclient reads a response
    y = tc.InferResult(tc.service_pb2.ModelInferResponse.FromString(answer.SerializeToString())).as_numpy("y")
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    if datatype == "FP16":  # no typed field: it must travel raw
        return
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype=datatype, shape=list(x.shape))
    field = {
        "BOOL": "bool_contents",
        "INT8": "int_contents",
        "INT16": "int_contents",
        "INT32": "int_contents",
        "INT64": "int64_contents",
        "UINT8": "uint_contents",
        "UINT16": "uint_contents",
        "UINT32": "uint_contents",
        "UINT64": "uint64_contents",
        "FP32": "fp32_contents",
        "FP64": "fp64_contents",
        "BYTES": "bytes_contents",
    }[datatype]
    getattr(tensor.contents, field).extend(x.reshape(-1).tolist())
    response = echo(request)
    assert response.outputs[0].datatype == datatype
    raw = response.raw_output_contents[0]
    if datatype == "BYTES":
        assert raw == encode_bytes(x)
    else:
        np.testing.assert_array_equal(np.frombuffer(raw, dtype=DTYPES[datatype]).reshape(x.shape), x)


def _raw_request(model, name, datatype, shape, raw):
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _fails(stub, request, code, *fragments):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in err.value.details(), err.value.details()


def test_bad_requests_get_clear_status_codes(stub, client):
    tokens = np.ones((2, 3), dtype=np.int64)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    ok_raw = tokens.tobytes()
    _fails(stub, _raw_request("nope", "history", "INT64", [2, 3], ok_raw), grpc.StatusCode.NOT_FOUND, "nope")
    versioned = _raw_request("encoder", "history", "INT64", [2, 3], ok_raw)
    versioned.model_version = "999"
    _fails(stub, versioned, grpc.StatusCode.NOT_FOUND, "999")
    _fails(stub, _raw_request("encoder", "history", "FP32", [2, 3], ok_raw), bad, "INT64", "FP32")
    _fails(stub, _raw_request("encoder", "history", "INT64", [2, 4], ok_raw), bad, "64 raw bytes", "got 48")
    _fails(stub, _raw_request("encoder", "histry", "INT64", [2, 3], ok_raw), bad, "no input 'histry'")
    _fails(stub, _raw_request("encoder", "history", "INT64", [6], ok_raw), bad, "shape")
    _fails(stub, _raw_request("encoder", "history", "INT64", [2, 3], (tokens * 10**6).tobytes()), bad, "tokens")
    _fails(stub, _raw_request("pipeline", "history", "BYTES", [1, 2], encode_bytes(np.array([b"a"]))), bad, "BYTES")
    _fails(stub, _raw_request("identity_bf16", "x", "BF16", [1, 1], b"\0\0"), grpc.StatusCode.NOT_FOUND)
    _fails(stub, _raw_request("encoder", "history", "BF16", [1, 1], b"\0\0"), bad, "BF16")
    mixed = _raw_request("encoder", "history", "INT64", [2, 3], ok_raw)
    mixed.inputs[0].contents.int64_contents.extend([1] * 6)
    _fails(stub, mixed, bad, "raw_input_contents")
    typed = pb.ModelInferRequest(model_name="encoder")
    typed.inputs.add(name="history", datatype="INT64", shape=[2, 3]).contents.fp32_contents.extend([1.0] * 6)
    _fails(stub, typed, bad, "int64_contents", "fp32_contents")
    short = pb.ModelInferRequest(model_name="encoder")
    short.inputs.add(name="history", datatype="INT64", shape=[2, 3]).contents.int64_contents.extend([1] * 5)
    _fails(stub, short, bad, "needs 6 elements, got 5")
    fp16 = pb.ModelInferRequest(model_name="identity_fp16")
    fp16.inputs.add(name="x", datatype="FP16", shape=[1, 1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidRequest, match="raw"):  # no served model reads FP16: through the servicer's decoding
        echo(fp16)
    wide = pb.ModelInferRequest(model_name="identity_int8")
    wide.inputs.add(name="x", datatype="INT8", shape=[1, 1]).contents.int_contents.append(300)
    with pytest.raises(InvalidRequest, match="range of INT8"):
        echo(wide)
    unknown_output = _raw_request("encoder", "history", "INT64", [2, 3], ok_raw)
    unknown_output.outputs.add(name="scores")
    _fails(stub, unknown_output, bad, "no output 'scores'")
    _fails(stub, pb.ModelInferRequest(model_name="encoder"), bad, "needs inputs ['history']")
    too_big = np.ones((65, 1), dtype=np.int64)
    _fails(stub, _raw_request("encoder", "history", "INT64", [65, 1], too_big.tobytes()), bad, "max_batch_size")
    with pytest.raises(InferenceServerException) as err:  # and as tritonclient users see it
        client.get_model_metadata("nope")
    assert _code(err.value) == "NOT_FOUND"


def test_statistics_count_what_ran(client, served):
    host = served[1]
    before = host.get("encoder").stats.inference_count
    tokens = _histories(host, np.random.default_rng(2))
    inp = tc.InferInput("history", list(tokens.shape), "INT64")
    inp.set_data_from_numpy(tokens)
    client.infer("encoder", [inp])
    stats = client.get_inference_statistics("encoder").model_stats
    assert len(stats) == 1 and stats[0].name == "encoder"
    assert stats[0].inference_count == before + len(tokens)
    assert stats[0].inference_stats.success.count == host.get("encoder").stats.success_count
    assert stats[0].inference_stats.success.ns > 0 and stats[0].last_inference > 0
    assert any(b.batch_size == len(tokens) and b.compute_infer.count >= 1 for b in stats[0].batch_stats)
    # real figures: preparing the batch's input tensors and splitting its outputs (engine/pipeline.py)
    times = stats[0].inference_stats
    assert times.compute_input.ns > 0 and times.compute_output.ns > 0 and times.compute_infer.ns > 0
    assert times.compute_input.count == times.compute_output.count == times.success.count
    everything = client.get_inference_statistics().model_stats
    assert {s.name for s in everything} == {m.name for m in host.models()}


def test_stream_infer_answers_every_request_with_its_id(client, served):
    host = served[1]
    session = _session(host)
    rng = np.random.default_rng(3)
    batches = [_histories(host, rng) for _ in range(4)]
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, tokens in enumerate(batches):
            inp = tc.InferInput("history", list(tokens.shape), "INT64")
            inp.set_data_from_numpy(tokens)
            client.async_stream_infer("encoder", [inp], request_id=str(i))
        client.async_stream_infer("nope", [inp], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(len(batches) + 1)]
    finally:
        client.stop_stream()
    errors = [e for r, e in got if e is not None]
    assert len(errors) == 1 and "nope" in str(errors[0])
    results = {r.get_response().id: r for r, e in got if e is None}
    assert sorted(results) == [str(i) for i in range(len(batches))]
    for i, tokens in enumerate(batches):
        np.testing.assert_array_equal(results[str(i)].as_numpy("query"), session.run(["query"], {"history": tokens})[0])


def test_repository_index_load_and_unload(client, stub, served):
    host = served[1]
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["encoder"].state == "READY" and index["encoder"].version == host.get("encoder").version
    client.unload_model("encoder")
    try:
        # the server keeps serving its other models; the unloaded one is listed UNAVAILABLE and refused
        assert not client.is_model_ready("encoder") and client.is_server_ready()
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["encoder"].state == "UNAVAILABLE" and index["pipeline"].state == "READY"
        ready_only = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
        assert "encoder" not in {m.name for m in ready_only} and "pipeline" in {m.name for m in ready_only}
        inp = tc.InferInput("history", [1, 1], "INT64")
        inp.set_data_from_numpy(np.ones((1, 1), dtype=np.int64))
        with pytest.raises(InferenceServerException) as err:
            client.infer("encoder", [inp])
        assert _code(err.value) == "UNAVAILABLE"
    finally:
        client.load_model("encoder")
    assert client.is_model_ready("encoder") and client.is_server_ready()
    with pytest.raises(InferenceServerException) as err:
        client.load_model("nope")
    assert _code(err.value) == "NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        client.load_model("encoder", config='{"max_batch_size": 8}')
    assert _code(err.value) == "INVALID_ARGUMENT"


def test_reflection_over_the_private_pool_describes_the_service(served):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(served[0]) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert SERVICE_NAME in database.get_services()
        service = DescriptorPool(database).FindServiceByName(SERVICE_NAME)
        assert {"ModelInfer", "ModelStreamInfer", "ModelConfig", "RepositoryModelLoad"} <= set(service.methods_by_name)


def test_regenerate_check_catches_an_edited_proto(tmp_path, monkeypatch, capsys):
    """`python -m attnrec.engine.rpc.regenerate --check` fails when a .proto changed after its stubs were made."""
    import shutil

    from attnrec.engine.rpc import regenerate

    assert regenerate.main(["--check"]) == 0
    protos = tmp_path / "proto"
    shutil.copytree(regenerate.PROTO_ROOT, protos)
    edited = protos / "inference" / "grpc_service.proto"
    edited.write_text(edited.read_text().replace("bool live = 1;", "bool live = 1;\n  string note = 2;"))
    monkeypatch.setattr(regenerate, "PROTO_ROOT", protos)
    assert regenerate.main(["--check"]) == 1
    assert "inference/grpc_service.proto" in capsys.readouterr().err
