"""``/p2pedge/infer/1.0.0`` messages: encode ours, validate theirs (pure, no IO).

One request per stream. The caller sends ``infer``; the server answers ``accepted`` (with
its queue position) or ``error``, then zero or more ``piece`` frames and one ``done`` or
``error``. Every field from a peer is checked against :class:`InferLimits` before use,
and a broken message is a :class:`RemoteProtocolError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from p2pedge.errors import (
    Busy,
    LocalProtocolError,
    ModelNotCached,
    P2PEdgeError,
    RemoteProtocolError,
)
from p2pedge.wire.messages import require

PROTOCOL_ID = "/p2pedge/infer/1.0.0"
VERSION = 1

ROLES = frozenset({"system", "user", "assistant"})
FINISH_REASONS = frozenset({"stop", "length", "cancelled", "error"})
ERROR_CODES = frozenset(
    {"busy", "too_large", "bad_request", "unknown_model", "internal", "timeout", "cancelled"}
)


@dataclass(frozen=True)
class InferLimits:
    """Upper bounds both sides enforce; a server may choose tighter ones."""

    max_prompt_chars: int = 32_000
    max_messages: int = 64
    max_tokens: int = 2048
    max_model_len: int = 128
    max_stop: int = 8
    max_stop_chars: int = 64
    max_piece_chars: int = 4096
    max_text_chars: int = 64_000
    max_message_chars: int = 1024


@dataclass(frozen=True)
class GenParams:
    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferRequest:
    """Run ``model`` on ``messages`` (chat) or ``prompt`` (raw), exactly one of them."""

    id: int
    model: str
    messages: tuple[tuple[str, str], ...] | None = None
    prompt: str | None = None
    params: GenParams = field(default_factory=GenParams)
    specialist: str = ""

    def prompt_chars(self) -> int:
        if self.messages is not None:
            return sum(len(c) for _, c in self.messages)
        return len(self.prompt or "")

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages or ()]


@dataclass(frozen=True)
class InferResult:
    """The completion as the serving peer measured it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tok_per_s: float
    finish_reason: str
    provider: str


class InferRejected(LocalProtocolError):
    """The server refused our request as malformed or too large (our side's fault)."""


class InferFailed(P2PEdgeError):
    """The server accepted the request but could not complete it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def error_from(code: str, message: str, model: str = "") -> P2PEdgeError:
    """The typed exception a caller raises for a server's ``error`` frame."""
    if code == "busy":
        return Busy(message)
    if code == "unknown_model":
        return ModelNotCached(model or message)
    if code in ("too_large", "bad_request"):
        return InferRejected(f"{code}: {message}")
    return InferFailed(code, message)


def check_request(req: InferRequest, limits: InferLimits) -> None:
    """Raise ``ValueError`` naming the first limit ``req`` breaks."""
    if not req.model or len(req.model) > limits.max_model_len:
        raise ValueError("model name empty or too long")
    if (req.messages is None) == (req.prompt is None):
        raise ValueError("exactly one of messages and prompt")
    if req.messages is not None:
        if not req.messages or len(req.messages) > limits.max_messages:
            raise ValueError(f"1..{limits.max_messages} messages allowed")
        if any(r not in ROLES for r, _ in req.messages):
            raise ValueError("unknown message role")
    if req.prompt_chars() > limits.max_prompt_chars:
        raise OverflowError(f"prompt of {req.prompt_chars()} chars over {limits.max_prompt_chars}")
    p = req.params
    if not 1 <= p.max_tokens <= limits.max_tokens:
        raise ValueError(f"max_tokens must be in 1..{limits.max_tokens}")
    if not 0.0 <= p.temperature <= 2.0 or not 0.0 < p.top_p <= 1.0 or p.top_k < 0:
        raise ValueError("temperature, top_p or top_k out of range")
    if len(p.stop) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in p.stop):
        raise ValueError("too many or too long stop strings")


def encode_request(req: InferRequest, limits: InferLimits | None = None) -> dict[str, Any]:
    try:
        check_request(req, limits or InferLimits())
    except (ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"invalid infer request: {exc}") from exc
    p = req.params
    msg: dict[str, Any] = {
        "t": "infer",
        "v": VERSION,
        "id": req.id,
        "model": req.model,
        "specialist": req.specialist,
        "params": {
            "max_tokens": p.max_tokens,
            "temperature": float(p.temperature),
            "top_p": float(p.top_p),
            "top_k": p.top_k,
            "seed": p.seed,
            "stop": list(p.stop),
        },
    }
    if req.messages is not None:
        msg["messages"] = [{"role": r, "content": c} for r, c in req.messages]
    else:
        msg["prompt"] = req.prompt
    return msg


