"""The interceptors' one wrapper, on a real grpc.aio server: errors become status codes with their
message (unary and streams), every RPC is counted by its final code, and auth denies both kinds."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

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
    assert count("/t.T/U", "OK") == 1 and count("/t.T/U", "INVALID_ARGUMENT") == 1
    assert count("/t.T/U", "INTERNAL") == 1 and count("/t.T/U", "UNAUTHENTICATED") == 1
    assert count("/t.T/S", "OK") == 1 and count("/t.T/S", "INVALID_ARGUMENT") == 1
    assert count("/t.T/S", "UNAUTHENTICATED") == 1
    assert telemetry.in_flight._value.get() == 0
