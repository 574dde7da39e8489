"""Bad input on the wire, against the real server over a real port: bodies that do not parse, broken
stream frames, invalid UTF-8 in BYTES tensors, declared shapes the bytes sent cannot fill, oversized
echoed values, and what the log says about all of it."""

from __future__ import annotations

import logging
import struct
import time
import tracemalloc

import grpc
import numpy as np
import pytest
from google.protobuf.message_factory import GetMessageClass
from memory import PeakRss
from serving import RunningServer, settings

from attnrec.engine.errors import InvalidRequest
from attnrec.engine.kserve.tensors import DTYPES, from_contents, from_raw
from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as rpb
from attnrec.engine.rpc.inference import grpc_service_pb2 as ipb

SERVICES = [rpb.DESCRIPTOR.services_by_name["Recommender"], ipb.DESCRIPTOR.services_by_name["GRPCInferenceService"]]
BROKEN = b"\x0a\x02\xff\xfe\x10\x0a"  # the issue's: history[0] holds invalid UTF-8, then k = 10


@pytest.fixture(scope="module")
def served(trained_repo):
    # model control on: the admin methods get as far as decoding their request too
    with RunningServer(settings(trained_repo[1], address="127.0.0.1", model_control=True)) as s:
        yield s


@pytest.fixture(scope="module")
def channel(served):
    options = [("grpc.max_send_message_length", 8 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{served.port}", options=options) as ch:
        yield ch


def _raw(channel, method: str, body: bytes, **kw):
    return channel.unary_unary(method)(body, timeout=10, **kw)


def _code_of(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_a_body_that_does_not_parse_is_invalid_argument_on_every_method(channel):
    assert _code_of(lambda: _raw(channel, "/attnrec.v1.Recommender/Recommend", BROKEN)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "could not parse the request (6 bytes) as attnrec.v1.RecommendRequest: DecodeError "
        "(not valid protobuf, or a string field that is not valid UTF-8)",
    )
    for service in SERVICES:
        for m in service.methods:
            path = f"/{service.full_name}/{m.name}"
            if m.client_streaming:
                continue  # below: answered in-band
            code, details = _code_of(lambda: _raw(channel, path, b"\xff"))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (path, code, details)
            assert details.startswith("could not parse the request") and m.input_type.full_name in details


def test_a_frame_that_does_not_parse_is_answered_in_band_and_the_stream_goes_on(channel):
    good = rpb.RecommendRequest(history=["1", "2"], k=3, request_id="a").SerializeToString()
    later = rpb.RecommendRequest(history=["3"], k=2, request_id="c").SerializeToString()
    call = channel.stream_stream(
        "/attnrec.v1.Recommender/RecommendStream", response_deserializer=rpb.RecommendReply.FromString
    )
    replies = list(call(iter([good, BROKEN, later]), timeout=20))
    assert [r.request_id for r in replies] == ["a", "", "c"]
    assert len(replies[0].items) == 3 and len(replies[2].items) == 2
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert replies[1].error.message.startswith("could not parse the request (6 bytes) as attnrec.v1.RecommendRequest")

    tokens = np.ones((1, 2), dtype=np.int64)
    infer = ipb.ModelInferRequest(model_name="encoder", id="x")
    infer.inputs.add(name="history", datatype="INT64", shape=[1, 2])
    infer.raw_input_contents.append(tokens.tobytes())
    call = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        response_deserializer=ipb.ModelStreamInferResponse.FromString,
    )
    frames = [infer.SerializeToString(), b"\x0a\x03\xff\xfe\xfd", infer.SerializeToString()]
    replies = list(call(iter(frames), timeout=20))
    assert len(replies) == 3
    errors = [r.error_message for r in replies if r.error_message]
    assert len(errors) == 1 and errors[0].startswith("INVALID_ARGUMENT: could not parse the request (5 bytes)")
    assert [r.infer_response.id for r in replies if not r.error_message] == ["x", "x"]


def test_a_backfill_frame_that_does_not_parse_ends_the_call_with_invalid_argument(channel):
    good = rpb.RecordEventsRequest(user_id="backfill-u", items=["1", "2"]).SerializeToString()
    call = channel.stream_unary(
        "/attnrec.v1.Recommender/RecordEventsStream", response_deserializer=rpb.RecordEventsStreamReply.FromString
    )
    code, details = _code_of(lambda: call(iter([good, BROKEN]), timeout=20))  # BROKEN: user_id not UTF-8
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("could not parse the request (6 bytes) as attnrec.v1.RecordEventsRequest")
    assert call(iter([good]), timeout=20).requests == 1  # the stream's contract holds for the next call


def _bytes_tensor(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def _pipeline_request(history_raw: bytes, width: int, exclude_raw: bytes | None = None) -> bytes:
    r = ipb.ModelInferRequest(model_name="pipeline")
    r.inputs.add(name="history", datatype="BYTES", shape=[1, width])
    r.raw_input_contents.append(history_raw)
    if exclude_raw is not None:
        r.inputs.add(name="exclude", datatype="BYTES", shape=[1, 1])
        r.raw_input_contents.append(exclude_raw)
    return r.SerializeToString()


def test_invalid_utf8_in_a_bytes_tensor_is_invalid_argument_naming_it(channel):
    ok = _bytes_tensor(b"1", b"2")
    assert _code_of(lambda: _raw(channel, "/inference.GRPCInferenceService/ModelInfer", _pipeline_request(ok, 2)))[
        0
    ] == (grpc.StatusCode.OK)
    for body, name in (
        (_pipeline_request(_bytes_tensor(b"1", b"\xff\xfe"), 2), "history"),
        (_pipeline_request(ok, 2, _bytes_tensor(b"\xc3\x28")), "exclude"),
    ):
        code, details = _code_of(lambda: _raw(channel, "/inference.GRPCInferenceService/ModelInfer", body))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert f"input '{name}'" in details and "not valid UTF-8" in details


@pytest.mark.parametrize("dims", [[1, 10**8], [1, 10**13]])
def test_a_declared_shape_the_bytes_cannot_fill_is_refused_before_anything_is_allocated(channel, dims):
    body = _pipeline_request(b"\x01\x00\x00\x00a", 0)
    r = ipb.ModelInferRequest.FromString(body)
    del r.inputs[0].shape[:]
    r.inputs[0].shape.extend(dims)
    body = r.SerializeToString()
    assert len(body) <= 45  # the 42-byte request (45 with the larger shape)
    with PeakRss() as memory:
        start = time.perf_counter()
        code, details = _code_of(lambda: _raw(channel, "/inference.GRPCInferenceService/ModelInfer", body))
        took = time.perf_counter() - start
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input 'history'" in details, details
    assert memory.growth < 50, f"RSS grew {memory.growth:.0f} MB for a {len(body)}-byte request"  # was 760 MB
    assert took < 2.0  # was 3 s, with every other client's requests waiting behind it


def test_no_datatype_allocates_from_a_declared_shape():
    """The tensor decoders themselves: a huge declared count with a few bytes is refused, and what
    they allocate stays near the bytes given (tracemalloc sees numpy's allocations)."""
    for datatype in DTYPES:
        for shape in ([1, 10**8], [10**6, 10**6], [2**31, 2**31]):
            tracemalloc.start()
            try:
                with pytest.raises(InvalidRequest, match="input 'x'"):
                    from_raw("x", datatype, shape, b"\x01\x00\x00\x00a\x00\x00\x00")
                with pytest.raises(InvalidRequest, match="input 'x'"):
                    from_contents("x", datatype, shape, ipb.InferTensorContents())
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 1 << 20, (datatype, shape, peak)
    with pytest.raises(InvalidRequest, match="dimensions"):
        from_raw("x", "INT64", [1] * 40, b"")
    assert from_raw("x", "BYTES", [0, 2**31 - 1], b"").shape == (0, 2**31 - 1)


def test_echoed_values_are_cut_short(channel):
    huge = "m" * 1_000_000
    cases = [
        (
            "/inference.GRPCInferenceService/ModelMetadata",
            ipb.ModelMetadataRequest(name=huge),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            "/inference.GRPCInferenceService/ModelInfer",
            ipb.ModelInferRequest(model_name=huge),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            "/inference.GRPCInferenceService/ModelConfig",
            ipb.ModelConfigRequest(name="encoder", version=huge),
            grpc.StatusCode.NOT_FOUND,
        ),
    ]
    wrong_input = ipb.ModelInferRequest(model_name="encoder")
    wrong_input.inputs.add(name=huge, datatype="INT64", shape=[1, 1])
    wrong_input.raw_input_contents.append(b"\x00" * 8)
    cases.append(("/inference.GRPCInferenceService/ModelInfer", wrong_input, grpc.StatusCode.INVALID_ARGUMENT))
    for method, message, want in cases:
        code, details = _code_of(lambda: _raw(channel, method, message.SerializeToString()))
        assert code == want, (method, code)  # not RESOURCE_EXHAUSTED: the message fits the client's metadata limit
        assert len(details) < 400 and "(1000000 characters)" in details, details[:300]


def test_client_errors_log_one_rate_limited_line_and_no_traceback(channel, caplog):
    caplog.set_level(logging.INFO)
    time.sleep(1.1)  # past the earlier tests' last client-error line: the next one is logged at once
    start = time.monotonic()
    for i in range(150):
        body = BROKEN if i % 3 == 0 else rpb.RecommendRequest(history=["1"], k=5000).SerializeToString()
        _code_of(lambda: _raw(channel, "/attnrec.v1.Recommender/Recommend", body))
        _code_of(lambda: _raw(channel, "/inference.GRPCInferenceService/ModelMetadata", b"\x0a\x01z"))
    seconds = time.monotonic() - start
    records = [r for r in caplog.records if r.name == "attnrec.engine.errors"]
    assert not any(r.exc_info or "Traceback" in r.getMessage() for r in caplog.records)
    assert all(r.levelno < logging.ERROR for r in caplog.records), [r.getMessage() for r in caplog.records][:3]
    assert 1 <= len(records) <= seconds + 2, [r.getMessage() for r in records]  # 300 client errors
    assert "more client errors since the previous line" in records[-1].getMessage() or len(records) == 1


def test_every_message_type_parses_what_it_serialises():
    """The decoder registered for each method is its own input type's (engine/decoding.py looks them up)."""
    from attnrec.engine.decoding import Undecodable, deserializer

    for service in SERVICES:
        for m in service.methods:
            cls = GetMessageClass(m.input_type)
            assert deserializer(cls)(cls().SerializeToString()) == cls()
            assert isinstance(deserializer(cls)(b"\xff"), Undecodable)
