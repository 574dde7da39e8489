"""Server interceptors: the one place where exceptions become gRPC status codes."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, AsyncContextManager, Awaitable, Callable

import grpc

from .errors import ServingError

log = logging.getLogger(__name__)


async def _abort_for(exc: Exception, context: grpc.aio.ServicerContext, behaviour: Callable) -> None:
    """ServingError → its code and message; anything else is a bug, not the client's fault: log it
    and say INTERNAL without leaking internals."""
    if isinstance(exc, ServingError):
        await context.abort(exc.code, str(exc))
    log.exception("unhandled error in %s", getattr(behaviour, "__qualname__", behaviour))
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


# A scope around one RPC: scope(context, behaviour) -> an async context manager that the handler's
# whole run (the await of a unary response, the iteration of a stream) happens inside.
Scope = Callable[[grpc.aio.ServicerContext, Callable], AsyncContextManager]


def _with(handler: grpc.RpcMethodHandler, scope: Scope) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour run inside `scope` (the one wrapper of every interceptor)."""

    def unary(behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(context, behaviour):
                return await behaviour(request, context)

        return run

    def stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(context, behaviour):
                async for reply in behaviour(request, context):
                    yield reply

        return run

    if handler.unary_unary:
        return handler._replace(unary_unary=unary(handler.unary_unary))
    if handler.stream_unary:
        return handler._replace(stream_unary=unary(handler.stream_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=stream(handler.unary_stream))
    if handler.stream_stream:
        return handler._replace(stream_stream=stream(handler.stream_stream))
    return handler


# The scopes are small classes, not contextlib.asynccontextmanager generators: they run on every
# RPC, and a generator-based one costs about 1.5 µs more per enter/exit.
class _ErrorsToStatus:
    __slots__ = ("context", "behaviour")

    def __init__(self, context: grpc.aio.ServicerContext, behaviour: Callable) -> None:
        self.context, self.behaviour = context, behaviour

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, Exception) and not isinstance(exc, (grpc.aio.AbortError, grpc.aio.UsageError)):
            await _abort_for(exc, self.context, self.behaviour)  # raises the abort in exc's place
        return False


class _Measured:
    """One RPC in flight: counted, timed and its final code recorded (by MetricsInterceptor._finish)."""

    __slots__ = ("interceptor", "method", "context", "start")

    def __init__(self, interceptor: "MetricsInterceptor", method: str, context: grpc.aio.ServicerContext) -> None:
        self.interceptor, self.method, self.context = interceptor, method, context

    async def __aenter__(self) -> None:
        self.interceptor.t.in_flight.inc()
        self.start = time.perf_counter()

    async def __aexit__(self, kind, exc, tb) -> bool:
        self.interceptor._finish(self.method, self.context, self.start, exc)
        return False


class _Denied:
    """Aborts UNAUTHENTICATED on entry: the behaviour never runs."""

    __slots__ = ("context", "why")

    def __init__(self, context: grpc.aio.ServicerContext, why: str) -> None:
        self.context, self.why = context, why

    async def __aenter__(self) -> None:
        await self.context.abort(grpc.StatusCode.UNAUTHENTICATED, self.why)

    async def __aexit__(self, kind, exc, tb) -> bool:
        return False


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """ServingError → its status code and message; anything else → INTERNAL (and a logged traceback)."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        return None if handler is None else _with(handler, _ErrorsToStatus)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and final status code, times it, and tracks how many are in flight.
    Outermost, so it sees the codes that the auth and error interceptors set."""

    def __init__(self, telemetry) -> None:
        self.t = telemetry
        self._children: dict = {}  # (method, code) → (counter child, histogram child): labels() once

    def _finish(self, method: str, context: grpc.aio.ServicerContext, start: float, error: BaseException | None):
        code = context.code() if hasattr(context, "code") else None
        if code is None or isinstance(code, int):  # not set: OK unless an unexpected exception escaped
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
            if isinstance(error, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
        children = self._children.get((method, code))
        if children is None:
            children = (self.t.requests.labels(method, code.name), self.t.request_seconds.labels(method))
            self._children[(method, code)] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - start)
        self.t.in_flight.dec()

    async def intercept_service(self, continuation, details) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        return _with(handler, lambda context, _behaviour: _Measured(self, method, context))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token check: every RPC must carry `authorization: Bearer TOKEN`, except the methods
    under `exempt` (health checks: orchestrators probe without credentials)."""

    def __init__(self, token: str, exempt: tuple[str, ...] = ("/grpc.health.v1.Health/",)) -> None:
        self.expected = f"Bearer {token}".encode()
        self.exempt = exempt

    async def intercept_service(self, continuation, details) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.exempt):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        sent = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent, self.expected):
            return handler
        why = "missing `authorization: Bearer …` metadata" if not sent else "invalid bearer token"
        return _with(handler, lambda context, _behaviour: _Denied(context, why))
