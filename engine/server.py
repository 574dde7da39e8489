"""The gRPC server: services, health, reflection, interceptors, TLS, metrics, signals and drain.

    server = Server(settings)                  # extra_services=[...] adds more gRPC services
    await server.start()                       # listening; health NOT_SERVING until warmed up
    await server.wait()                        # until SIGTERM/SIGINT (or .stop()), then drains

Adding a service (e.g. the KServe V2 one) is one `Service` in `Server(extra_services=...)` or in
`services()` below: its name is registered with health and reflection automatically.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from . import kserve, recommender_servicer
from .history_store import StoreUnavailable, open_history_store
from .interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor
from .loader import ModelLoader
from .models import ModelRegistry
from .online_state import OnlineState
from .repository import iter_models
from .rpc.pool import POOL
from .settings import ServerSettings
from .telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Service:
    """A gRPC service to serve: its full name (for health and reflection) and how to add it."""

    name: str
    add: Callable[[grpc.aio.Server], None]


# A service factory gets the models, their loader (and the settings) once they exist.
ServiceFactory = Callable[[ModelRegistry, ModelLoader, ServerSettings], Service]


def recommender(models: ModelRegistry, loader: ModelLoader, settings: ServerSettings) -> Service:
    return Service(
        recommender_servicer.SERVICE_NAME,
        lambda server: recommender_servicer.add_to(server, models, loader, settings.stream_window),
    )


def inference(models: ModelRegistry, loader: ModelLoader, settings: ServerSettings) -> Service:
    """KServe V2 / Triton's `inference.GRPCInferenceService` over the same models and batchers."""
    return Service(kserve.SERVICE_NAME, lambda server: kserve.add_to_server(server, models, loader))


def services() -> list[ServiceFactory]:
    """The services `attnrec serve` exposes besides health and reflection."""
    return [recommender, inference]


def choose_model(repo: Path, name: str) -> str:
    if name:
        return name
    names = list(iter_models(repo))
    if len(names) != 1:
        found = ", ".join(names) or "none"
        raise ValueError(f"{repo}: pass --model NAME (models in the repository: {found})")
    return names[0]


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
        )
        self.loader = ModelLoader(settings.repo, self.models, settings.runtime)
        self.services = [make(self.models, self.loader, settings) for make in [*services(), *extra_services]]
        self.health = HealthServicer()
        self.port = 0
        self._stop = asyncio.Event()
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http = None
        self._poller: asyncio.Task | None = None

    def _names(self) -> list[str]:
        return [s.name for s in self.services]

    async def start(self) -> None:
        s = self.settings
        interceptors = [MetricsInterceptor(self.telemetry)]
        token = s.token()
        if token:
            interceptors.append(AuthInterceptor(token))
        interceptors.append(ErrorInterceptor())
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", int(self.reuse_port))])
        for service in self.services:
            service.add(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [*self._names(), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        # POOL: the KServe stubs live in a private descriptor pool (see engine/rpc/pool.py); it
        # falls back to the default pool, so reflection describes every service from it.
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server, pool=POOL)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{s.address}:{s.port}"
        creds = credentials(s)
        self.port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"could not listen on {address}")
        await server.start()
        self._grpc = server
        log.info("listening on %s:%d (%s)", s.address, self.port, "TLS" if creds else "plaintext")
        if s.metrics_port:
            self._metrics_http = self.telemetry.serve_http(s.metrics_port)
            log.info("metrics on http://0.0.0.0:%d/metrics", s.metrics_port)
        await self.loader.start()  # load and warm up; raises when nothing loadable is there
        try:  # the first requests then find the availability cached
            await self.state.refresh()
            log.info("history store %s", self.state.store.name)
        except StoreUnavailable as exc:  # it may come up later; requests with their own history work meanwhile
            log.error("%s: requests with a user_id get UNAVAILABLE until it answers", exc)
        await self.before_serving()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if s.poll_interval > 0:
            self._poller = asyncio.ensure_future(self.loader.poll(s.poll_interval))
        log.info("ready: %s", ", ".join(f"{m.name} v{m.version}" for m in self.models.models()))

    async def before_serving(self) -> None:
        """Warm and about to report SERVING: a hook (a `--workers` worker waits here for the others)."""

    async def _set_health(self, status) -> None:
        for name in ["", *self._names()]:
            await self.health.set(name, status)

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
        """NOT_SERVING, (shutdown delay), refuse new RPCs, let in-flight ones finish within the grace period."""
        s = self.settings
        log.info("draining: NOT_SERVING, up to %.1fs for in-flight requests", s.grace)
        self.models.slot.draining = True
        await self.health.enter_graceful_shutdown()
        if s.shutdown_delay > 0:
            await asyncio.sleep(s.shutdown_delay)
        if self._poller is not None:
            self._poller.cancel()
        if self._grpc is not None:
            await self._grpc.stop(s.grace)
        await self.models.close()
        await self.state.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")


async def serve(settings: ServerSettings, extra_services: Sequence[ServiceFactory] = ()) -> int:
    """Run until SIGTERM/SIGINT; exit status 0 after a clean drain."""
    server = Server(settings, extra_services)
    try:
        await server.start()
    except BaseException:
        await server.drain()
        raise
    return await server.wait()
