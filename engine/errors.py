"""The errors a client should see: each carries the gRPC status code it maps to (engine/interceptors.py
does the mapping, once, for every servicer); `shown` for echoing a client's value in a message, and
`StartupError` for a server that cannot start as configured."""

from __future__ import annotations

import logging
import time

import grpc

log = logging.getLogger(__name__)

SHOWN_CHARS = 80  # of a client's value echoed in a message (a 1 MB name must not make a 1 MB status)
MESSAGE_CHARS = 1000  # of any status message (the client's metadata limit is 8 KiB by default)


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


class PermissionDenied(ServingError):
    code = grpc.StatusCode.PERMISSION_DENIED


class BatchFailed(ServingError):
    """A batch failed for a reason no request caused (a bug in its run function or in the batcher):
    every request of that batch gets this, saying what failed, and the batcher goes on serving."""

    code = grpc.StatusCode.INTERNAL


class StartupError(Exception):
    """The server cannot start as configured (a port in use, no repository): one line for the
    operator, naming the flag, and exit status 2 (attnrec/cli.py)."""


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)`, cut to about `limit` characters with the full length said."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, (str, bytes)) else f"{len(text)} characters shown"
    return f"{text[:limit]}… ({size})"


def capped(message: str, limit: int = MESSAGE_CHARS) -> str:
    return message if len(message) <= limit else message[:limit] + f"… ({len(message)} characters)"


class RateLimitedLog:
    """One log line per `interval` seconds at most; the lines left out are counted in the next one.
    Client errors go here: they are the client's to fix, and a flood of them must not flood the log."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0, level: int = logging.WARNING) -> None:
        self.logger, self.interval, self.level = logger, interval, level
        self._next = 0.0
        self._dropped = 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._dropped += 1
            return
        self._next = now + self.interval
        if self._dropped:
            message += " (and %d more client errors since the previous line)"
            args = (*args, self._dropped)
            self._dropped = 0
        self.logger.log(self.level, message, *args)


client_errors = RateLimitedLog(log)  # shared by the interceptors and the streams' in-band errors
