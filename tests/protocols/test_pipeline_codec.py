"""The pipeline codec: round trips, byte-by-byte feeding, trailing bytes, hostile input."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest

from p2pedge.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from p2pedge.protocols.pipeline import codec
from p2pedge.wire.tensors import TensorLimits

HIDDEN = np.arange(2 * 8, dtype=np.float32).reshape(1, 2, 8)
MESSAGES: list[codec.Message] = [
    codec.Open(1, "tiny", 0, 4, 128, "float16"),
    codec.Opened(1, 7, 4096),
    codec.Step(2, 7, 3, HIDDEN),
    codec.Step(3, 7, 0, np.array([[1, 2, 3]], dtype=np.int64)),
    codec.Output(2, 7, HIDDEN.astype(np.float16)),
    codec.Close(4, 7),
    codec.Closed(4, 7),
    codec.Error(5, codec.E_BUDGET, "no room"),
]


def same(a: codec.Message, b: codec.Message) -> bool:
    if type(a) is not type(b):
        return False
    for key, value in vars(a).items():
        other = getattr(b, key)
        if isinstance(value, np.ndarray):
            if value.dtype != other.dtype or not np.array_equal(value, other):
                return False
        elif value != other:
            return False
    return True


def test_round_trip_whole_stream() -> None:
    data = b"".join(codec.encode(m) for m in MESSAGES)
    got = codec.Decoder().feed(data)
    assert len(got) == len(MESSAGES)
    assert all(same(a, b) for a, b in zip(MESSAGES, got, strict=True))


def test_byte_by_byte_feeding() -> None:
    decoder = codec.Decoder()
    got: list[codec.Message] = []
    for m in MESSAGES:
        frame = codec.encode(m)
        for i in range(len(frame)):
            out = decoder.feed(frame[i : i + 1])
            assert out == [] or i == len(frame) - 1
            got += out
    assert all(same(a, b) for a, b in zip(MESSAGES, got, strict=True))
    assert decoder.buffered == 0


def test_trailing_bytes_stay_buffered_until_complete() -> None:
    decoder = codec.Decoder()
    frame = codec.encode(MESSAGES[0])
    assert len(decoder.feed(frame + frame[:5])) == 1
    assert decoder.buffered == 5 - 4  # prefix consumed, one payload byte waiting
    assert len(decoder.feed(frame[5:])) == 1


def test_trailing_garbage_inside_a_frame_is_rejected() -> None:
    payload = msgpack.packb(codec.to_map(MESSAGES[5])) + b"\x00"
    with pytest.raises(RemoteProtocolError):
        codec.Decoder().feed(struct.pack(">I", len(payload)) + payload)


def test_oversized_frame_refused_from_prefix_alone() -> None:
    decoder = codec.Decoder(max_frame=1024)
    with pytest.raises(FrameTooLarge):
        decoder.feed(struct.pack(">I", 1 << 30))


def test_tensor_size_checked_before_allocation() -> None:
    m = codec.to_map(MESSAGES[2])
    m["x"]["shape"] = [1, 1 << 19, 1 << 19]
    with pytest.raises(RemoteProtocolError, match=r"exceeds|bad dimension"):
        codec.from_map(m, TensorLimits(max_bytes=1 << 20, max_rank=3, max_dim=1 << 20))


BAD: list[tuple[str, Any]] = [
    ("t", "teleport"),
    ("rid", -1),
    ("rid", True),
    ("session", "7"),
    ("start", 1 << 40),
]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_bad_fields_are_remote_errors(key: str, value: Any) -> None:
    m = codec.to_map(MESSAGES[2])
    m[key] = value
    with pytest.raises(RemoteProtocolError):
        codec.from_map(m)


def test_bad_open_fields() -> None:
    base = codec.to_map(MESSAGES[0])
    for patch in ({"start": 4}, {"dtype": "bfloat16"}, {"model": "x" * 5000}, {"end": 0}):
        with pytest.raises(RemoteProtocolError):
            codec.from_map({**base, **patch})
    with pytest.raises(RemoteProtocolError, match="unknown error code"):
        codec.from_map({"t": "error", "rid": 1, "code": "oops", "message": ""})


def test_tensor_dtype_allow_list_and_byte_count() -> None:
    m = codec.to_map(MESSAGES[2])
    for patch in ({"dtype": "float64"}, {"data": m["x"]["data"][:-1]}, {"shape": [1, 2, 8, 1, 1]}):
        with pytest.raises(RemoteProtocolError):
            codec.from_map({**m, "x": {**m["x"], **patch}})


def test_local_misuse_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        codec.to_map(codec.Open(1, "m", 0, 1, 8, "bfloat16"))
    with pytest.raises(LocalProtocolError):
        codec.encode(codec.Step(1, 1, 0, np.zeros((1, 1024, 8), np.float32)), max_frame=64)


def test_as_wire_casts_hidden_only() -> None:
    assert codec.as_wire(HIDDEN, "float16").dtype == np.float16
    assert codec.as_wire(np.array([[1]], np.int32), "float16").dtype == np.int64
