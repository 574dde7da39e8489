"""What the KServe servicer sees of a served model: its tensor specs, its statistics, `infer`.

engine/models.py implements it (`encoder`, `ranker`, `pipeline`); engine/kserve/ describes and
calls it. Errors are engine/errors.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .model_stats import ModelStats


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe V2 datatype name: "INT64", "FP32", "BYTES", ...
    shape: tuple[int, ...]  # full shape, batch dimension first; -1 = variable
    optional: bool = False  # an input a request may leave out (Triton's ModelInput.optional)


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
    def stats(self) -> ModelStats: ...  # the serving version's (engine/model_stats.py)

    def record_rejected(self, duration_ns: int) -> None:
        """Count a request the protocol refused before calling `infer` (bad tensors) as a failure."""
        ...

    async def infer(
        self, inputs: dict[str, np.ndarray], *, outputs: list[str] | None = None, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run one request (its rows may be batched with others'). `deadline` is time.monotonic()
        based. Raises a ServingError subclass for anything the client got wrong or must retry."""
        ...
