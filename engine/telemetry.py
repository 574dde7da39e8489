"""Prometheus metrics of one server (prometheus-client), on their own registry. This module only
makes and holds them: the request path observes the prometheus_client objects directly.

attnrec_requests_total{method, code}          RPCs by full method name and gRPC status
attnrec_request_seconds{method}               RPC latency (histogram)
attnrec_stage_seconds{model, stage}           queue, encoder, search, ranker, rerank, total (histogram)
attnrec_batch_size{model}                     rows per executed batch (histogram)
attnrec_in_flight_requests                    RPCs being handled now
attnrec_model_version{model}                  the repository version serving
attnrec_model_loads_total{model, outcome}     hot swaps: loaded / refused
attnrec_store_operations_total{store, operation, outcome}  history store calls: ok / error
attnrec_store_seconds{store, operation}       history store call latency (histogram)
attnrec_store_up{store}                       1 while the last store call succeeded, 0 after a failure

and, beside them on the same endpoint, Triton's nv_inference_* families (engine/triton_metrics.py,
added by the model registry through `add_exposition`). With `attnrec serve --workers N` the workers'
metrics are prometheus_client's multiprocess-mode files, merged by the supervisor's endpoint
(engine/workers.py); the gauges say how their workers' values combine.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# 50 µs … 2.5 s: the interesting range is sub-millisecond to a few milliseconds.
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("attnrec_requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self.request_seconds = Histogram(
            "attnrec_request_seconds", "RPC latency", ["method"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "attnrec_stage_seconds",
            "time per request path stage (encoder/search/ranker: per batch)",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "attnrec_batch_size", "rows per executed batch", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        # multiprocess_mode: how the workers of `--workers N` combine (ignored in a single process)
        self.in_flight = Gauge(
            "attnrec_in_flight_requests", "RPCs being handled", registry=r, multiprocess_mode="livesum"
        )
        self.model_version = Gauge(
            "attnrec_model_version", "repository version serving", ["model"], registry=r, multiprocess_mode="livemin"
        )
        self.model_loads = Counter(
            "attnrec_model_loads", "version loads by outcome (loaded, refused)", ["model", "outcome"], registry=r
        )
        self.store_operations = Counter(
            "attnrec_store_operations",
            "history store calls by operation and outcome (ok, error)",
            ["store", "operation", "outcome"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "attnrec_store_seconds",
            "history store call latency",
            ["store", "operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_up = Gauge(
            "attnrec_store_up",
            "1 while the history store answers, 0 after a failed call",
            ["store"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self._expositions: list[Callable[[], bytes]] = []

    def add_exposition(self, render: Callable[[], bytes]) -> None:
        """More Prometheus text for the endpoint, after the registry's (Triton's families)."""
        self._expositions.append(render)

    def exposition(self) -> bytes:
        return generate_latest(self.registry) + b"".join(render() for render in self._expositions)

    def serve_http(self, port: int, address: str = "0.0.0.0"):
        """Start the /metrics HTTP endpoint in a thread; returns the HTTP server (call .shutdown())."""
        return serve_metrics(port, address, self.exposition)


def serve_metrics(port: int, address: str, render: Callable[[], bytes]) -> ThreadingHTTPServer:
    """GET /metrics (or /) answers `render()` as Prometheus text, from a daemon thread; .shutdown() stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] not in ("/", "/metrics"):
                self.send_error(404, "metrics are at /metrics")
                return
            try:
                body, status = render(), 200
            except Exception as exc:  # noqa: BLE001 - say so to the scraper, keep serving
                body, status = f"metrics failed: {type(exc).__name__}: {exc}\n".encode(), 500
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST if status == 200 else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes are not worth a log line each
            pass

    import socket

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        daemon_threads = True

    server = Server((address.strip("[]"), port), Handler)
    threading.Thread(target=server.serve_forever, name="attnrec-metrics", daemon=True).start()
    return server
