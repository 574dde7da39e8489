"""What a protocol servicer sees of the server's models: tensors in, tensors out, via a batcher.

Two servicers speak to the same models: the domain API (`attnrec.v1.Recommender`) and the
KServe V2 / Triton one (`inference.GRPCInferenceService`). Both go through `ModelHost`, and
errors raised here carry the gRPC status code they map to (one interceptor does the mapping).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np


class ServingError(Exception):
    """An error a client should see, with its gRPC status code and a message saying what was wrong."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class QueueFull(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpired(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED


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
    batch_stats: dict[int, list[int]] = field(default_factory=dict)  # batch size -> [count, compute ns]


class ServedModel(Protocol):
    """One model as the protocols expose it: `encoder`, `ranker` or `pipeline` (the whole request path)."""

    name: str
    platform: str  # "onnxruntime_onnx" for the ONNX graphs, "attnrec_pipeline" for the whole path
    max_batch_size: int

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


class ModelHost(Protocol):
    """The models one server holds, with hot swap underneath (a model keeps its name across versions)."""

    @property
    def ready(self) -> bool: ...  # every model loaded and warmed up, and not draining

    def models(self) -> list[ServedModel]: ...

    def get(self, name: str, version: str = "") -> ServedModel:
        """The model, or NotFound; a non-empty `version` must be the one serving."""
        ...

    async def load(self, name: str) -> None:
        """Load (or reload) the newest valid version of the repository model behind `name`."""
        ...

    async def unload(self, name: str) -> None: ...


class BatcherSettings(Protocol):
    """What a ServedModel behind a dynamic batcher also exposes (optional; the KServe servicer
    reads these with getattr and describes the model as unbatched-by-the-server without them)."""

    max_queue_delay_us: int  # how long a request waits for others before its batch runs
    preferred_batch_sizes: tuple[int, ...]  # batch sizes the batcher aims for, if any
    max_queue_size: int  # requests waiting beyond this are refused with RESOURCE_EXHAUSTED; 0 = unbounded
