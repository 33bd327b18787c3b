"""msgpack encoding of plain messages (dicts of str, int, float, bytes, lists).

``unpack`` never returns a non-dict surprise silently: callers that need a mapping use
:func:`unpack_map`, and garbage from a peer is a :class:`RemoteProtocolError`.
"""

from __future__ import annotations

from typing import Any

import msgpack

from p2pedge.errors import LocalProtocolError, RemoteProtocolError

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024


def pack(obj: Any) -> bytes:
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode message: {exc}") from exc
    return data


def unpack(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE) -> Any:
    """Decode one msgpack value, bounding every container by ``max_bytes``."""
    if len(data) > max_bytes:
        raise RemoteProtocolError(f"message of {len(data)} bytes exceeds limit {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes,
            max_ext_len=max_bytes,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise RemoteProtocolError(f"malformed message: {exc}") from exc
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"malformed message: {exc}") from exc


def unpack_map(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE) -> dict[str, Any]:
    value = unpack(data, max_bytes)
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"expected a map, got {type(value).__name__}")
    return value


def require(message: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """Fetch a field a peer must have sent, with the right type, or blame the peer."""
    if key not in message:
        raise RemoteProtocolError(f"message lacks field {key!r}")
    value = message[key]
    if isinstance(value, bool) and kind is int:
        raise RemoteProtocolError(f"field {key!r} must be int, got bool")
    if not isinstance(value, kind):
        raise RemoteProtocolError(f"field {key!r} has type {type(value).__name__}")
    return value
