"""Pure encode/decode of blob-protocol messages, with limits checked before use.

Requests: ``{"op": "chunk", "digest": hex64, "index": int, "chunk_size": int}`` or
``{"op": "manifest", "model": "name@version"}``. Responses: ``{"ok": True, "data": bytes}``
or ``{"ok": False, "error": code, "message": str}``, a ``busy`` error also naming the
``limit`` and ``scope`` that refused (optional fields, so older peers still decode it).
Every field is checked at decode: digests are exactly 64 lowercase hex characters, indexes
and sizes are bounded ints, texts are short. Each message is one msgpack map in one
length-prefixed frame; a frame carries at most one chunk (4 MiB) plus a little overhead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from p2pedge.errors import LocalProtocolError, RemoteProtocolError
from p2pedge.ids import ModelId
from p2pedge.wire.framing import FrameDecoder, encode_frame
from p2pedge.wire.messages import pack, require, unpack_map

PROTOCOL_ID = "/p2pedge/blob/1.0.0"
MAX_CHUNK = 4 * 1024 * 1024
MIN_CHUNK = 1024
MAX_DATA = MAX_CHUNK
MAX_REQUEST_FRAME = 1024
MAX_RESPONSE_FRAME = MAX_DATA + 1024
MAX_MESSAGE_TEXT = 200
MAX_INDEX = 1 << 32
ERROR_CODES = frozenset({"not_found", "busy", "bad_request", "internal"})
SCOPES = frozenset({"", "peer", "source", "total"})
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_LIMIT_NAME = re.compile(r"\A[a-z0-9_.]{0,64}\Z")


@dataclass(frozen=True)
class ChunkRequest:
    digest: str
    index: int
    chunk_size: int


@dataclass(frozen=True)
class ManifestRequest:
    model: ModelId


@dataclass(frozen=True)
class DataResponse:
    data: bytes


@dataclass(frozen=True)
class ErrorResponse:
    code: str
    message: str = ""
    limit: str = ""  # for ``busy``: which limit refused, and whose share ran out
    scope: str = ""


Request = ChunkRequest | ManifestRequest
Response = DataResponse | ErrorResponse


def _check_chunk(digest: object, index: object, chunk_size: object) -> ChunkRequest:
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise RemoteProtocolError("digest must be 64 lowercase hex characters")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_INDEX:
        raise RemoteProtocolError(f"chunk index {index!r} out of range")
    if (
        not isinstance(chunk_size, int)
        or isinstance(chunk_size, bool)
        or not MIN_CHUNK <= chunk_size <= MAX_CHUNK
    ):
        raise RemoteProtocolError(f"chunk_size {chunk_size!r} outside [{MIN_CHUNK}, {MAX_CHUNK}]")
    return ChunkRequest(digest, index, chunk_size)


def encode_request(request: Request) -> bytes:
    if isinstance(request, ChunkRequest):
        try:
            _check_chunk(request.digest, request.index, request.chunk_size)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(str(exc)) from exc
        body: dict[str, Any] = {
            "op": "chunk",
            "digest": request.digest,
            "index": request.index,
            "chunk_size": request.chunk_size,
        }
    else:
        body = {"op": "manifest", "model": str(request.model)}
    return pack(body)


def decode_request(payload: bytes) -> Request:
    """One request payload (no frame prefix); ``RemoteProtocolError`` on anything odd."""
    message = unpack_map(payload, MAX_REQUEST_FRAME)
    op = require(message, "op", str)
    if op == "chunk":
        if set(message) != {"op", "digest", "index", "chunk_size"}:
            raise RemoteProtocolError(f"unexpected chunk request fields {sorted(message)}")
        return _check_chunk(message["digest"], message["index"], message["chunk_size"])
    if op == "manifest":
        if set(message) != {"op", "model"}:
            raise RemoteProtocolError(f"unexpected manifest request fields {sorted(message)}")
        try:
            return ManifestRequest(ModelId.parse(require(message, "model", str)))
        except ValueError as exc:
            raise RemoteProtocolError(f"bad model id: {exc}") from exc
    raise RemoteProtocolError(f"unknown op {op!r}")


def encode_response(response: Response) -> bytes:
    if isinstance(response, DataResponse):
        if len(response.data) > MAX_DATA:
            raise LocalProtocolError(f"response data of {len(response.data)} bytes over limit")
        return pack({"ok": True, "data": response.data})
    if response.code not in ERROR_CODES:
        raise LocalProtocolError(f"unknown error code {response.code!r}")
    body: dict[str, Any] = {
        "ok": False,
        "error": response.code,
        "message": response.message[:MAX_MESSAGE_TEXT],
    }
    if response.limit or response.scope:
        if not _LIMIT_NAME.match(response.limit) or response.scope not in SCOPES:
            raise LocalProtocolError(f"bad limit {response.limit!r} / {response.scope!r}")
        body["limit"], body["scope"] = response.limit, response.scope
    return pack(body)


_DATA_HEAD = pack({"ok": True, "data": b""})[:-2]  # the map's keys, before data's bin header


def encode_data_parts(data: bytes) -> tuple[bytes, bytes]:
    """``encode_response(DataResponse(data))`` as (head, data): the same bytes, so a
    sender that writes pieces need not copy a chunk behind a few bytes of msgpack."""
    size = len(data)
    if size > MAX_DATA:
        raise LocalProtocolError(f"response data of {size} bytes over limit")
    if size < 1 << 8:
        head = b"\xc4" + size.to_bytes(1, "big")
    elif size < 1 << 16:
        head = b"\xc5" + size.to_bytes(2, "big")
    else:
        head = b"\xc6" + size.to_bytes(4, "big")
    return _DATA_HEAD + head, data


def decode_response(payload: bytes) -> Response:
    message = unpack_map(payload, MAX_RESPONSE_FRAME)
    ok = message.get("ok")
    if ok is True:
        if set(message) != {"ok", "data"}:
            raise RemoteProtocolError(f"unexpected response fields {sorted(message)}")
        data = require(message, "data", bytes)
        if len(data) > MAX_DATA:
            raise RemoteProtocolError(f"response data of {len(data)} bytes over limit")
        return DataResponse(data)
    if ok is False:
        if not set(message) <= {"ok", "error", "message", "limit", "scope"}:
            raise RemoteProtocolError(f"unexpected error fields {sorted(message)[:8]}")
        code = require(message, "error", str)
        if code not in ERROR_CODES:
            raise RemoteProtocolError(f"unknown error code {code[:40]!r}")
        text = message.get("message", "")
        limit = message.get("limit", "")
        scope = message.get("scope", "")
        if not isinstance(text, str):
            raise RemoteProtocolError("error message must be a string")
        if not isinstance(limit, str) or not _LIMIT_NAME.match(limit):
            raise RemoteProtocolError("error limit must be a short lowercase name")
        if not isinstance(scope, str) or scope not in SCOPES:
            raise RemoteProtocolError(f"unknown error scope {str(scope)[:20]!r}")
        return ErrorResponse(code, text[:MAX_MESSAGE_TEXT], limit, scope)
    raise RemoteProtocolError("response lacks a boolean 'ok'")


def frame(payload: bytes, max_frame: int) -> bytes:
    return encode_frame(payload, max_frame)


class RequestDecoder:
    """Bytes in, whole requests out (frames limited to ``MAX_REQUEST_FRAME``)."""

    def __init__(self) -> None:
        self._frames = FrameDecoder(MAX_REQUEST_FRAME)

    def feed(self, data: bytes) -> list[Request]:
        return [decode_request(p) for p in self._frames.feed(data)]

    @property
    def buffered(self) -> int:
        return self._frames.buffered


class ResponseDecoder:
    """Bytes in, whole responses out (frames limited to ``MAX_RESPONSE_FRAME``)."""

    def __init__(self) -> None:
        self._frames = FrameDecoder(MAX_RESPONSE_FRAME)

    def feed(self, data: bytes) -> list[Response]:
        return [decode_response(p) for p in self._frames.feed(data)]

    @property
    def buffered(self) -> int:
        return self._frames.buffered
