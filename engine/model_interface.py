"""What the KServe servicer sees of a served model: its tensor specs, its statistics, `infer`.

engine/models.py implements it (`encoder`, `ranker`, `pipeline`); engine/kserve/ describes and
calls it. Errors are engine/errors.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe V2 datatype name: "INT64", "FP32", "BYTES", ...
    shape: tuple[int, ...]  # full shape, batch dimension first; -1 = variable
    optional: bool = False  # an input a request may leave out (Triton's ModelInput.optional)


@dataclass
class ModelStats:
    """Cumulative counters, the fields of Triton's ModelStatistics (durations in nanoseconds)."""

    inference_count: int = 0  # rows (requests' batch items) computed
    execution_count: int = 0  # batches run
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    last_inference_ms: int = 0  # wall clock, milliseconds since the epoch
    batch_stats: dict[int, list[int]] = field(default_factory=dict)  # batch size -> [count, compute_infer ns]


class ServedModel(Protocol):
    """One model as the protocols expose it: `encoder`, `ranker` or `pipeline` (the whole request path)."""

    name: str
    platform: str  # "onnxruntime_onnx" for the ONNX graphs, "attnrec_pipeline" for the whole path
    max_batch_size: int
    # The dynamic batcher in front of it, as ModelConfig's dynamic_batching reports it.
    max_queue_delay_us: int  # how long a request waits for others before its batch runs
    preferred_batch_sizes: tuple[int, ...]  # batch sizes the batcher aims for, if any
    max_queue_size: int  # requests waiting beyond this are refused with RESOURCE_EXHAUSTED; 0 = unbounded

    @property
    def version(self) -> str: ...  # the model-repository version now serving, as a string

    @property
    def ready(self) -> bool: ...

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    @property
    def stats(self) -> ModelStats: ...

    async def infer(
        self, inputs: dict[str, np.ndarray], *, outputs: list[str] | None = None, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run one request (its rows may be batched with others'). `deadline` is time.monotonic()
        based. Raises a ServingError subclass for anything the client got wrong or must retry."""
        ...
