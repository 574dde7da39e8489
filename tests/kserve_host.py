"""A small test-side ModelHost for the KServe servicer: a REAL onnxruntime encoder session from a
model repository (no batcher), plus identity models for every V2 datatype.

Kept in one place so the real ModelHost (the server's, with batching and hot swap) can replace
`TestHost` in tests/test_kserve.py once both land on one branch.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from attnrec.engine.errors import InvalidRequest, ModelStats, NotFound, TensorSpec
from attnrec.engine.kserve.tensors import DTYPES
from attnrec.engine.pipeline import Pipeline
from attnrec.engine.repository import newest_valid_version

_ORT_TYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}


class _Model:
    """Shared bookkeeping: readiness and Triton-style counters (one execution per request)."""

    max_batch_size = 64

    def __init__(self) -> None:
        self._stats = ModelStats()

    @property
    def ready(self) -> bool:
        return True

    @property
    def stats(self) -> ModelStats:
        return self._stats

    def _record(self, rows: int, started: int, ok: bool) -> None:
        ns = time.perf_counter_ns() - started
        s = self._stats
        if ok:
            s.success_count += 1
            s.success_ns += ns
            s.compute_infer_ns += ns
            s.inference_count += rows
            s.execution_count += 1
            count, total = s.batch_stats.get(rows, [0, 0])
            s.batch_stats[rows] = [count + 1, total + ns]
            s.last_inference_ms = int(time.time() * 1000)
        else:
            s.fail_count += 1
            s.fail_ns += ns


class EncoderModel(_Model):
    """The repository version's encoder.onnx: `history` (B, L) tokens → `query` (B, D) [+ `hidden`]."""

    name = "encoder"
    platform = "onnxruntime_onnx"
    max_queue_delay_us = 500  # what a batcher in front would report (BatcherSettings)
    preferred_batch_sizes = (8, 32)
    max_queue_size = 256

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.session = pipeline.encoder.session

    @property
    def version(self) -> str:
        return str(self.pipeline.version)

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("history", "INT64", (-1, -1))]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [
            TensorSpec(o.name, _ORT_TYPES[o.type], tuple(d if isinstance(d, int) else -1 for d in o.shape))
            for o in self.session.get_outputs()
        ]

    async def infer(self, inputs, *, outputs=None, deadline=None):
        started = time.perf_counter_ns()
        tokens = inputs["history"]
        try:
            if tokens.size and (tokens.min() < 0 or tokens.max() > self.pipeline.n_items):
                raise InvalidRequest(f"history tokens must be in 0..{self.pipeline.n_items} (0 = padding)")
            names = outputs or [o.name for o in self.outputs]
            values = await asyncio.to_thread(self.session.run, names, {"history": tokens})
        except Exception:
            self._record(len(tokens), started, ok=False)
            raise
        self._record(len(tokens), started, ok=True)
        return dict(zip(names, values))


class IdentityModel(_Model):
    """`x` of one datatype, any shape → `y`, the same tensor (exercises every tensor conversion)."""

    platform = "attnrec_identity"

    def __init__(self, datatype: str) -> None:
        super().__init__()
        self.datatype = datatype
        self.name = f"identity_{datatype.lower()}"

    @property
    def version(self) -> str:
        return "1"

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("x", self.datatype, (-1, -1))]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("y", self.datatype, (-1, -1))]

    async def infer(self, inputs, *, outputs=None, deadline=None):
        started = time.perf_counter_ns()
        self._record(len(inputs["x"]), started, ok=True)
        return {"y": inputs["x"]}


class TestHost:
    """ModelHost over one repository model (`encoder`) and the identity models; load/unload real."""

    __test__ = False  # not a pytest class

    def __init__(self, repo: Path, repo_model: str) -> None:
        self.repo, self.repo_model = Path(repo), repo_model
        self._models: dict[str, _Model] = {}
        for datatype in DTYPES:
            model = IdentityModel(datatype)
            self._models[model.name] = model
        self._load_encoder()

    def _load_encoder(self) -> None:
        path, _ = newest_valid_version(self.repo, self.repo_model)
        self._models["encoder"] = EncoderModel(Pipeline.load(path))

    @property
    def ready(self) -> bool:
        return "encoder" in self._models

    def models(self):
        return list(self._models.values())

    def get(self, name: str, version: str = ""):
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"no model '{name}' (models: {', '.join(sorted(self._models))})")
        if version and version != model.version:
            raise NotFound(f"model '{name}' serves version {model.version}, not {version}")
        return model

    async def load(self, name: str) -> None:
        if name != "encoder":
            raise NotFound(f"no repository model behind '{name}'")
        await asyncio.to_thread(self._load_encoder)

    async def unload(self, name: str) -> None:
        self.get(name)
        del self._models[name]
