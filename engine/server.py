"""The gRPC server: services, health, reflection, interceptors, TLS, metrics, signals and drain.

    server = Server(settings)                  # extra_services=[...] adds more gRPC services
    await server.start()                       # listening; health NOT_SERVING until warmed up
    await server.wait()                        # until SIGTERM/SIGINT (or .stop()), then drains

Adding a service (e.g. the KServe V2 one) is one `Service` in `Server(extra_services=...)` or in
`services()` below: its name is registered with health and reflection automatically.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from . import kserve, recommender_servicer
from .errors import StartupError
from .history_store import StoreUnavailable, open_history_store
from .interceptors import (
    AuthInterceptor,
    DrainInterceptor,
    ErrorInterceptor,
    Guard,
    MetricsInterceptor,
    ModelControlInterceptor,
    Registrar,
)
from .loader import ModelLoader
from .models import ModelRegistry
from .online_state import OnlineState
from .repository import iter_models, list_versions
from .rpc.pool import POOL
from .settings import ServerSettings
from .telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Service:
    """A gRPC service to serve: its full name (for health and reflection), how to add it, the served
    models it cannot answer without (its health follows them) and its model-control methods."""

    name: str
    add: Callable[[grpc.aio.Server], None]
    needs: tuple[str, ...] = ()
    admin_methods: tuple[str, ...] = ()


# A service factory gets the models, their loader (and the settings) once they exist.
ServiceFactory = Callable[[ModelRegistry, ModelLoader, ServerSettings], Service]


def recommender(models: ModelRegistry, loader: ModelLoader, settings: ServerSettings) -> Service:
    return Service(
        recommender_servicer.SERVICE_NAME,
        lambda server: recommender_servicer.add_to(server, models, loader, settings.stream_window),
        needs=recommender_servicer.NEEDS,
        admin_methods=recommender_servicer.ADMIN_METHODS,
    )


def inference(models: ModelRegistry, loader: ModelLoader, settings: ServerSettings) -> Service:
    """KServe V2 / Triton's `inference.GRPCInferenceService` over the same models and batchers (its
    health stays SERVING while one model is unloaded: ModelReady says which)."""
    return Service(
        kserve.SERVICE_NAME,
        lambda server: kserve.add_to_server(server, models, loader),
        admin_methods=kserve.ADMIN_METHODS,
    )


def services() -> list[ServiceFactory]:
    """The services `attnrec serve` exposes besides health and reflection."""
    return [recommender, inference]


# The served models whose unloading takes the server's readiness down: what the services need.
NEEDED = recommender_servicer.NEEDS


def choose_model(repo: Path, name: str) -> str:
    """The repository model to serve; StartupError (before anything binds) when there is none."""
    if not Path(repo).is_dir():
        raise StartupError(f"--repo {repo}: the folder does not exist")
    names = list(iter_models(repo))
    found = ", ".join(names) or "none"
    if name:
        try:
            versions = list_versions(repo, name)
        except ValueError as exc:  # an invalid name
            raise StartupError(f"--model: {exc}") from None
        if not versions:
            raise StartupError(f"--repo {repo} has no versions of model {name!r} (models there: {found})")
        return name
    if len(names) != 1:
        raise StartupError(f"{repo}: pass --model NAME (models in the repository: {found})")
    return names[0]


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on host:port already (what a bind there would fail with)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # the bind itself will say what is wrong with the address
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and http.server bind
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def check_ports(settings: ServerSettings, *, grpc_port: bool = True) -> None:
    """StartupError naming the flag when the gRPC or the metrics port is taken (before anything binds).
    `grpc_port=False`: a `--workers` worker, whose port the supervisor checked and holds (engine/workers.py)."""
    s = settings
    if s.port and s.metrics_port == s.port:
        raise StartupError(f"--metrics-port {s.metrics_port} is the gRPC --port too: give them different ports")
    if grpc_port and s.port and port_in_use(s.address, s.port):
        raise StartupError(f"--port {s.port} is in use (on {s.address})")
    if s.metrics_port and port_in_use(s.metrics_host, s.metrics_port):
        raise StartupError(f"--metrics-port {s.metrics_port} is in use (on {s.metrics_host})")


def credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert and not settings.tls_key:
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    pair = (Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())
    ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


class Server:
    # One of the `--workers N` processes sharing the port sets this (engine/workers.py).
    reuse_port = False

    def __init__(self, settings: ServerSettings, extra_services: Sequence[ServiceFactory] = ()) -> None:
        self.settings = settings
        self.telemetry = Telemetry()
        name = choose_model(settings.repo, settings.model)
        # Namespaced by model name: models sharing one Redis keep their histories and availability apart.
        store = open_history_store(
            settings.history_store, namespace=name, ttl_s=settings.history_ttl, telemetry=self.telemetry
        )
        self.state = OnlineState(store)
        self.models = ModelRegistry(
            name,
            batching=settings.batching,
            max_k=settings.max_k,
            telemetry=self.telemetry,
            state=self.state,
            needed=NEEDED,
        )
        self.loader = ModelLoader(settings.repo, self.models, settings.runtime, on_change=self._refresh_health)
        self.services = [make(self.models, self.loader, settings) for make in [*services(), *extra_services]]
        self.health = HealthServicer()
        self.drainer = DrainInterceptor()
        self.port = 0
        self._stop = asyncio.Event()
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http = None
        self._poller: asyncio.Task | None = None
        self._draining = False
        self._warm = False  # start() finished warming up (and `before_serving` returned)

    def _names(self) -> list[str]:
        return [s.name for s in self.services]

    async def start(self) -> None:
        s = self.settings
        check_ports(s, grpc_port=not self.reuse_port)  # before anything binds or is announced
        token, admin = s.token(), s.admin()
        interceptors = [MetricsInterceptor(self.telemetry), self.drainer]
        if token:
            interceptors.append(AuthInterceptor(token, also=[admin] if admin else []))
        admin_methods = [m for service in self.services for m in service.admin_methods]
        interceptors.append(
            ModelControlInterceptor(admin_methods, enabled=s.model_control, admin_token=admin, user_token=token)
        )
        interceptors.append(ErrorInterceptor())
        server = grpc.aio.server(options=[("grpc.so_reuseport", int(self.reuse_port))])
        # Every service registers behind the policies (engine/interceptors.py Guard: no per-RPC interceptor chain).
        guard = Guard(interceptors)
        registrar = Registrar(guard)
        for service in self.services:
            service.add(registrar)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registrar)
        names = [*self._names(), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        # POOL: the KServe stubs live in a private descriptor pool (see engine/rpc/pool.py); it
        # falls back to the default pool, so reflection describes every service from it.
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], registrar, pool=POOL)
        server.add_generic_rpc_handlers((guard,))
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{s.address}:{s.port}"
        creds = credentials(s)
        try:
            self.port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind": the port was taken after check_ports, or a bad address
            self.port = 0
        if not self.port:
            raise StartupError(f"--port {s.port}: could not listen on {address} (in use, or not an address here)")
        self._grpc = server
        if s.metrics_port:
            try:
                self._metrics_http = self.telemetry.serve_http(s.metrics_port, s.metrics_host)
            except OSError as exc:
                raise StartupError(f"--metrics-port {s.metrics_port}: could not listen on {s.metrics_host}: {exc}")
        await server.start()
        log.info("listening on %s:%d (%s)", s.address, self.port, "TLS" if creds else "plaintext")
        if self._metrics_http is not None:
            log.info("metrics on http://%s:%d/metrics", s.metrics_host, s.metrics_port)
        if not (s.model_control or admin):
            log.info("model control off (ReloadModel, RepositoryModelLoad/Unload): --model-control or --admin-token")
        await self.loader.start()  # load and warm up; raises when nothing loadable is there
        try:  # the first requests then find the availability cached
            await self.state.refresh()
            log.info("history store %s", self.state.store.name)
        except StoreUnavailable as exc:  # it may come up later; requests with their own history work meanwhile
            log.error("%s: requests with a user_id get UNAVAILABLE until it answers", exc)
        await self.before_serving()
        self._warm = True
        await self._refresh_health()
        if s.poll_interval > 0:
            self._poller = asyncio.ensure_future(self.loader.poll(s.poll_interval))
        log.info("ready: %s", ", ".join(f"{m.name} v{m.version}" for m in self.models.models()))

    async def before_serving(self) -> None:
        """Warm and about to report SERVING: a hook (a `--workers` worker waits here for the others)."""

    async def _set_health(self, status) -> None:
        for name in ["", *self._names()]:
            await self.health.set(name, status)

    async def _refresh_health(self) -> None:
        """Each service SERVING while the models it needs are loaded; "" (the server) while all are."""
        # Not before start() is done: the first load's swap calls this too, and a `--workers` worker
        # must not say SERVING before the others are warm. Nor after a stop was asked for.
        if not self._warm or self._draining or self._stop.is_set():
            return
        up = health_pb2.HealthCheckResponse.SERVING
        down = health_pb2.HealthCheckResponse.NOT_SERVING
        statuses = {service.name: self.models.serving(service.needs) for service in self.services}
        for name, serving in statuses.items():
            await self.health.set(name, up if serving else down)
        await self.health.set("", up if all(statuses.values()) else down)

    def stop(self) -> None:
        """Ask `wait` to drain and return (also what SIGTERM and SIGINT do)."""
        self._stop.set()

    async def wait(self, *, handle_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        await self._stop.wait()
        await self.drain()
        return 0

    async def drain(self) -> None:
        """NOT_SERVING, (shutdown delay), refuse new RPCs with UNAVAILABLE, let in-flight ones finish
        within the grace period, stop."""
        s = self.settings
        log.info("draining: NOT_SERVING, up to %.1fs for in-flight requests", s.grace)
        self._draining = True
        self.models.slot.draining = True
        await self.health.enter_graceful_shutdown()
        if s.shutdown_delay > 0:
            await asyncio.sleep(s.shutdown_delay)
        self.drainer.refuse()  # from here every new RPC (but health) answers UNAVAILABLE
        deadline = time.monotonic() + s.grace
        if self._poller is not None:
            self._poller.cancel()
        await asyncio.sleep(0)  # let RPCs admitted just before the refusal enter their scope
        try:
            await asyncio.wait_for(self.drainer.idle.wait(), timeout=s.grace)
        except asyncio.TimeoutError:
            log.warning("grace period over: %d requests still in flight are cancelled", self.drainer.running)
        # What is left is health Watch streams (they never end by themselves) and refusals on their way out.
        await self.close(min(0.25, max(0.0, deadline - time.monotonic())))
        log.info("stopped")

    async def close(self, grace: float = 0.0) -> None:
        """Stop gRPC (cancelling what runs after `grace` seconds), the batchers and /metrics."""
        if self._poller is not None:
            self._poller.cancel()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self.models.close()
        await self.state.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None


async def serve(settings: ServerSettings, extra_services: Sequence[ServiceFactory] = ()) -> int:
    """Run until SIGTERM/SIGINT; exit status 0 after a clean drain."""
    server = Server(settings, extra_services)
    try:
        await server.start()
    except BaseException:
        await server.close()
        raise
    return await server.wait()
