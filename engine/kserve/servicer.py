"""`inference.GRPCInferenceService`: the KServe V2 / Open Inference Protocol over gRPC, with
Triton's model configuration, statistics and repository extensions, over the server's
`ModelRegistry` (engine/models.py) and, for load/unload, its `ModelLoader` (engine/loader.py).

Thin by design: convert, call the model, convert back. Errors are ServingError subclasses
(the ErrorInterceptor turns them into status codes), except in ModelStreamInfer, where, as in
Triton, a failed request answers in-band with `error_message` and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import metadata
from typing import AsyncIterator

import grpc
import numpy as np

from ..decoding import Undecodable, add_service
from ..errors import InvalidRequest, NotFound, ServingError, Unavailable, capped, client_errors, shown
from ..loader import ModelLoader
from ..model_interface import ServedModel
from ..models import ModelRegistry
from ..rpc.inference import grpc_service_pb2 as pb
from ..rpc.inference import grpc_service_pb2_grpc as pb_grpc
from . import describe
from .tensors import from_contents, from_raw, to_raw

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # for reflection
EXTENSIONS = ["model_configuration", "model_repository", "statistics"]
# Model control: refused unless the server runs with --model-control or an admin token.
ADMIN_METHODS = tuple(f"/{SERVICE_NAME}/{m}" for m in ("RepositoryModelLoad", "RepositoryModelUnload"))
STREAM_IN_FLIGHT = 64  # requests of one ModelStreamInfer stream computed at once (they may batch together)


def _server_version() -> str:
    try:
        return metadata.version("attnrec")
    except metadata.PackageNotFoundError:
        return "unknown"


def _param(p: pb.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def decode_inputs(model: ServedModel, request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors, checked against the model's input specs."""
    raw = request.raw_input_contents
    typed = [t.name for t in request.inputs if t.HasField("contents")]
    if raw and typed:
        raise InvalidRequest(
            f"inputs {typed} carry typed contents while raw_input_contents is set; use one or the other for all inputs"
        )
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    specs = {s.name: s for s in model.inputs}
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidRequest(f"model '{model.name}' has no input {shown(name)} (inputs: {', '.join(specs)})")
        if name in arrays:
            raise InvalidRequest(f"input '{name}' is given twice")
        if tensor.datatype != spec.datatype:
            raise InvalidRequest(
                f"input '{name}' of model '{model.name}' is {spec.datatype}, got datatype {shown(tensor.datatype)}"
            )
        shape = list(tensor.shape)
        if len(shape) != len(spec.shape) or any(s != -1 and s != d for s, d in zip(spec.shape, shape)):
            raise InvalidRequest(
                f"input '{name}' of model '{model.name}' has shape {list(spec.shape)}, got {shown(shape)}"
            )
        if model.max_batch_size > 0 and shape and shape[0] > model.max_batch_size:
            raise InvalidRequest(
                f"input '{name}': batch of {shape[0]} is over model '{model.name}''s max_batch_size "
                f"{model.max_batch_size}"
            )
        for key in tensor.parameters:
            if key.startswith("shared_memory"):
                raise InvalidRequest(f"input '{name}': shared memory is not supported; send the tensor in the request")
        if raw:
            arrays[name] = from_raw(name, tensor.datatype, shape, raw[i])
        else:
            arrays[name] = from_contents(name, tensor.datatype, shape, tensor.contents)
    missing = [n for n, spec in specs.items() if n not in arrays and not spec.optional]
    if missing:
        raise InvalidRequest(f"model '{model.name}' needs inputs {missing}")
    return arrays


def requested_outputs(model: ServedModel, request: pb.ModelInferRequest) -> list[str] | None:
    if not request.outputs:
        return None
    known = [s.name for s in model.outputs]
    names = []
    for out in request.outputs:
        if out.name not in known:
            raise InvalidRequest(f"model '{model.name}' has no output {shown(out.name)} (outputs: {', '.join(known)})")
        for key in out.parameters:
            if key == "classification" or key.startswith("shared_memory"):
                raise InvalidRequest(f"output '{out.name}': parameter {shown(key)} is not supported")
        names.append(out.name)
    return names


