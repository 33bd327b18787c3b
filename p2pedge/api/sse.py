"""OpenAI's response objects, whole and as server-sent-event chunks (pure).

A stream is ``data: {json}\\n\\n`` events ending with ``data: [DONE]\\n\\n``; with
``stream_options.include_usage`` every chunk carries ``"usage": null`` and one last chunk
with no choices carries the usage. ``logprobs`` is a choice's rendered log-probabilities
(:mod:`p2pedge.api.logprobs`), null when not asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

DONE = b"data: [DONE]\n\n"
Logprobs = dict[str, Any] | None


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class Shape:
    """One response's identity: chat or text completion, id, model, creation time."""

    kind: str  # "chat" or "text"
    id: str
    model: str
    created: int
    include_usage: bool = False

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(
        self, text: str, finish: str | None, logprobs: Logprobs, *, role: bool = False
    ) -> dict[str, Any]:
        if self.kind == "text":
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text or role:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def chunk(
        self,
        text: str,
        finish: str | None = None,
        *,
        role: bool = False,
        logprobs: Logprobs = None,
    ) -> bytes:
        if text and finish is None and logprobs is None and not role:
            head, tail = self._text_event
            return head + json.dumps(text).encode() + tail
        return self._chunk(text, finish, role=role, logprobs=logprobs)

    def _chunk(
        self, text: str, finish: str | None, *, role: bool = False, logprobs: Logprobs = None
    ) -> bytes:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = self._base(obj)
        body["choices"] = [self._choice(text, finish, logprobs, role=role)]
        if self.include_usage:
            body["usage"] = None
        return event(body)

    @cached_property
    def _text_event(self) -> tuple[bytes, bytes]:
        """A plain token's event around its JSON-encoded text: the same bytes as
        :meth:`_chunk` (a test holds them equal) without encoding the whole object per
        token, which is work on the event loop between decode steps."""
        marker = "\x00"  # the text is the last string in the event: id or model may hold it
        head, _, tail = self._chunk(marker, None).rpartition(json.dumps(marker).encode())
        return head, tail

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = self._base(obj)
        body["choices"] = []
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return event(body)

    def whole(
        self,
        text: str,
        finish: str,
        prompt_tokens: int,
        completion_tokens: int,
        logprobs: Logprobs = None,
    ) -> dict[str, Any]:
        if self.kind == "chat":
            body = self._base("chat.completion")
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": logprobs}
        else:
            body = self._base("text_completion")
            choice = {"index": 0, "text": text, "logprobs": logprobs}
        choice["finish_reason"] = finish
        body["choices"] = [choice]
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body
