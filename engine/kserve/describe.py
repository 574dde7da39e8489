"""ServedModel → the KServe/Triton descriptions: metadata, model configuration, statistics."""

from __future__ import annotations

from ..model_interface import ServedModel, TensorSpec
from ..model_stats import ModelStats
from ..rpc.inference import grpc_service_pb2 as pb
from ..rpc.inference import model_config_pb2 as mc
from .tensors import CONFIG_DTYPES

BACKENDS = {"onnxruntime_onnx": "onnxruntime"}  # Triton's backend name for each platform we serve


def tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def model_metadata(model: ServedModel) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[model.version],
        platform=model.platform,
        inputs=[tensor_metadata(s) for s in model.inputs],
        outputs=[tensor_metadata(s) for s in model.outputs],
    )


def _dims(model: ServedModel, spec: TensorSpec) -> list[int]:
    # Triton's convention: with max_batch_size > 0 the batch dimension is implicit, not in dims.
    return list(spec.shape[1:] if model.max_batch_size > 0 else spec.shape)


def model_config(model: ServedModel) -> mc.ModelConfig:
    config = mc.ModelConfig(
        name=model.name,
        platform=model.platform,
        backend=BACKENDS.get(model.platform, "attnrec"),
        max_batch_size=model.max_batch_size,
        input=[
            mc.ModelInput(name=s.name, data_type=CONFIG_DTYPES[s.datatype], dims=_dims(model, s), optional=s.optional)
            for s in model.inputs
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=CONFIG_DTYPES[s.datatype], dims=_dims(model, s))
            for s in model.outputs
        ],
    )
    config.parameters["version"].string_value = model.version
    batching = config.dynamic_batching  # every served model has a dynamic batcher in front
    batching.max_queue_delay_microseconds = int(model.max_queue_delay_us)
    batching.preferred_batch_size.extend(int(b) for b in model.preferred_batch_sizes)
    batching.preserve_ordering = False  # every request gets its own rows back, whatever the order
    batching.default_queue_policy.max_queue_size = int(model.max_queue_size)
    return config


def _duration(count: int, ns: int) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=int(count), ns=int(ns))


def model_statistics(model: ServedModel) -> pb.ModelStatistics:
    s: ModelStats = model.stats
    # As Triton: queue and compute phases are counted once per successful request (each request of a
    # batch is charged its batch's phases); batch_stats once per execution.
    ok = s.success_count
    return pb.ModelStatistics(
        name=model.name,
        version=model.version,
        last_inference=int(s.last_inference_ms),
        inference_count=int(s.inference_count),
        execution_count=int(s.execution_count),
        inference_stats=pb.InferStatistics(
            success=_duration(ok, s.success_ns),
            fail=_duration(s.fail_count, s.fail_ns),
            queue=_duration(ok, s.queue_ns),
            compute_input=_duration(ok, s.compute_input_ns),
            compute_infer=_duration(ok, s.compute_infer_ns),
            compute_output=_duration(ok, s.compute_output_ns),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=int(size), compute_infer=_duration(count, ns))
            for size, (count, ns) in sorted(s.batch_stats.items())
        ],
    )
