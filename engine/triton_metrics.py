"""Triton's Prometheus metric families, named, labelled and described as Triton's server exposes them,
so Triton dashboards and alerts work unchanged:

    nv_inference_request_success{model, version}       successful inference requests
    nv_inference_request_failure{model, version}       failed inference requests
    nv_inference_count{model, version}                 inferences (batch rows) performed
    nv_inference_exec_count{model, version}            model executions (batches) performed
    nv_inference_request_duration_us{model, version}   cumulative request duration
    nv_inference_queue_duration_us{model, version}     cumulative time queued
    nv_inference_compute_input_duration_us{...}        cumulative compute input duration
    nv_inference_compute_infer_duration_us{...}        cumulative compute infer duration
    nv_inference_compute_output_duration_us{...}       cumulative compute output duration

All counters, rendered from the same ModelStats that KServe's ModelStatistics reports
(engine/model_stats.py), so the two agree to the microsecond (durations are ns // 1000). They are
written here rather than as prometheus_client Counters because the client library appends `_total`
to every counter's name, and Triton's have none.
"""

from __future__ import annotations

from typing import Mapping

from .model_stats import ModelStats

# (family, help, ModelStats field, divisor)
FAMILIES = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes", "success_count", 1),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes", "fail_count", 1),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)", "inference_count", 1),
    (
        "nv_inference_exec_count",
        "Number of model executions performed (does not include cached requests)",
        "execution_count",
        1,
    ),
    (
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds (includes cached requests)",
        "success_ns",
        1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
        "queue_ns",
        1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds (does not include cached requests)",
        "compute_input_ns",
        1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
        "compute_infer_ns",
        1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds (does not include cached requests)",
        "compute_output_ns",
        1000,
    ),
)


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def exposition(totals: Mapping[tuple[str, str], ModelStats]) -> bytes:
    """Prometheus text (format 0.0.4) of the families for every (model, version) in `totals`."""
    if not totals:
        return b""
    keys = sorted(totals)
    lines = []
    for family, text, field_name, divisor in FAMILIES:
        lines += [f"# HELP {family} {text}", f"# TYPE {family} counter"]
        for model, version in keys:
            value = getattr(totals[(model, version)], field_name) // divisor
            lines.append(f'{family}{{model="{_label(model)}",version="{_label(version)}"}} {value}')
    return ("\n".join(lines) + "\n").encode()
