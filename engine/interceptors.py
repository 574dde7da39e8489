"""Server interceptors: the one place where exceptions become gRPC status codes."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Awaitable, Callable

import grpc

from .served import ServingError

log = logging.getLogger(__name__)


async def _abort_for(exc: Exception, context: grpc.aio.ServicerContext, behaviour: Callable) -> None:
    """ServingError → its code and message; anything else is a bug, not the client's fault: log it
    and say INTERNAL without leaking internals."""
    if isinstance(exc, ServingError):
        await context.abort(exc.code, str(exc))
    log.exception("unhandled error in %s", getattr(behaviour, "__qualname__", behaviour))
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


def _wrap_unary(behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _abort_for(exc, context, behaviour)

    return handler


def _wrap_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for reply in behaviour(request, context):
                yield reply
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await _abort_for(exc, context, behaviour)

    return handler


def _with(handler: grpc.RpcMethodHandler, wrap_unary, wrap_stream) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped (unary responses by `wrap_unary`, streams by `wrap_stream`)."""
    if handler.unary_unary:
        return handler._replace(unary_unary=wrap_unary(handler.unary_unary))
    if handler.stream_unary:
        return handler._replace(stream_unary=wrap_unary(handler.stream_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=wrap_stream(handler.unary_stream))
    if handler.stream_stream:
        return handler._replace(stream_stream=wrap_stream(handler.stream_stream))
    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """ServingError → its status code and message; anything else → INTERNAL (and a logged traceback)."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        return None if handler is None else _with(handler, _wrap_unary, _wrap_stream)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and final status code, times it, and tracks how many are in flight.
    Outermost, so it sees the codes that the auth and error interceptors set."""

    def __init__(self, telemetry) -> None:
        self.t = telemetry

    def _finish(self, method: str, context: grpc.aio.ServicerContext, start: float, error: BaseException | None):
        code = context.code() if hasattr(context, "code") else None
        if code is None or isinstance(code, int):  # not set: OK unless an unexpected exception escaped
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
            if isinstance(error, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
        self.t.requests.labels(method, code.name).inc()
        self.t.request_seconds.labels(method).observe(time.perf_counter() - start)
        self.t.in_flight.dec()

    async def intercept_service(self, continuation, details) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method

        def wrap_unary(behaviour):
            async def run(request, context):
                self.t.in_flight.inc()
                start, error = time.perf_counter(), None
                try:
                    return await behaviour(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    self._finish(method, context, start, error)

            return run

        def wrap_stream(behaviour):
            async def run(request, context):
                self.t.in_flight.inc()
                start, error = time.perf_counter(), None
                try:
                    async for reply in behaviour(request, context):
                        yield reply
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    self._finish(method, context, start, error)

            return run

        return _with(handler, wrap_unary, wrap_stream)


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

        def deny_unary(_behaviour):
            async def run(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

            return run

        def deny_stream(_behaviour):
            async def run(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
                yield  # an async generator, as stream handlers must be

            return run

        return _with(handler, deny_unary, deny_stream)
