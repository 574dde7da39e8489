"""Generated hostile requests for both gRPC services (hypothesis, seeded and derandomized), sent as
raw bytes over a real channel: random bodies, boundary values, wrong tensors, huge declared shapes,
invalid UTF-8, unknown and oversized model names, broken stream frames, admin RPCs.

`fuzz(target, n)` sends `n` generated cases and returns what came back: a Counter of final status
codes and the cases that broke the contract (UNKNOWN, INTERNAL, a stream that lost replies).
tests/test_fuzz.py asserts on it; the same function can be pointed at any running server.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnrec.engine.rpc.attnrec.v1 import recommender_pb2 as rpb
from attnrec.engine.rpc.inference import grpc_service_pb2 as ipb

RECOMMENDER = "/attnrec.v1.Recommender/"
INFERENCE = "/inference.GRPCInferenceService/"

UNARY = [RECOMMENDER + m for m in ("Recommend", "GetModelInfo", "ReloadModel")] + [
    INFERENCE + m
    for m in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    )
]
STREAMS = [RECOMMENDER + "RecommendStream", INFERENCE + "ModelStreamInfer"]
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
DATATYPES += ["FP16", "FP32", "FP64", "BYTES", "BF16", "", "STRING"]
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@dataclass
class Outcome:
    codes: Counter = field(default_factory=Counter)  # final status code name → count
    broken: list[str] = field(default_factory=list)  # what broke the contract, with the case

    @property
    def sent(self) -> int:
        return sum(self.codes.values())


# ── building blocks ─────────────────────────────────────────────────────────────────────────
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string_field(number: int, data: bytes) -> bytes:
    """A length-delimited field written by hand (protobuf's own encoder refuses invalid UTF-8)."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


INVALID_UTF8 = [b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80", b"\xf8\x88\x80\x80\x80"]
ids = st.one_of(
    st.sampled_from(["1", "2", "7", "42", "299", "300", "", "0", "-1", "00001", "1e3"]),
    st.text(max_size=12),
)
u32 = st.one_of(st.sampled_from([0, 1, 2, 10, 999, 1000, 1001, 2**31 - 1, 2**32 - 1]), st.integers(0, 2**32 - 1))
big_name = st.sampled_from(["x" * 1_000_000, "n" * 20_000, "é" * 5000])
model_names = st.one_of(st.sampled_from(["encoder", "ranker", "pipeline", "", "seq", "nope", "../seq"]), big_name)
dims = st.one_of(
    st.sampled_from([0, 1, 2, 3, 16, 17, 64, 65, 10**8, 10**13, 2**31, 2**62, 2**63 - 1, -1, -(2**63)]),
    st.integers(-3, 70),
)
shapes = st.one_of(st.lists(dims, max_size=4), st.sampled_from([[1, 10**8], [1, 10**13], [10**13, 10**13]]))


@st.composite
def recommend_body(draw) -> bytes:
    r = rpb.RecommendRequest(
        history=draw(st.lists(ids, max_size=30)),
        k=draw(u32),
        exclude=draw(st.lists(ids, max_size=5)),
        n_candidates=draw(u32),
        include_timings=draw(st.booleans()),
        request_id=draw(st.text(max_size=8)),
    )
    body = r.SerializeToString()
    if draw(st.integers(0, 4)) == 0:  # a history/exclude/request_id string that is not UTF-8
        body += _string_field(draw(st.sampled_from([1, 3, 6])), draw(st.sampled_from(INVALID_UTF8)))
    return body


def _bytes_elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


@st.composite
def raw_content(draw, datatype: str, shape: list[int]) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:  # BYTES elements, some not UTF-8
        elems = draw(
            st.lists(st.one_of(st.sampled_from(INVALID_UTF8), st.binary(max_size=6), ids.map(str.encode)), max_size=12)
        )
        return _bytes_elements(elems)
    if kind == 2:  # a length prefix claiming more than is there
        return struct.pack("<I", draw(st.sampled_from([5, 2**31, 2**32 - 1]))) + b"ab"
    if kind == 3:  # the right size for a small shape, garbage values
        count = 1
        for d in shape:
            count *= max(d, 0)
        width = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "UINT32": 4, "INT32": 4}
        nbytes = count * width.get(datatype, 8)
        return draw(st.binary(min_size=nbytes, max_size=nbytes)) if 0 <= nbytes <= 4096 else b"\x00" * 8
    if kind == 4:
        return b""
    return struct.pack("<q", draw(st.sampled_from([0, 1, 300, 301, -1, 2**63 - 1, -(2**63)]))) * draw(st.integers(1, 6))


@st.composite
def infer_request(draw) -> ipb.ModelInferRequest:
    r = ipb.ModelInferRequest(model_name=draw(model_names), model_version=draw(st.sampled_from(["", "1", "9", "x"])))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 4))):
        name = draw(
            st.sampled_from(
                ["history", "k", "exclude", "n_candidates", "hidden", "candidates", "candidate_scores", "nope", ""]
            )
        )
        datatype = draw(st.sampled_from(DATATYPES))
        shape = draw(shapes)
        t = r.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw:
            r.raw_input_contents.append(draw(raw_content(datatype, shape)))
        else:
            which = draw(st.integers(0, 5))
            if which == 0:
                t.contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20)))
            elif which == 1:
                t.contents.bytes_contents.extend(
                    draw(st.lists(st.one_of(st.sampled_from(INVALID_UTF8), ids.map(str.encode)), max_size=20))
                )
            elif which == 2:
                t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=20)))
            elif which == 3:
                t.contents.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20)))
            elif which == 4:
                t.contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=20)))
        if draw(st.integers(0, 6)) == 0:
            t.parameters[draw(st.sampled_from(["shared_memory_region", "x"]))].string_param = "y"
    for _ in range(draw(st.integers(0, 2))):
        r.outputs.add(name=draw(st.sampled_from(["items", "scores", "query", "hidden", "nope"])))
    if draw(st.integers(0, 5)) == 0:
        key = draw(st.sampled_from(["timeout", "sequence_id", "priority"]))
        r.parameters[key].int64_param = draw(st.sampled_from([-1, 0, 1, 10**12]))
    return r


