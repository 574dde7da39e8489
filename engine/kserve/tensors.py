"""KServe V2 tensors ↔ numpy: datatypes, typed `contents`, raw bytes (BYTES with length prefixes).

Every problem with a client's tensor raises `InvalidRequest` naming the tensor and what was wrong.
Nothing is allocated from a declared shape before the bytes that were actually sent are known to
fill it: a 42-byte request declaring 10^8 elements is refused, not allocated.
"""

from __future__ import annotations

import struct

import numpy as np

from ..errors import InvalidRequest, shown

# V2 datatype → numpy dtype (little-endian on the wire); BYTES elements are Python bytes objects.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# The InferTensorContents field that carries each datatype (FP16 travels raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# The element type of each typed contents field.
_FIELD_DTYPES = {
    "bool_contents": np.bool_,
    "int_contents": np.int64,
    "int64_contents": np.int64,
    "uint_contents": np.uint64,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}

# Triton's model-configuration enum names (inference.DataType) for each V2 datatype.
CONFIG_DTYPES = {name: "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}" for name in DTYPES}


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of a numpy array (str/bytes/object arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    for name, dtype in DTYPES.items():
        if name != "BYTES" and array.dtype.newbyteorder("<") == dtype:
            return name
    raise TypeError(f"no KServe V2 datatype for numpy dtype {array.dtype}")


MAX_DIM = 2**31 - 1  # no tensor a model here reads has a longer dimension (numpy's limits are near 2^63)
MAX_RANK = 8
BYTES_PREFIX = 4  # every raw BYTES element takes at least its 4-byte length


def check_shape(name: str, shape) -> tuple[int, ...]:
    if len(shape) > MAX_RANK:
        raise InvalidRequest(f"input '{name}': {len(shape)} dimensions; tensors here have at most {MAX_RANK}")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"input '{name}': shape {shown(list(shape))} has a negative dimension")
    if any(d > MAX_DIM for d in shape):
        raise InvalidRequest(f"input '{name}': shape {shown(list(shape))} has a dimension over {MAX_DIM}")
    return shape


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_datatype(name: str, datatype: str) -> None:
    if datatype not in DTYPES:
        raise InvalidRequest(f"input '{name}': unsupported datatype '{datatype}' (supported: {', '.join(DTYPES)})")


def decode_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    """`count` BYTES elements, each a 4-byte little-endian length then that many bytes."""
    if count * BYTES_PREFIX > len(raw):  # checked before the allocation: the count is the client's word
        raise InvalidRequest(
            f"input '{name}': {count} BYTES elements need at least {count * BYTES_PREFIX} raw bytes "
            f"(a 4-byte length each), got {len(raw)}"
        )
    out = np.empty(count, dtype=object)
    pos, view = 0, memoryview(raw)
    for i in range(count):
        if pos + 4 > len(raw):
            raise InvalidRequest(f"input '{name}': raw BYTES content ends after {i} of {count} elements")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise InvalidRequest(f"input '{name}': BYTES element {i} claims {length} bytes, {len(raw) - pos} remain")
        out[i] = bytes(view[pos : pos + length])
        pos += length
    if pos != len(raw):
        raise InvalidRequest(f"input '{name}': {len(raw) - pos} bytes left over after {count} BYTES elements")
    return out


def encode_bytes(array: np.ndarray) -> bytes:
    """Length-prefixed serialisation of a BYTES tensor (str elements are UTF-8 encoded)."""
    parts = []
    for item in array.reshape(-1):
        b = item.encode() if isinstance(item, str) else bytes(item)
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def from_raw(name: str, datatype: str, shape, raw: bytes) -> np.ndarray:
    """A tensor from its raw_input_contents entry."""
    _check_datatype(name, datatype)
    shape = check_shape(name, shape)
    count = _count(shape)
    if datatype == "BYTES":
        return decode_bytes(name, raw, count).reshape(shape)
    dtype = DTYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidRequest(
            f"input '{name}': shape {list(shape)} of {datatype} needs {count * dtype.itemsize} raw bytes, "
            f"got {len(raw)}"
        )
    if datatype == "BOOL":  # one byte per element; any non-zero byte is true
        return (np.frombuffer(raw, dtype=np.uint8) != 0).reshape(shape)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def from_contents(name: str, datatype: str, shape, contents) -> np.ndarray:
    """A tensor from typed InferTensorContents: the field must match the datatype, the count the shape."""
    _check_datatype(name, datatype)
    shape = check_shape(name, shape)
    count = _count(shape)
    if datatype not in CONTENTS_FIELD:
        raise InvalidRequest(f"input '{name}': {datatype} has no typed contents field; send it in raw_input_contents")
    expected = CONTENTS_FIELD[datatype]
    present = [field.name for field, _ in contents.ListFields()]
    wrong = [f for f in present if f != expected]
    if wrong:
        raise InvalidRequest(f"input '{name}': datatype {datatype} is sent in {expected}, got {', '.join(wrong)}")
    values = getattr(contents, expected)
    if len(values) != count:
        raise InvalidRequest(f"input '{name}': shape {list(shape)} needs {count} elements, got {len(values)}")
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    dtype = DTYPES[datatype]
    # Read at the width of the protobuf field (exact for 64-bit integers), then narrow after a range check.
    wide = np.fromiter(values, dtype=_FIELD_DTYPES[expected], count=count)
    if dtype.kind in "iu" and count:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidRequest(f"input '{name}': a value is outside the range of {datatype}")
    return wide.astype(dtype.newbyteorder("=")).reshape(shape)


def to_raw(array: np.ndarray) -> tuple[str, bytes]:
    """(datatype, raw_output_contents entry) of an output tensor."""
    datatype = datatype_of(array)
    if datatype == "BYTES":
        return datatype, encode_bytes(array)
    return datatype, np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()
