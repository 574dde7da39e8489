"""Server interceptors: the one place where exceptions become gRPC status codes, and where RPCs are
counted, authenticated, kept off model control and refused while draining."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from typing import Any, AsyncContextManager, Awaitable, Callable, Sequence

import grpc

from .decoding import Undecodable
from .errors import ServingError, capped, client_errors

log = logging.getLogger(__name__)

HEALTH = "/grpc.health.v1.Health/"


async def _abort_for(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    """ServingError → its code and message (and one rate-limited log line: the client's error, no
    traceback); anything else is a bug, not the client's fault: log its traceback and say INTERNAL
    without leaking internals."""
    if isinstance(exc, ServingError):
        message = capped(str(exc))
        client_errors("%s %s: %s", method, exc.code.name, message)
        await context.abort(exc.code, message)
    log.exception("unhandled error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


# A scope around one RPC: scope(context, behaviour) -> an async context manager that the handler's
# whole run (the await of a unary response, the iteration of a stream) happens inside.
Scope = Callable[[grpc.aio.ServicerContext, Callable], AsyncContextManager]


def _with(handler: grpc.RpcMethodHandler, scope: Scope, *, parse_check: bool = False) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour run inside `scope` (the one wrapper of every interceptor).
    With `parse_check`, a unary request that did not parse (engine/decoding.py) is refused
    INVALID_ARGUMENT inside the scope, before the behaviour runs.

    Every handler style is run: coroutines and plain functions for unary responses; async generators,
    coroutines that write with `context.write` (grpc_health's Watch) and plain generators for streams."""

    def unary(behaviour: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(context, behaviour):
                if parse_check and isinstance(request, Undecodable):
                    raise request.error()
                reply = behaviour(request, context)
                return await reply if inspect.isawaitable(reply) else reply

        return run

    def stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(context, behaviour):
                if parse_check and isinstance(request, Undecodable):
                    raise request.error()
                replies = behaviour(request, context)
                if hasattr(replies, "__aiter__"):
                    async for reply in replies:
                        yield reply
                elif inspect.isawaitable(replies):  # writes its replies itself (context.write), returns None
                    await replies
                elif replies is not None:
                    for reply in replies:
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


# The interceptors wrap each method's handler once and keep it (a handler is the same object on every
# call of its method): building the wrapper per call cost a few µs per interceptor on every RPC.
def _cached(cache: dict, method: str, handler: grpc.RpcMethodHandler, wrap: Callable[[], grpc.RpcMethodHandler]):
    """`wrap()` once per method (again only if its handler object changed)."""
    hit = cache.get(method)
    if hit is None or hit[0] is not handler:
        hit = cache[method] = (handler, wrap())
    return hit[1]


# The scopes are small classes, not contextlib.asynccontextmanager generators: they run on every
# RPC, and a generator-based one costs about 1.5 µs more per enter/exit.
class _ErrorsToStatus:
    __slots__ = ("context", "method")

    def __init__(self, context: grpc.aio.ServicerContext, method: str) -> None:
        self.context, self.method = context, method

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, Exception) and not isinstance(exc, (grpc.aio.AbortError, grpc.aio.UsageError)):
            await _abort_for(exc, self.context, self.method)  # raises the abort in exc's place
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
    """Aborts with `code` on entry (UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE): the behaviour never runs."""

    __slots__ = ("context", "code", "why", "method")

    def __init__(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, why: str, method: str) -> None:
        self.context, self.code, self.why, self.method = context, code, why, method

    async def __aenter__(self) -> None:
        client_errors("%s %s: %s", self.method, self.code.name, self.why)
        await self.context.abort(self.code, self.why)

    async def __aexit__(self, kind, exc, tb) -> bool:
        return False


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, why: str, method: str) -> grpc.RpcMethodHandler:
    return _with(handler, lambda context, _behaviour: _Denied(context, code, why, method))