@st.composite
def infer_body(draw) -> bytes:
    body = draw(infer_request()).SerializeToString()
    if draw(st.integers(0, 5)) == 0:  # model_name / id that is not UTF-8
        body += _string_field(draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from(INVALID_UTF8)))
    return body


@st.composite
def named_body(draw, cls) -> bytes:
    """A KServe message whose fields are `name`/`version`/`model_name` strings (some not UTF-8)."""
    fields = {f.name: f for f in cls.DESCRIPTOR.fields}
    msg = cls()
    for key in ("name", "model_name"):
        if key in fields:
            setattr(msg, key, draw(model_names))
    if "version" in fields:
        msg.version = draw(st.sampled_from(["", "1", "2", "x", "9" * 40]))
    body = msg.SerializeToString()
    string_fields = [f.number for f in cls.DESCRIPTOR.fields if f.type == f.TYPE_STRING]
    if string_fields and draw(st.integers(0, 3)) == 0:
        body += _string_field(draw(st.sampled_from(string_fields)), draw(st.sampled_from(INVALID_UTF8)))
    return body


GARBAGE = [b"\x0a\x02\xff\xfe\x10\x0a", b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08", b"\x12\x05ab"]
garbage = st.one_of(st.sampled_from(GARBAGE), st.binary(min_size=1, max_size=40))


def _body_for(method: str):
    name = method.rsplit("/", 1)[1]
    if name == "Recommend":
        return recommend_body()
    if name == "ModelInfer":
        return infer_body()
    request_type = {
        "GetModelInfo": None,
        "ReloadModel": None,
        "ServerLive": None,
        "ServerReady": None,
        "ServerMetadata": None,
        "ModelReady": ipb.ModelReadyRequest,
        "ModelMetadata": ipb.ModelMetadataRequest,
        "ModelConfig": ipb.ModelConfigRequest,
        "ModelStatistics": ipb.ModelStatisticsRequest,
        "RepositoryIndex": None,
        "RepositoryModelLoad": ipb.RepositoryModelLoadRequest,
        "RepositoryModelUnload": ipb.RepositoryModelUnloadRequest,
    }[name]
    return st.just(b"") if request_type is None else named_body(request_type)


@st.composite
def unary_case(draw) -> tuple[str, bytes]:
    method = draw(st.sampled_from(UNARY))
    body = draw(garbage) if draw(st.integers(0, 3)) == 0 else draw(_body_for(method))
    return method, body


@st.composite
def stream_case(draw) -> tuple[str, list[bytes]]:
    method = draw(st.sampled_from(STREAMS))
    frame = recommend_body() if method.endswith("RecommendStream") else infer_body()
    return method, draw(st.lists(st.one_of(garbage, frame), min_size=1, max_size=5))


# ── sending ─────────────────────────────────────────────────────────────────────────────────
def _identity(x: bytes) -> bytes:
    return x


def _record(out: Outcome, code: grpc.StatusCode, case: str, details: str = "") -> None:
    out.codes[code.name] += 1
    if code in BAD:
        out.broken.append(f"{code.name} {details[:200]!r} for {case[:300]}")


def _send_unary(channel: grpc.Channel, out: Outcome, method: str, body: bytes, metadata, timeout: float) -> None:
    call = channel.unary_unary(method, request_serializer=_identity, response_deserializer=_identity)
    try:
        call(body, timeout=timeout, metadata=metadata)
        _record(out, grpc.StatusCode.OK, "")
    except grpc.RpcError as exc:
        _record(out, exc.code(), f"{method} {body[:120]!r} ({len(body)} bytes)", exc.details() or "")


def _send_stream(channel: grpc.Channel, out: Outcome, method: str, frames: list[bytes], metadata, timeout: float):
    call = channel.stream_stream(method, request_serializer=_identity, response_deserializer=_identity)
    case = f"{method} frames {[f[:60] for f in frames]!r}"
    try:
        replies = list(call(iter(frames), timeout=timeout, metadata=metadata))
        _record(out, grpc.StatusCode.OK, case)
        if len(replies) != len(frames):  # the contract: one reply per frame, the stream goes on
            out.broken.append(f"{len(replies)} replies to {len(frames)} frames for {case}")
        for reply in replies:  # in-band errors must not be INTERNAL either
            text = reply.decode("latin-1")
            if "INTERNAL" in text or "UNKNOWN" in text:
                out.broken.append(f"in-band {text[:200]!r} for {case}")
    except grpc.RpcError as exc:
        _record(out, exc.code(), case, exc.details() or "")


def fuzz(target: str, n: int = 300, *, metadata=(), timeout: float = 10.0, streams: float = 0.2) -> Outcome:
    """Send `n` generated cases (about `streams` of them stream calls) to `target`; what came back."""
    out = Outcome()
    options = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
    with grpc.insecure_channel(target, options=options) as channel:

        @settings(
            max_examples=n,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=["generate"],  # no shrinking: every case is sent once and counted
        )
        @given(pick=st.floats(0, 1), unary=unary_case(), stream=stream_case())
        def send(pick, unary, stream):
            if pick < streams:
                _send_stream(channel, out, *stream, metadata, timeout)
            else:
                _send_unary(channel, out, *unary, metadata, timeout)

        send()
    return out
