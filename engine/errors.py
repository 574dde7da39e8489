"""The errors a client should see: each carries the gRPC status code it maps to (engine/interceptors.py
does the mapping, once, for every servicer)."""

from __future__ import annotations

import grpc


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
