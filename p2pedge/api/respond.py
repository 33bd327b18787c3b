"""Pieces of an HTTP answer the app builds (pure but for ``Sender``'s ``send``): the
mapping of the project's errors to OpenAI's error shapes, a response's sender, and the
identity and headers of a generation's response."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from p2pedge.api.backend import Routed
from p2pedge.api.schema import ApiError, ApiLimits, GenerationRequest, bad
from p2pedge.api.sse import Shape
from p2pedge.errors import Busy, ModelLoadError, ModelNotCached, P2PEdgeError, PeerUnavailable
from p2pedge.runtime.sampling import PromptTooLong

Send = Callable[[dict[str, Any]], Awaitable[None]]

SSE_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}


def as_api_error(exc: BaseException, limits: ApiLimits) -> ApiError | None:
    """The HTTP error for a failure that happened before any response was sent."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PromptTooLong):
        return bad(str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, ModelNotCached):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, Busy):
        retry = {"retry-after": str(limits.retry_after_s)}
        if exc.scope == "total":
            return ApiError(503, str(exc), type="server_error", code="overloaded", headers=retry)
        return ApiError(
            429, str(exc), type="rate_limit_error", code="rate_limit_exceeded", headers=retry
        )
    if isinstance(exc, PeerUnavailable):
        return ApiError(503, str(exc), type="server_error", code="peer_unavailable")
    if isinstance(exc, ModelLoadError):
        return ApiError(500, str(exc), type="server_error", code="model_load_failed")
    if isinstance(exc, ValueError | P2PEdgeError):
        return bad(str(exc))
    return None


class Sender:
    """``send`` that remembers whether the response has started, and has ended."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.ended = False

    async def start(self, status: int, headers: dict[str, str]) -> None:
        self.started = True
        raw = [(k.encode(), v.encode("latin-1", "replace")) for k, v in headers.items()]
        await self.send({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, data: bytes, more: bool = False) -> None:
        self.ended = not more
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def whole(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        await self.start(status, {**headers, "content-length": str(len(data))})
        await self.body(data)


def new_shape(request: GenerationRequest, model: str | None = None) -> Shape:
    prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
    return Shape(
        request.kind,
        f"{prefix}-{uuid.uuid4().hex}",
        model or request.model,
        int(time.time()),
        request.include_usage,
    )


def route_headers(answer: Routed) -> dict[str, str]:
    headers = {
        "x-p2pedge-route": answer.where,
        "x-p2pedge-specialist": answer.specialist,
        "x-p2pedge-model": answer.model,
    }
    if answer.peer_id:
        headers["x-p2pedge-peer"] = answer.peer_id
    return headers
