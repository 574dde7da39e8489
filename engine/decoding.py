"""Request bodies that do not parse arrive as a value, never as an exception.

grpc.aio answers UNKNOWN ("Unexpected DecodeError"), with a traceback in the log, when a request
deserializer raises, and a request stream dies with its one bad frame. So our services are
registered here with deserializers that never raise: a body that is not a valid message (a
string field holding invalid UTF-8 included) arrives as an `Undecodable`. The error interceptor
answers it INVALID_ARGUMENT on unary methods; a streaming method sees it among its requests and
answers that frame in-band, and the stream goes on.
"""

from __future__ import annotations

from typing import Any, Callable

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from .errors import InvalidRequest


class Undecodable:
    """A request body that could not be parsed as its method's message type."""

    __slots__ = ("type_name", "size", "reason")

    def __init__(self, type_name: str, size: int, reason: str) -> None:
        self.type_name, self.size, self.reason = type_name, size, reason

    @property
    def message(self) -> str:
        return (
            f"could not parse the request ({self.size} bytes) as {self.type_name}: {self.reason} "
            "(not valid protobuf, or a string field that is not valid UTF-8)"
        )

    def error(self) -> InvalidRequest:
        return InvalidRequest(self.message)


def deserializer(cls: Any) -> Callable[[bytes], Any]:
    """`cls.FromString`, returning an `Undecodable` where it would raise."""
    parse, name = cls.FromString, cls.DESCRIPTOR.full_name

    def decode(body: bytes) -> Any:
        try:
            return parse(body)
        except Exception as exc:  # DecodeError, or whatever else hostile bytes make protobuf raise
            return Undecodable(name, len(body), type(exc).__name__)

    return decode


_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Register every method of `service` on `servicer` (what the generated `add_…_to_server` does,
    with `deserializer`'s request decoding)."""
    handlers = {
        m.name: _KINDS[m.client_streaming, m.server_streaming](
            getattr(servicer, m.name),
            request_deserializer=deserializer(GetMessageClass(m.input_type)),
            response_serializer=GetMessageClass(m.output_type).SerializeToString,
        )
        for m in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
