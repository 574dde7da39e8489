"""The descriptor pool of attnrec's KServe stubs, kept apart from protobuf's default pool.

Triton's own Python packages (tritonclient, for one) register the `inference.*` messages in
the default pool under other file names; two registrations of one symbol make the second
import fail ("duplicate symbol 'inference.DataType'"). Our `inference` stubs therefore live in
`POOL`, so a process may import tritonclient and attnrec together. `POOL` falls back to the
default pool for every other file, so server reflection given `pool=POOL` describes the
KServe service and the default pool's services (health, the domain API) alike.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool


class _Database:
    """Our own files first, then whatever protobuf's default pool holds."""

    def __init__(self) -> None:
        self.files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self.files[proto.name] = proto

    @staticmethod
    def _from_default(file_descriptor) -> descriptor_pb2.FileDescriptorProto:
        proto = descriptor_pb2.FileDescriptorProto()
        file_descriptor.CopyToProto(proto)
        return proto

    # The method names are protobuf's DescriptorDatabase interface.
    def FindFileByName(self, name: str) -> descriptor_pb2.FileDescriptorProto:  # noqa: N802
        if name in self.files:
            return self.files[name]
        return self._from_default(descriptor_pool.Default().FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str) -> descriptor_pb2.FileDescriptorProto:  # noqa: N802
        for proto in self.files.values():
            package = proto.package + "." if proto.package else ""
            names = [package + m.name for m in proto.message_type] + [package + e.name for e in proto.enum_type]
            names += [package + s.name for s in proto.service]
            if any(symbol == n or symbol.startswith(n + ".") for n in names):
                return proto
        return self._from_default(descriptor_pool.Default().FindFileContainingSymbol(symbol))

    def FindFileContainingExtension(self, extendee: str, number: int):  # noqa: N802
        raise KeyError(f"{extendee}:{number}")

    def FindAllExtensionNumbers(self, extendee: str) -> list[int]:  # noqa: N802
        return []


_DATABASE = _Database()
POOL = descriptor_pool.DescriptorPool(_DATABASE)


def add_serialized_file(serialized: bytes):
    """What generated code does with the default pool's AddSerializedFile, for `POOL`."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    _DATABASE.add(proto)
    return POOL.FindFileByName(proto.name)
