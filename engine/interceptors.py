"""Server interceptors: the one place where exceptions become gRPC status codes."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import grpc

from .served import ServingError

log = logging.getLogger(__name__)


def _wrap_unary(behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except ServingError as exc:
            await context.abort(exc.code, str(exc))
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:  # a bug, not the client's fault: say so without leaking internals
            log.exception("unhandled error in %s", getattr(behaviour, "__qualname__", behaviour))
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    return handler


def _wrap_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for reply in behaviour(request, context):
                yield reply
        except ServingError as exc:
            await context.abort(exc.code, str(exc))
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            log.exception("unhandled error in %s", getattr(behaviour, "__qualname__", behaviour))
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """ServingError → its status code and message; anything else → INTERNAL (and a logged traceback)."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream))
        return handler
