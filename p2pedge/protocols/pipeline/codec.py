"""Messages of ``/p2pedge/pipeline/1.0.0``: typed dataclasses <-> msgpack maps.

Pure: no trio, no onnxruntime. Every field a peer sends is checked (type, range,
tensor limits) before anything is allocated from it; a violation is a
:class:`~p2pedge.errors.RemoteProtocolError`. Frames are the shared 4-byte length
prefix from :mod:`p2pedge.wire.framing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pedge.errors import LocalProtocolError, RemoteProtocolError
from p2pedge.wire.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from p2pedge.wire.messages import pack, require, unpack_map
from p2pedge.wire.tensors import TensorLimits, decode_tensor, encode_tensor

PROTOCOL_ID = "/p2pedge/pipeline/1.0.0"
MAX_FRAME = DEFAULT_MAX_FRAME
MAX_ID = (1 << 63) - 1
MAX_LENGTH = 1 << 20
WIRE_DTYPES = ("float32", "float16")
TENSOR_LIMITS = TensorLimits(max_bytes=MAX_FRAME, max_rank=3, max_dim=MAX_LENGTH)

# Error codes a server may answer with; the client maps them to exceptions.
E_BAD_REQUEST = "bad_request"
E_UNSUPPORTED = "unsupported"
E_BUDGET = "budget"
E_UNKNOWN_SESSION = "unknown_session"
E_CLOSED = "session_closed"
E_EXPIRED = "session_expired"
E_BUSY = "busy"
E_INTERNAL = "internal"
ERROR_CODES = frozenset(
    {
        E_BAD_REQUEST,
        E_UNSUPPORTED,
        E_BUDGET,
        E_UNKNOWN_SESSION,
        E_CLOSED,
        E_EXPIRED,
        E_BUSY,
        E_INTERNAL,
    }
)
MAX_TEXT = 1024


@dataclass(frozen=True)
class Open:
    """Ask for a session on ``[start, end)`` of ``model`` holding up to ``max_length`` tokens."""

    rid: int
    model: str
    start: int
    end: int
    max_length: int
    dtype: str = "float32"


@dataclass(frozen=True)
class Opened:
    rid: int
    session: int
    kv_bytes: int


@dataclass(frozen=True, eq=False)
class Step:
    """Run ``x`` at positions ``start .. start + n``; the server first rewinds its cache to
    ``start`` (so a resent step is idempotent). ``x`` is token ids ``int64 [1, n]`` for a
    first shard, hidden states ``[1, n, hidden]`` otherwise."""

    rid: int
    session: int
    start: int
    x: npt.NDArray[Any]


@dataclass(frozen=True, eq=False)
class Output:
    """Hidden states ``[1, n, hidden]``, or last-position logits ``[1, vocab]`` (last shard)."""

    rid: int
    session: int
    y: npt.NDArray[Any]


@dataclass(frozen=True)
class Close:
    rid: int
    session: int


@dataclass(frozen=True)
class Closed:
    rid: int
    session: int


@dataclass(frozen=True)
class Error:
    rid: int
    code: str
    message: str = field(default="")


Message = Open | Opened | Step | Output | Close | Closed | Error
Request = Open | Step | Close
Reply = Opened | Output | Closed | Error


def _tensor(array: npt.NDArray[Any]) -> dict[str, Any]:
    return encode_tensor(array)


def to_map(msg: Message) -> dict[str, Any]:
    """The msgpack map for ``msg`` (what :class:`FramedStream.send` takes)."""
    match msg:
        case Open():
            if msg.dtype not in WIRE_DTYPES:
                raise LocalProtocolError(f"wire dtype {msg.dtype!r} not supported")
            return {
                "t": "open",
                "rid": msg.rid,
                "model": msg.model,
                "start": msg.start,
                "end": msg.end,
                "max_length": msg.max_length,
                "dtype": msg.dtype,
            }
        case Opened():
            return {"t": "opened", "rid": msg.rid, "session": msg.session, "kv": msg.kv_bytes}
        case Step():
            return {
                "t": "step",
                "rid": msg.rid,
                "session": msg.session,
                "start": msg.start,
                "x": _tensor(msg.x),
            }
        case Output():
            return {"t": "out", "rid": msg.rid, "session": msg.session, "y": _tensor(msg.y)}
        case Close():
            return {"t": "close", "rid": msg.rid, "session": msg.session}
        case Closed():
            return {"t": "closed", "rid": msg.rid, "session": msg.session}
        case Error():
            return {"t": "error", "rid": msg.rid, "code": msg.code, "message": msg.message}
    raise LocalProtocolError(f"not a pipeline message: {msg!r}")


def _int(m: dict[str, Any], key: str, lo: int = 0, hi: int = MAX_ID) -> int:
    value: int = require(m, key, int)
    if not lo <= value <= hi:
        raise RemoteProtocolError(f"field {key!r}={value} outside [{lo}, {hi}]")
    return value


def _str(m: dict[str, Any], key: str) -> str:
    value: str = require(m, key, str)
    if len(value) > MAX_TEXT:
        raise RemoteProtocolError(f"field {key!r} is longer than {MAX_TEXT} characters")
    return value


def from_map(m: dict[str, Any], limits: TensorLimits = TENSOR_LIMITS) -> Message:
    """Validate a decoded map from a peer and build the typed message."""
    kind = _str(m, "t")
    rid = _int(m, "rid")
    if kind == "open":
        start, end = _int(m, "start", 0, MAX_LENGTH), _int(m, "end", 1, MAX_LENGTH)
        if start >= end:
            raise RemoteProtocolError(f"empty layer range [{start}, {end})")
        dtype = _str(m, "dtype")
        if dtype not in WIRE_DTYPES:
            raise RemoteProtocolError(f"wire dtype {dtype!r} not supported")
        return Open(rid, _str(m, "model"), start, end, _int(m, "max_length", 1, MAX_LENGTH), dtype)
    if kind == "opened":
        return Opened(rid, _int(m, "session"), _int(m, "kv"))
    if kind == "step":
        return Step(
            rid,
            _int(m, "session"),
            _int(m, "start", 0, MAX_LENGTH),
            decode_tensor(m.get("x"), limits),
        )
    if kind == "out":
        return Output(rid, _int(m, "session"), decode_tensor(m.get("y"), limits))
    if kind == "close":
        return Close(rid, _int(m, "session"))
    if kind == "closed":
        return Closed(rid, _int(m, "session"))
    if kind == "error":
        code = _str(m, "code")
        if code not in ERROR_CODES:
            raise RemoteProtocolError(f"unknown error code {code!r}")
        return Error(rid, code, _str(m, "message"))
    raise RemoteProtocolError(f"unknown message type {kind!r}")


def encode(msg: Message, max_frame: int = MAX_FRAME) -> bytes:
    """One whole frame (length prefix included)."""
    return encode_frame(pack(to_map(msg)), max_frame)


class Decoder:
    """Bytes in, typed messages out; limits are checked before a frame is buffered."""

    def __init__(self, max_frame: int = MAX_FRAME, limits: TensorLimits = TENSOR_LIMITS) -> None:
        self._frames = FrameDecoder(max_frame)
        self._max_frame = max_frame
        self._limits = limits

    @property
    def buffered(self) -> int:
        return self._frames.buffered

    def feed(self, data: bytes) -> list[Message]:
        return [
            from_map(unpack_map(f, self._max_frame), self._limits) for f in self._frames.feed(data)
        ]


def as_wire(array: npt.NDArray[Any], dtype: str) -> npt.NDArray[Any]:
    """Cast hidden states to the session's wire dtype (token ids stay int64)."""
    if array.dtype.kind in "iu":
        return np.ascontiguousarray(array, dtype=np.int64)
    return np.ascontiguousarray(array, dtype=np.dtype(dtype))
