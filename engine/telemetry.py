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
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
        self.in_flight = Gauge("attnrec_in_flight_requests", "RPCs being handled", registry=r)
        self.model_version = Gauge("attnrec_model_version", "repository version serving", ["model"], registry=r)
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
            "attnrec_store_up", "1 while the history store answers, 0 after a failed call", ["store"], registry=r
        )

    def serve_http(self, port: int, address: str = "0.0.0.0"):
        """Start the /metrics HTTP endpoint in a thread; returns the WSGI server (call .shutdown())."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return server
