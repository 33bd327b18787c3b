"""Typed tensors on the wire: ``{"dtype": str, "shape": [int], "data": bytes}``.

The decoder checks dtype, rank, every dimension and the byte count against limits
*before* building the array, and copies out of the message so the array owns its memory.

Both run once per pipeline hop, right after the CPU has streamed a shard's weights through
its caches, so they avoid numpy calls that are cheap warm but slow cold (``np.prod``,
``dtype.name``: 90-130 us each here after a 64 MB sweep, against 10-15 us for ``math.prod``
or a dict lookup; ``benchmarks/hop_cold.py``).
"""

from __future__ import annotations

import math
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
_NAME_OF = {dtype: name for name, dtype in ALLOWED_DTYPES.items()}


@dataclass(frozen=True)
class TensorLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_rank: int = 4
    max_dim: int = 1 << 20
    dtypes: frozenset[str] = frozenset(ALLOWED_DTYPES)


def encode_tensor(array: npt.NDArray[Any]) -> dict[str, Any]:
    """The wire map of ``array`` (C order, little-endian)."""
    name = _NAME_OF.get(array.dtype)
    if name is None:  # a wire dtype in the other byte order, or not a wire dtype at all
        name = array.dtype.name
        if name not in ALLOWED_DTYPES:
            raise LocalProtocolError(f"dtype {name} cannot go on the wire")
        array = array.astype(ALLOWED_DTYPES[name])
    return {"dtype": name, "shape": list(array.shape), "data": array.tobytes()}


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
    expected = math.prod(shape) * dtype.itemsize
    if expected > limits.max_bytes:
        raise RemoteProtocolError(f"tensor of {expected} bytes exceeds limit {limits.max_bytes}")
    if len(data) != expected:
        raise RemoteProtocolError(f"tensor data is {len(data)} bytes, shape needs {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
