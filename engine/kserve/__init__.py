"""The KServe V2 / Open Inference Protocol surface (`inference.GRPCInferenceService`)."""

from .servicer import ADMIN_METHODS, SERVICE_NAME, KServeServicer, add_to_server

__all__ = ["ADMIN_METHODS", "SERVICE_NAME", "KServeServicer", "add_to_server"]
