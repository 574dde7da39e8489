"""The KServe V2 / Open Inference Protocol surface (`inference.GRPCInferenceService`)."""

from .servicer import SERVICE_NAME, KServeServicer, add_to_server

__all__ = ["SERVICE_NAME", "KServeServicer", "add_to_server"]