def _bearer(details: grpc.HandlerCallDetails) -> bytes:
    sent = dict(details.invocation_metadata or ()).get("authorization", "")
    return sent.encode() if isinstance(sent, str) else sent


def _matches(sent: bytes, expected: Sequence[bytes]) -> bool:
    # every candidate compared (no early exit): the time taken says nothing about which matched
    return sum(hmac.compare_digest(sent, e) for e in expected) > 0


class Policy(grpc.aio.ServerInterceptor):
    """One of the server's interceptors. Its whole decision is `decide` (plain and synchronous: the
    method's handler in, the handler to run out), so the server runs them all in `Guard`, at handler
    lookup, rather than as grpc.aio's chain of interceptor coroutines on every RPC; as an interceptor
    (`grpc.aio.server(interceptors=[...])`) it does the same."""

    def decide(self, handler: grpc.RpcMethodHandler | None, details) -> grpc.RpcMethodHandler | None:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details
    ) -> grpc.RpcMethodHandler | None:
        return self.decide(await continuation(details), details)


class Guard(grpc.GenericRpcHandler):
    """Every service's handlers behind the server's policies, outermost first. Services register on it
    as on a server (`add_generic_rpc_handlers`); the server holds it as its one generic handler. Why:
    grpc.aio runs interceptors as one coroutine each on every RPC; here each policy is one function call
    at lookup. Measured on 2 cores (echo, 5 policies): c=1 p50 0.551 ms with the chain, 0.505 ms here,
    0.504 ms with no policy; at c=32 4,924 against 4,962 req/s (plain 5,846: the wrappers that policies
    put around a behaviour stay)."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        self.policies = tuple(reversed(policies))  # applied innermost first, so the first listed is outermost
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.handlers.extend(handlers)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = None
        for generic in self.handlers:
            handler = generic.service(details)
            if handler is not None:
                break
        for policy in self.policies:
            handler = policy.decide(handler, details)
        return handler


class Registrar(grpc.aio.Server):
    """What services register on: a grpc.aio.Server to libraries that check (gRPC reflection picks its
    asyncio servicer so), whose handlers go to `guard`. It serves nothing itself."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.guard.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        pass  # generated code registers the same handlers through add_generic_rpc_handlers too

    def _not_a_server(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a Registrar only collects handlers: ports and the lifecycle are the real server's")

    add_insecure_port = add_secure_port = start = stop = wait_for_termination = _not_a_server


class ErrorInterceptor(Policy):
    """ServingError → its status code and message; anything else → INTERNAL (and a logged traceback)."""

    def __init__(self) -> None:
        self._wrapped: dict = {}  # method → (its handler, the wrapped handler)

    def decide(self, handler: grpc.RpcMethodHandler | None, details) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None
        method = details.method
        return _cached(
            self._wrapped,
            method,
            handler,
            lambda: _with(handler, lambda context, _behaviour: _ErrorsToStatus(context, method), parse_check=True),
        )


class MetricsInterceptor(Policy):
    """Counts every RPC by method and final status code, times it, and tracks how many are in flight.
    Outermost, so it sees the codes that the auth and error interceptors set."""

    def __init__(self, telemetry) -> None:
        self.t = telemetry
        self._children: dict = {}  # (method, code) → (counter child, histogram child): labels() once
        self._wrapped: dict = {}  # method → (its handler, the wrapped handler)

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

    def decide(self, handler: grpc.RpcMethodHandler | None, details) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None
        method = details.method
        return _cached(
            self._wrapped, method, handler, lambda: _with(handler, lambda context, _b: _Measured(self, method, context))
        )


class AuthInterceptor(Policy):
    """Bearer-token check: every RPC must carry `authorization: Bearer TOKEN` with `token` (or one of
    `also`, e.g. the admin token), except the methods under `exempt` (health checks: orchestrators
    probe without credentials)."""

    def __init__(self, token: str, exempt: tuple[str, ...] = (HEALTH,), also: Sequence[str] = ()) -> None:
        self.expected = [f"Bearer {t}".encode() for t in (token, *also) if t]
        self.exempt = exempt

    def decide(self, handler: grpc.RpcMethodHandler | None, details) -> grpc.RpcMethodHandler | None:
        if handler is None or details.method.startswith(self.exempt):
            return handler
        sent = _bearer(details)
        if _matches(sent, self.expected):
            return handler
        why = "missing `authorization: Bearer …` metadata" if not sent else "invalid bearer token"
        return _denied(handler, grpc.StatusCode.UNAUTHENTICATED, why, details.method)


class ModelControlInterceptor(Policy):
    """Model control (loading, unloading, reloading: `methods`) is off unless the server was started
    with it (`--model-control`) or with an admin token (as Triton's --model-control-mode). With an
    admin token, those RPCs need it: none or an unknown one is UNAUTHENTICATED, the plain (non-admin)
    token PERMISSION_DENIED."""

    def __init__(self, methods: Sequence[str], *, enabled: bool, admin_token: str = "", user_token: str = "") -> None:
        self.methods = frozenset(methods)
        self.enabled = enabled or bool(admin_token)
        self.admin = [f"Bearer {admin_token}".encode()] if admin_token else []
        self.user = [f"Bearer {user_token}".encode()] if user_token else []

    def decide(self, handler: grpc.RpcMethodHandler | None, details) -> grpc.RpcMethodHandler | None:
        if handler is None or details.method not in self.methods:
            return handler
        name = details.method.rsplit("/", 1)[-1]
        if not self.enabled:
            why = f"model control is off: {name} needs a server started with --model-control or an --admin-token"
            return _denied(handler, grpc.StatusCode.PERMISSION_DENIED, why, details.method)
        if not self.admin:
            return handler
        sent = _bearer(details)
        if _matches(sent, self.admin):
            return handler
        if self.user and _matches(sent, self.user):
            why = f"{name} needs the admin token; this token may only call the serving RPCs"
            return _denied(handler, grpc.StatusCode.PERMISSION_DENIED, why, details.method)
        why = f"{name} needs `authorization: Bearer ADMIN_TOKEN` metadata" + (" (invalid token)" if sent else "")
        return _denied(handler, grpc.StatusCode.UNAUTHENTICATED, why, details.method)


class _Running:
    """One RPC that DrainInterceptor let through, counted until it ends."""

    __slots__ = ("drain",)

    def __init__(self, drain: "DrainInterceptor") -> None:
        self.drain = drain

    async def __aenter__(self) -> None:
        self.drain.running += 1
        self.drain.idle.clear()

    async def __aexit__(self, kind, exc, tb) -> bool:
        self.drain.running -= 1
        if not self.drain.running:
            self.drain.idle.set()
        return False


class DrainInterceptor(Policy):
    """From `refuse()` on, every new RPC but health checks answers UNAVAILABLE at once (the client
    retries elsewhere), rather than the CANCELLED that a stopping grpc.aio server gives calls that
    arrive as it stops; `idle` is set while none of the RPCs let through before is still running."""

    def __init__(self, exempt: tuple[str, ...] = (HEALTH,)) -> None:
        self.exempt = exempt
        self.refusing = False
        self._wrapped: dict = {}  # method → (its handler, the wrapped handler)
        self.running = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def refuse(self) -> None:
        self.refusing = True

    def decide(self, handler: grpc.RpcMethodHandler | None, details) -> grpc.RpcMethodHandler | None:
        if handler is None or details.method.startswith(self.exempt):
            return handler
        if self.refusing:
            why = "the server is draining (shutting down): retry on another instance"
            return _denied(handler, grpc.StatusCode.UNAVAILABLE, why, details.method)
        return _cached(
            self._wrapped, details.method, handler, lambda: _with(handler, lambda _context, _b: _Running(self))
        )
