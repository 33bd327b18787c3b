import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pedge.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from p2pedge.wire import (
    FrameDecoder,
    TensorLimits,
    decode_tensor,
    encode_frame,
    encode_tensor,
    pack,
    unpack,
)
from p2pedge.wire.messages import require, unpack_map

SAMPLES = [b"", b"a", b"hello world", bytes(range(256)) * 40]


def feed_all(decoder: FrameDecoder, data: bytes, step: int) -> list[bytes]:
    frames: list[bytes] = []
    for i in range(0, len(data), step):
        frames.extend(decoder.feed(data[i : i + step]))
    return frames


@pytest.mark.parametrize("step", [1, 3, 1 << 20])
def test_frames_whole_and_byte_by_byte(step: int) -> None:
    stream = b"".join(encode_frame(s) for s in SAMPLES)
    assert feed_all(FrameDecoder(1 << 16), stream, step) == SAMPLES


def test_trailing_partial_frame_is_kept_for_later() -> None:
    decoder = FrameDecoder(100)
    full = encode_frame(b"abc") + encode_frame(b"defg")
    assert decoder.feed(full[:-2]) == [b"abc"]
    assert decoder.buffered == 2  # the prefix is consumed, two payload bytes wait
    assert decoder.feed(full[-2:]) == [b"defg"]
    assert decoder.buffered == 0


def test_oversized_frame_is_refused_at_the_prefix() -> None:
    decoder = FrameDecoder(10)
    with pytest.raises(FrameTooLarge):
        decoder.feed((11).to_bytes(4, "big"))
    with pytest.raises(LocalProtocolError):
        encode_frame(b"x" * 11, max_frame=10)


def test_too_short_frame_is_refused_at_the_prefix() -> None:
    decoder = FrameDecoder(64, min_frame=16)
    with pytest.raises(RemoteProtocolError):
        decoder.feed((15).to_bytes(4, "big"))
    assert FrameDecoder(64, min_frame=16).feed((16).to_bytes(4, "big") + bytes(16)) == [bytes(16)]
    with pytest.raises(LocalProtocolError):
        FrameDecoder(8, min_frame=9)


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 64))
def test_any_split_gives_the_same_frames(payloads: list[bytes], step: int) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    assert feed_all(FrameDecoder(512), stream, step) == payloads


def test_messages_round_trip_and_reject_garbage() -> None:
    assert unpack(pack({"a": [1, 2.5, b"x"]})) == {"a": [1, 2.5, b"x"]}
    with pytest.raises(RemoteProtocolError):
        unpack(b"\xc1")
    with pytest.raises(RemoteProtocolError):
        unpack(pack({"a": 1}) + b"trailing")
    with pytest.raises(RemoteProtocolError):
        unpack_map(pack([1, 2]))
    with pytest.raises(RemoteProtocolError):
        unpack(pack("x" * 100), max_bytes=50)


def test_require_blames_the_peer() -> None:
    with pytest.raises(RemoteProtocolError, match="lacks"):
        require({}, "n", int)
    with pytest.raises(RemoteProtocolError, match="bool"):
        require({"n": True}, "n", int)
    assert require({"n": 3}, "n", int) == 3


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int32"])
def test_tensor_round_trip(dtype: str) -> None:
    array = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    decoded = decode_tensor(unpack(pack(encode_tensor(array))))
    assert decoded.dtype == array.dtype and np.array_equal(decoded, array)
    assert decoded.flags.writeable


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"dtype": "float64", "shape": [1], "data": b"\0" * 8}, "dtype"),
        ({"dtype": "object", "shape": [1], "data": b"\0" * 8}, "dtype"),
        ({"dtype": "float32", "shape": [2], "data": b"\0" * 4}, "bytes"),
        ({"dtype": "float32", "shape": [-1], "data": b""}, "dimension"),
        ({"dtype": "float32", "shape": [1, 1, 1, 1, 1], "data": b"\0" * 4}, "rank"),
        ({"dtype": "float32", "shape": [1 << 20, 1 << 20], "data": b""}, "exceeds"),
        ({"dtype": "float32", "shape": [1], "data": "text"}, "bytes"),
        ([1, 2], "map"),
    ],
)
def test_bad_tensors_are_refused_before_allocation(obj: object, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_tensor(obj, TensorLimits(max_bytes=1 << 20))


def test_wire_does_not_load_heavy_modules() -> None:
    import subprocess
    import sys

    heavy = "('trio', 'onnxruntime', 'libp2p')"
    code = f"import sys, p2pedge.wire; print(any(m in sys.modules for m in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