def _num(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RemoteProtocolError(f"field {name!r} must be a number")
    return float(value)


def _str(msg: dict[str, Any], key: str, limit: int) -> str:
    value: str = require(msg, key, str)
    if len(value) > limit:
        raise RemoteProtocolError(f"field {key!r} longer than {limit}")
    return value


def decode_params(raw: Any, limits: InferLimits) -> GenParams:
    if not isinstance(raw, dict):
        raise RemoteProtocolError("params must be a map")
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RemoteProtocolError("seed must be an int or nil")
    stop = raw.get("stop", [])
    if not isinstance(stop, list) or len(stop) > limits.max_stop:
        raise RemoteProtocolError("stop must be a short list")
    if any(not isinstance(s, str) or len(s) > limits.max_stop_chars for s in stop):
        raise RemoteProtocolError("stop strings must be short strings")
    return GenParams(
        max_tokens=int(require(raw, "max_tokens", int)),
        temperature=_num(raw.get("temperature", 0.7), "temperature"),
        top_p=_num(raw.get("top_p", 1.0), "top_p"),
        top_k=int(require(raw, "top_k", int)) if "top_k" in raw else 0,
        seed=seed,
        stop=tuple(stop),
    )


def decode_request(msg: dict[str, Any], limits: InferLimits) -> InferRequest:
    """Validate a peer's ``infer`` frame. Oversized prompts raise ``OverflowError``.

    Strings are already bounded by the frame limit when unpacked; the prompt limit is
    checked on the total, before anything is tokenised.
    Size problems are kept apart from malformed ones so the server can answer
    ``too_large`` (a legitimate request we will not serve) rather than blame the peer.
    """
    if require(msg, "v", int) != VERSION:
        raise RemoteProtocolError(f"unsupported infer version {msg.get('v')!r}")
    req_id = require(msg, "id", int)
    model = _str(msg, "model", limits.max_model_len)
    specialist = _str(msg, "specialist", limits.max_model_len) if "specialist" in msg else ""
    messages: tuple[tuple[str, str], ...] | None = None
    prompt: str | None = None
    if "messages" in msg:
        raw = require(msg, "messages", list)
        if len(raw) > limits.max_messages:
            raise OverflowError(f"{len(raw)} messages over {limits.max_messages}")
        items = []
        for m in raw:
            if not isinstance(m, dict):
                raise RemoteProtocolError("each message must be a map")
            items.append((_str(m, "role", 16), require(m, "content", str)))
        messages = tuple(items)
    if "prompt" in msg:
        prompt = require(msg, "prompt", str)
    req = InferRequest(
        req_id,
        model,
        messages,
        prompt,
        decode_params(require(msg, "params", dict), limits),
        specialist,
    )
    try:
        check_request(req, limits)
    except OverflowError:
        raise
    except ValueError as exc:
        raise RemoteProtocolError(f"invalid infer request: {exc}") from exc
    return req


def encode_accepted(req_id: int, queue: int) -> dict[str, Any]:
    return {"t": "accepted", "id": req_id, "queue": queue}


def encode_piece(req_id: int, text: str) -> dict[str, Any]:
    return {"t": "piece", "id": req_id, "text": text}


def encode_done(req_id: int, result: InferResult) -> dict[str, Any]:
    return {
        "t": "done",
        "id": req_id,
        "text": result.text,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "ttft_s": float(result.ttft_s),
        "tok_per_s": float(result.tok_per_s),
        "finish_reason": result.finish_reason,
        "provider": result.provider,
    }


def encode_error(req_id: int, code: str, message: str) -> dict[str, Any]:
    if code not in ERROR_CODES:
        raise LocalProtocolError(f"unknown infer error code {code!r}")
    return {"t": "error", "id": req_id, "code": code, "message": message[:1024]}


def decode_done(msg: dict[str, Any], limits: InferLimits) -> InferResult:
    reason = _str(msg, "finish_reason", 16)
    if reason not in FINISH_REASONS:
        raise RemoteProtocolError(f"unknown finish_reason {reason!r}")
    counts = [require(msg, k, int) for k in ("prompt_tokens", "completion_tokens")]
    if any(c < 0 for c in counts):
        raise RemoteProtocolError("token counts must be non-negative")
    return InferResult(
        text=_str(msg, "text", limits.max_text_chars),
        prompt_tokens=counts[0],
        completion_tokens=counts[1],
        ttft_s=_num(msg.get("ttft_s"), "ttft_s"),
        tok_per_s=_num(msg.get("tok_per_s"), "tok_per_s"),
        finish_reason=reason,
        provider=_str(msg, "provider", 128),
    )


def decode_error(msg: dict[str, Any]) -> tuple[str, str]:
    code = _str(msg, "code", 32)
    if code not in ERROR_CODES:
        raise RemoteProtocolError(f"unknown error code {code!r}")
    return code, _str(msg, "message", 1024)
