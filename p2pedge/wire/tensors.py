"""Typed tensors on the wire: ``{"dtype": str, "shape": [int], "data": bytes}``.

The decoder checks dtype, rank, every dimension and the byte count against limits
*before* building the array, and copies out of the message so the array owns its memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pedge.errors import LocalProtocolError, RemoteProtocolError

ALLOWED_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
}


@dataclass(frozen=True)
class TensorLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_rank: int = 4
    max_dim: int = 1 << 20
    dtypes: frozenset[str] = frozenset(ALLOWED_DTYPES)


def encode_tensor(array: npt.NDArray[Any]) -> dict[str, Any]:
    name = array.dtype.name
    if name not in ALLOWED_DTYPES:
        raise LocalProtocolError(f"dtype {name} cannot go on the wire")
    contiguous = np.ascontiguousarray(array, dtype=ALLOWED_DTYPES[name])
    return {"dtype": name, "shape": list(contiguous.shape), "data": contiguous.tobytes()}


def decode_tensor(obj: Any, limits: TensorLimits = TensorLimits()) -> npt.NDArray[Any]:
    if not isinstance(obj, dict):
        raise RemoteProtocolError("tensor must be a map")
    dtype_name, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if not isinstance(dtype_name, str) or dtype_name not in limits.dtypes:
        raise RemoteProtocolError(f"tensor dtype {dtype_name!r} not allowed")
    if not isinstance(shape, list) or not 0 < len(shape) <= limits.max_rank:
        raise RemoteProtocolError(f"tensor shape {shape!r} has a bad rank")
    if not all(type(d) is int and 0 <= d <= limits.max_dim for d in shape):
        raise RemoteProtocolError(f"tensor shape {shape!r} has a bad dimension")
    if not isinstance(data, bytes):
        raise RemoteProtocolError("tensor data must be bytes")
    dtype = ALLOWED_DTYPES[dtype_name]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected > limits.max_bytes:
        raise RemoteProtocolError(f"tensor of {expected} bytes exceeds limit {limits.max_bytes}")
    if len(data) != expected:
        raise RemoteProtocolError(f"tensor data is {len(data)} bytes, shape needs {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
