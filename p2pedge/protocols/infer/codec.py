"""``/p2pedge/infer/1.0.0`` messages: encode ours, validate theirs (pure, no IO).

One request per stream. The caller sends ``infer``; the server answers ``accepted`` (with
its queue position) or ``error``, then zero or more ``piece`` frames and one ``done`` or
``error``. Every field from a peer is checked against :class:`InferLimits` and the
shared sampling ranges (:mod:`p2pedge.runtime.sampling`) at decode, before anything is
queued or computed, and a broken message is a :class:`RemoteProtocolError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from p2pedge.errors import (
    Busy,
    LocalProtocolError,
    ModelNotCached,
    P2PEdgeError,
    RemoteProtocolError,
)
from p2pedge.runtime.sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    check_generation,
    check_sampling,
)
from p2pedge.wire.messages import require

PROTOCOL_ID = "/p2pedge/infer/1.0.0"
VERSION = 1

ROLES = frozenset({"system", "user", "assistant"})
FINISH_REASONS = frozenset({"stop", "length", "cancelled", "error"})
ERROR_CODES = frozenset(
    {"busy", "too_large", "bad_request", "unknown_model", "internal", "timeout", "cancelled"}
)
BUSY_SCOPES = frozenset({"", "peer", "source", "total"})
MAX_REQUEST_ID = (1 << 63) - 1
MAX_ERROR_CHARS = 1024
MAX_LIMIT_NAME = 64


@dataclass(frozen=True)
class InferLimits:
    """The infer protocol's limits: sizes both sides enforce on messages, and the server's
    queue slots (running and waiting requests), charged to the calling peer id, its source
    address and the total (:class:`p2pedge.quota.Quota`, limit ``infer.queue_slots``).

    One peer can hold at most ``slots_per_peer`` of the ``slots_total`` slots and one
    address ``slots_per_source``, so a flood from one machine (however many peer ids it
    mints) leaves room for others. The defaults let one caller fan three specialists out
    to one peer (``ask_many``) and take two sources to fill the node. ``max_request_bytes``
    bounds the request frame before it is read; it covers ``max_prompt_chars`` of 4-byte
    UTF-8 plus the message overhead.
    """

    max_prompt_chars: int = 32_000
    max_messages: int = 64
    max_tokens: int = 2048
    max_model_len: int = 128
    max_stop: int = 8
    max_stop_chars: int = 64
    max_piece_chars: int = 4096
    max_text_chars: int = 64_000
    max_request_bytes: int = 256 * 1024
    max_active: int = 1
    slots_per_peer: int = 3
    slots_per_source: int = 5
    slots_total: int = 9
    request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        sizes = (
            self.max_prompt_chars, self.max_messages, self.max_tokens, self.max_model_len,
            self.max_piece_chars, self.max_text_chars, self.max_request_bytes, self.max_active,
        )  # fmt: skip
        if min(sizes) < 1 or min(self.max_stop, self.max_stop_chars) < 0:
            raise LocalProtocolError(f"infer limits must be positive: {self}")
        if min(self.slots_per_peer, self.slots_per_source, self.slots_total) < 1:
            raise LocalProtocolError(f"infer queue slots must be at least 1: {self}")
        if not self.request_timeout_s > 0:
            raise LocalProtocolError(f"request_timeout_s must be positive: {self}")


@dataclass(frozen=True)
class GenParams:
    """Sampling parameters on the wire; the ranges and defaults are the shared ones
    (:func:`~p2pedge.runtime.sampling.check_sampling`), so a request that decodes here
    never fails validation later in local generation. Out of range: ``ValueError``."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_generation(self.max_tokens, self.stop)
        check_sampling(self.temperature, self.top_p, self.top_k, self.seed)


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


@dataclass(frozen=True)
class ErrorFrame:
    """A server's ``error`` frame; ``limit`` and ``scope`` say which quota refused a busy."""

    code: str
    message: str
    limit: str = ""
    scope: str = ""


class InferRejected(LocalProtocolError):
    """The server refused our request as malformed or too large (our side's fault)."""