def deadline_of(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> float | None:
    """time.monotonic() deadline: the earlier of the gRPC deadline and the `timeout` parameter (µs)."""
    limits = []
    remaining = context.time_remaining()
    if remaining is not None:
        limits.append(remaining)
    if "timeout" in request.parameters:
        timeout = _param(request.parameters["timeout"])
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0:
            raise InvalidRequest("parameter 'timeout' must be a non-negative integer (microseconds)")
        if timeout > 0:
            limits.append(timeout / 1e6)
    return time.monotonic() + min(limits) if limits else None


def encode_response(
    model: ServedModel, request: pb.ModelInferRequest, results: dict[str, np.ndarray], names: list[str] | None
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    for name in names or [s.name for s in model.outputs if s.name in results]:
        datatype, raw = to_raw(np.asarray(results[name]))
        response.outputs.add(name=name, datatype=datatype, shape=list(np.shape(results[name])))
        response.raw_output_contents.append(raw)
    return response


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: ModelRegistry, loader: ModelLoader, *, server_name: str = "attnrec") -> None:
        self.models, self.loader = models, loader
        self.server_name = server_name
        self.server_version = _server_version()

    async def ServerLive(self, request, context):  # noqa: N802 (gRPC method names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=bool(self.models.ready))

    async def ModelReady(self, request, context):  # noqa: N802
        try:  # as in Triton: an unknown model (or version) is not ready, which is no error
            return pb.ModelReadyResponse(ready=bool(self.models.get(request.name, request.version).ready))
        except NotFound:
            return pb.ModelReadyResponse(ready=False)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name=self.server_name, version=self.server_version, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):  # noqa: N802
        return describe.model_metadata(self.models.get(request.name, request.version))

    async def ModelConfig(self, request, context):  # noqa: N802
        return pb.ModelConfigResponse(config=describe.model_config(self.models.get(request.name, request.version)))

    async def ModelStatistics(self, request, context):  # noqa: N802
        if request.name:
            models = [self.models.get(request.name, request.version)]
        else:
            if request.version:
                raise InvalidRequest("a version needs a model name")
            models = self.models.models()
        return pb.ModelStatisticsResponse(model_stats=[describe.model_statistics(m) for m in models])

    async def infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        model = self.models.get(request.model_name, request.model_version)
        started = time.perf_counter_ns()
        try:
            if not model.ready:
                raise Unavailable(f"model '{model.name}' is not ready")
            sequence = _param(request.parameters["sequence_id"]) if "sequence_id" in request.parameters else None
            if sequence:
                raise InvalidRequest("sequence batching is not supported (parameter 'sequence_id')")
            inputs = decode_inputs(model, request)
            names = requested_outputs(model, request)
            deadline = deadline_of(request, context)
        except ServingError:  # refused before the model saw it: still a failed request of that model
            model.record_rejected(time.perf_counter_ns() - started)
            raise
        results = await model.infer(inputs, outputs=names, deadline=deadline)
        return encode_response(model, request, results, names)

    async def ModelInfer(self, request, context):  # noqa: N802
        return await self.infer(request, context)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:  # noqa: N802
        """Requests run concurrently (up to STREAM_IN_FLIGHT); answers come as they finish, `id` echoed."""
        answers: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)

        async def answer(request: pb.ModelInferRequest | Undecodable) -> None:
            try:
                if isinstance(request, Undecodable):  # a frame that did not parse: answered in-band too
                    raise request.error()
                reply = pb.ModelStreamInferResponse(infer_response=await self.infer(request, context))
            except ServingError as exc:
                message = capped(f"{exc.code.name}: {exc}")
                client_errors("%s (in-band): %s", f"/{SERVICE_NAME}/ModelStreamInfer", message)
                echo = {} if isinstance(request, Undecodable) else {"model_name": request.model_name, "id": request.id}
                reply = pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(**echo))
            except Exception as exc:  # a bug: say so in-band, keep the stream (and the other requests) going
                log.exception("unhandled error in ModelStreamInfer")
                reply = pb.ModelStreamInferResponse(
                    error_message=f"INTERNAL: internal error: {type(exc).__name__}",
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
                )
            finally:
                slots.release()
            await answers.put(reply)

        async def read() -> None:
            tasks: set[asyncio.Future] = set()
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.ensure_future(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                await answers.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (reply := await answers.get()) is not None:
                yield reply
            await reader  # surfaces an error of the request stream itself
        finally:
            reader.cancel()

    async def RepositoryIndex(self, request, context):  # noqa: N802
        entries = []
        for model in self.models.models():
            ready = bool(model.ready)
            if request.ready and not ready:
                continue
            entries.append(
                pb.RepositoryIndexResponse.ModelIndex(
                    name=model.name,
                    version=model.version,
                    state="READY" if ready else "UNAVAILABLE",
                    reason="" if ready else "loading, warming up or draining",
                )
            )
        return pb.RepositoryIndexResponse(models=entries)

    async def RepositoryModelLoad(self, request, context):  # noqa: N802
        if not request.model_name:
            raise InvalidRequest("model_name is empty")
        unsupported = [k for k in request.parameters if k == "config" or k.startswith("file:")]
        if unsupported:
            raise InvalidRequest(
                f"load parameters {shown(unsupported)} are not supported: models come from the repository"
            )
        await self.loader.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):  # noqa: N802
        if not request.model_name:
            raise InvalidRequest("model_name is empty")
        await self.loader.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def add_to_server(server: grpc.aio.Server, models: ModelRegistry, loader: ModelLoader) -> KServeServicer:
    """Serve `inference.GRPCInferenceService` for `models` on `server`; returns the servicer."""
    servicer = KServeServicer(models, loader)
    add_service(server, servicer, pb.DESCRIPTOR.services_by_name["GRPCInferenceService"])
    return servicer
