"""The interceptors' one wrapper, on a real grpc.aio server: errors become status codes with their
message (unary and streams), every RPC is counted by its final code, auth denies both kinds, every
handler style runs (context.write streams as grpc_health's Watch, plain generators and functions),
and a body that did not parse (engine/decoding.py) is INVALID_ARGUMENT, not UNKNOWN."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from attnrec.engine.decoding import Undecodable
from attnrec.engine.errors import InvalidRequest
from attnrec.engine.interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor
from attnrec.engine.telemetry import Telemetry


async def unary(request: bytes, context) -> bytes:
    if request == b"bad":
        raise InvalidRequest("k must be in 1..10")
    if request == b"bug":
        raise ValueError("a secret internal detail")
    return request.upper()


async def stream(request: bytes, context):
    yield b"first"
    if request == b"bad":
        raise InvalidRequest("the second reply is refused")
    yield b"second"


async def written(request: bytes, context) -> None:
    """A stream that writes its replies itself (grpc_health's Watch does) and returns None."""
    await context.write(b"w1")
    if request == b"bad":
        raise InvalidRequest("refused after one write")
    await context.write(b"w2")


def plain_stream(request: bytes, context):
    yield b"g1"
    yield b"g2"


def plain_unary(request: bytes, context) -> bytes:
    return request[::-1]


def _strict(body: bytes) -> bytes:
    """A deserializer that refuses non-ASCII, as protobuf refuses what does not parse."""
    return body if body.isascii() else Undecodable("t.Message", len(body), "DecodeError")


@pytest.fixture(scope="module")
def server():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    telemetry = Telemetry()

    async def start():
        interceptors = [MetricsInterceptor(telemetry), AuthInterceptor("sesame"), ErrorInterceptor()]
        s = grpc.aio.server(interceptors=interceptors)
        handlers = {
            "U": grpc.unary_unary_rpc_method_handler(unary),
            "S": grpc.unary_stream_rpc_method_handler(stream),
            "W": grpc.unary_stream_rpc_method_handler(written),
            "G": grpc.unary_stream_rpc_method_handler(plain_stream),
            "P": grpc.unary_unary_rpc_method_handler(plain_unary),
            "D": grpc.unary_unary_rpc_method_handler(unary, request_deserializer=_strict),
        }
        s.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", handlers)])
        port = s.add_insecure_port("127.0.0.1:0")
        await s.start()
        return s, port

    s, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    yield f"127.0.0.1:{port}", telemetry
    asyncio.run_coroutine_threadsafe(s.stop(None), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


AUTH = (("authorization", "Bearer sesame"),)


def test_errors_become_codes_and_every_rpc_is_counted(server):
    target, telemetry = server
    with grpc.insecure_channel(target) as channel:
        u, s = channel.unary_unary("/t.T/U"), channel.unary_stream("/t.T/S")
        assert u(b"ok", metadata=AUTH) == b"OK"
        with pytest.raises(grpc.RpcError) as err:
            u(b"bad", metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == "k must be in 1..10"
        with pytest.raises(grpc.RpcError) as err:
            u(b"bug", metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert err.value.details() == "internal error: ValueError"  # no internals leak
        assert list(s(b"ok", metadata=AUTH)) == [b"first", b"second"]
        got, replies = [], s(b"bad", metadata=AUTH)
        with pytest.raises(grpc.RpcError) as err:
            for reply in replies:
                got.append(reply)
        assert got == [b"first"] and err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for call in (lambda: u(b"ok"), lambda: list(s(b"ok", metadata=(("authorization", "Bearer no"),)))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    count = lambda method, code: telemetry.requests.labels(method, code)._value.get()  # noqa: E731
    want = {
        ("/t.T/U", "OK"): 1,
        ("/t.T/U", "INVALID_ARGUMENT"): 1,
        ("/t.T/U", "INTERNAL"): 1,
        ("/t.T/U", "UNAUTHENTICATED"): 1,
        ("/t.T/S", "OK"): 1,
        ("/t.T/S", "INVALID_ARGUMENT"): 1,
        ("/t.T/S", "UNAUTHENTICATED"): 1,
    }
    # An RPC is counted as the server finishes it, which may be just after the client has its answer.
    deadline = time.monotonic() + 10
    got = lambda: {key: count(*key) for key in want}  # noqa: E731
    while (got() != want or telemetry.in_flight._value.get()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got() == want
    assert telemetry.in_flight._value.get() == 0


def test_every_handler_style_runs_inside_the_interceptors(server):
    target, telemetry = server
    with grpc.insecure_channel(target) as channel:
        assert list(channel.unary_stream("/t.T/W")(b"ok", metadata=AUTH)) == [b"w1", b"w2"]
        got, replies = [], channel.unary_stream("/t.T/W")(b"bad", metadata=AUTH)
        with pytest.raises(grpc.RpcError) as err:
            for reply in replies:
                got.append(reply)
        assert got == [b"w1"] and err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(channel.unary_stream("/t.T/G")(b"ok", metadata=AUTH)) == [b"g1", b"g2"]
        assert channel.unary_unary("/t.T/P")(b"abc", metadata=AUTH) == b"cba"
    count = lambda method, code: telemetry.requests.labels(method, code)._value.get()  # noqa: E731
    deadline = time.monotonic() + 10
    while count("/t.T/P", "OK") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert count("/t.T/W", "OK") == 1 and count("/t.T/W", "INVALID_ARGUMENT") == 1 and count("/t.T/G", "OK") == 1


def test_a_body_that_did_not_parse_is_invalid_argument(server):
    target, _ = server
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/t.T/D")
        assert call(b"ok", metadata=AUTH) == b"OK"
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xfe", metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("could not parse the request (2 bytes) as t.Message")