class InferFailed(P2PEdgeError):
    """The server accepted the request but could not complete it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def error_from(
    code: str, message: str, model: str = "", *, limit: str = "", scope: str = ""
) -> P2PEdgeError:
    """The typed exception a caller raises for a server's ``error`` frame."""
    if code == "busy":
        return Busy(message, limit=limit, scope=scope)
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
    elif not req.prompt:
        raise ValueError("empty prompt")
    if not 0 <= req.id <= MAX_REQUEST_ID:
        raise ValueError(f"request id must be in [0, {MAX_REQUEST_ID}]")
    if req.prompt_chars() > limits.max_prompt_chars:
        raise OverflowError(f"prompt of {req.prompt_chars()} chars over {limits.max_prompt_chars}")
    # The sampling ranges were checked when GenParams was built; these are this server's.
    p = req.params
    if p.max_tokens > limits.max_tokens:
        raise ValueError(f"max_tokens must be in 1..{limits.max_tokens}")
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
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise RemoteProtocolError(f"field {name!r} must be finite and non-negative")
    return number


def _str(msg: dict[str, Any], key: str, limit: int) -> str:
    value: str = require(msg, key, str)
    if len(value) > limit:
        raise RemoteProtocolError(f"field {key!r} longer than {limit}")
    return value


def decode_params(raw: Any, limits: InferLimits) -> GenParams:
    """A peer's sampling parameters, every field typed and in the shared range."""
    if not isinstance(raw, dict):
        raise RemoteProtocolError("params must be a map")
    stop = raw.get("stop", [])
    if not isinstance(stop, list) or len(stop) > limits.max_stop:
        raise RemoteProtocolError(f"stop must be a list of at most {limits.max_stop}")
    if any(not isinstance(s, str) or len(s) > limits.max_stop_chars for s in stop):
        raise RemoteProtocolError(f"stop strings must be strings of <= {limits.max_stop_chars}")
    try:
        return GenParams(
            max_tokens=raw.get("max_tokens", 0),
            temperature=raw.get("temperature", DEFAULT_TEMPERATURE),
            top_p=raw.get("top_p", DEFAULT_TOP_P),
            top_k=raw.get("top_k", DEFAULT_TOP_K),
            seed=raw.get("seed"),
            stop=tuple(stop),
        )
    except ValueError as exc:
        raise RemoteProtocolError(f"invalid params: {exc}") from exc


def request_id(msg: dict[str, Any]) -> int:
    """The request id a peer's frame carries, in ``[0, MAX_REQUEST_ID]``."""
    value: int = require(msg, "id", int)
    if not 0 <= value <= MAX_REQUEST_ID:
        raise RemoteProtocolError(f"request id {value} outside [0, {MAX_REQUEST_ID}]")
    return value


def decode_request(msg: dict[str, Any], limits: InferLimits) -> InferRequest:
    """Validate a peer's ``infer`` frame. Oversized prompts raise ``OverflowError``.

    Strings are already bounded by the frame limit when unpacked; the prompt limit is
    checked on the total, before anything is tokenised.
    Size problems are kept apart from malformed ones so the server can answer
    ``too_large`` (a legitimate request we will not serve) rather than blame the peer.
    """
    if require(msg, "v", int) != VERSION:
        raise RemoteProtocolError(f"unsupported infer version {msg.get('v')!r}")
    req_id = request_id(msg)
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


def encode_error(
    req_id: int, code: str, message: str, *, limit: str = "", scope: str = ""
) -> dict[str, Any]:
    if code not in ERROR_CODES:
        raise LocalProtocolError(f"unknown infer error code {code!r}")
    if scope not in BUSY_SCOPES:
        raise LocalProtocolError(f"unknown busy scope {scope!r}")
    frame = {"t": "error", "id": req_id, "code": code, "message": message[:MAX_ERROR_CHARS]}
    if limit or scope:
        frame.update(limit=limit[:MAX_LIMIT_NAME], scope=scope)
    return frame


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


def decode_error(msg: dict[str, Any]) -> ErrorFrame:
    code = _str(msg, "code", 32)
    if code not in ERROR_CODES:
        raise RemoteProtocolError(f"unknown error code {code!r}")
    limit = _str(msg, "limit", MAX_LIMIT_NAME) if "limit" in msg else ""
    scope = _str(msg, "scope", 16) if "scope" in msg else ""
    if scope not in BUSY_SCOPES:
        raise RemoteProtocolError(f"unknown busy scope {scope!r}")
    return ErrorFrame(code, _str(msg, "message", MAX_ERROR_CHARS), limit, scope)
