"""Blob codec: round trips, limits, and framing fed whole, byte by byte, with trailing bytes."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pedge.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from p2pedge.ids import ModelId
from p2pedge.protocols.blob.codec import (
    MAX_CHUNK,
    MAX_REQUEST_FRAME,
    MAX_RESPONSE_FRAME,
    ChunkRequest,
    DataResponse,
    ErrorResponse,
    ManifestRequest,
    RequestDecoder,
    ResponseDecoder,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    frame,
)

DIGEST = "ab" * 32
requests = st.one_of(
    st.builds(
        ChunkRequest,
        st.just(DIGEST),
        st.integers(0, 2**32 - 1),
        st.integers(1024, MAX_CHUNK),
    ),
    st.builds(ManifestRequest, st.sampled_from([ModelId("tiny", "1"), ModelId("a.b-c", "x+1")])),
)
responses = st.one_of(
    st.builds(DataResponse, st.binary(max_size=4096)),
    st.builds(ErrorResponse, st.sampled_from(["not_found", "busy"]), st.text(max_size=50)),
    st.builds(
        ErrorResponse,
        st.just("busy"),
        st.text(max_size=50),
        st.sampled_from(["blob.bytes_in_flight", "blob.requests"]),
        st.sampled_from(["peer", "source", "total"]),
    ),
)


@given(requests)
def test_request_roundtrip(request: ChunkRequest | ManifestRequest) -> None:
    assert decode_request(encode_request(request)) == request


@given(responses)
def test_response_roundtrip(response: DataResponse | ErrorResponse) -> None:
    assert decode_response(encode_response(response)) == response


@given(st.lists(requests, min_size=1, max_size=5))
def test_request_stream_whole_and_byte_by_byte(batch: list[ChunkRequest | ManifestRequest]) -> None:
    wire = b"".join(frame(encode_request(r), MAX_REQUEST_FRAME) for r in batch)
    assert RequestDecoder().feed(wire) == batch
    decoder = RequestDecoder()
    got = [m for i in range(len(wire)) for m in decoder.feed(wire[i : i + 1])]
    assert got == batch and decoder.buffered == 0


def test_response_stream_with_trailing_partial_frame() -> None:
    first = frame(encode_response(DataResponse(b"x" * 5000)), MAX_RESPONSE_FRAME)
    second = frame(encode_response(ErrorResponse("busy", "later")), MAX_RESPONSE_FRAME)
    decoder = ResponseDecoder()
    assert decoder.feed(first + second[:3]) == [DataResponse(b"x" * 5000)]
    assert decoder.buffered == 3
    assert decoder.feed(second[3:]) == [ErrorResponse("busy", "later")]


def test_trailing_bytes_inside_payload_refused() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_request(encode_request(ChunkRequest(DIGEST, 0, 4096)) + b"\x00")
    with pytest.raises(RemoteProtocolError):
        decode_response(encode_response(DataResponse(b"a")) + b"\xc0")


def test_oversized_frames_refused_before_buffering() -> None:
    with pytest.raises(FrameTooLarge):
        RequestDecoder().feed((MAX_REQUEST_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge):
        ResponseDecoder().feed((MAX_RESPONSE_FRAME + 1).to_bytes(4, "big"))


@pytest.mark.parametrize(
    "message",
    [
        {"op": "chunk", "digest": "AB" * 32, "index": 0, "chunk_size": 4096},
        {"op": "chunk", "digest": DIGEST + "\n", "index": 0, "chunk_size": 4096},
        {"op": "chunk", "digest": DIGEST[:-1] + "g", "index": 0, "chunk_size": 4096},
        {"op": "chunk", "digest": DIGEST.encode(), "index": 0, "chunk_size": 4096},
        {"op": "chunk", "digest": DIGEST, "index": 2**32, "chunk_size": 4096},
        {"op": "chunk", "digest": DIGEST, "index": 0.0, "chunk_size": 4096},
        {"op": "chunk", "digest": DIGEST, "index": 0, "chunk_size": 4096.0},
        {"op": "chunk", "digest": DIGEST, "index": -1, "chunk_size": 4096},
        {"op": "chunk", "digest": DIGEST, "index": True, "chunk_size": 4096},
        {"op": "chunk", "digest": DIGEST, "index": 0, "chunk_size": MAX_CHUNK + 1},
        {"op": "chunk", "digest": DIGEST, "index": 0, "chunk_size": 10},
        {"op": "chunk", "digest": DIGEST, "index": 0, "chunk_size": 4096, "x": 1},
        {"op": "manifest", "model": "../etc"},
        {"op": "delete"},
        {"digest": DIGEST},
        [1, 2],
    ],
)
def test_bad_requests_are_remote_errors(message: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_request(msgpack.packb(message))


@pytest.mark.parametrize(
    "message",
    [
        {"ok": True},
        {"ok": True, "data": "text"},
        {"ok": True, "data": b"", "extra": 1},
        {"ok": False, "error": "explode"},
        {"ok": False, "error": "busy", "message": 5},
        {"ok": False, "error": "busy", "limit": "Blob Bytes"},
        {"ok": False, "error": "busy", "limit": "x" * 65},
        {"ok": False, "error": "busy", "limit": 3},
        {"ok": False, "error": "busy", "scope": "everyone"},
        {"ok": False, "error": "busy", "scope": None},
        {"ok": False, "error": "busy", "extra": 1},
        {"ok": 1, "data": b""},
    ],
)
def test_bad_responses_are_remote_errors(message: object) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_response(msgpack.packb(message))


def test_local_misuse_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_request(ChunkRequest("zz", 0, 4096))
    with pytest.raises(LocalProtocolError):
        encode_response(DataResponse(b"x" * (MAX_CHUNK + 1)))
    with pytest.raises(LocalProtocolError):
        encode_response(ErrorResponse("explode"))
    with pytest.raises(LocalProtocolError):
        encode_response(ErrorResponse("busy", "", "blob.x", "galaxy"))
