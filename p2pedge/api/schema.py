"""OpenAI-style request bodies, validated into typed requests; errors in OpenAI's shape.

Pure: no I/O. Every field a client sends is checked here before anything is queued, and
the sampling ranges are the project's one set (:mod:`p2pedge.runtime.sampling`), so a
value the API accepts is one the runtime and the peers accept too. Fields that change
what is computed and are not supported (``n`` > 1, tools, ``echo``) are refused with a
400 rather than silently ignored; harmless ones (``user``, penalties of 0) are ignored.
Log-probabilities come in OpenAI's two spellings: chat's ``logprobs: true`` with
``top_logprobs: N``, and legacy completions' ``logprobs: N``; both land in
:class:`SamplingParams` with the runtime's one range.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from p2pedge.quota import Limit
from p2pedge.runtime.sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_TOP_LOGPROBS,
    SamplingParams,
    check_generation,
    check_logprobs,
    check_sampling,
)

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
MAX_MODEL_CHARS = 256
# Only the local runtime reads logits: a peer's infer answer and a sharded ring's last
# server send tokens only, so a request for another route is refused before any compute.
LOCAL_LOGPROBS = "logprobs are available for models this node runs itself"


@dataclass(frozen=True)
class ApiLimits:
    """What one HTTP client can make the API hold (safe defaults)."""

    max_body_bytes: int = 1 << 20  # a request body, read with this cap before parsing
    max_messages: int = 256
    max_prompt_chars: int = 256 * 1024  # all message contents together, before tokenizing
    max_embedding_inputs: int = 256  # texts in one embeddings request (all within the above)
    # requests running at once, per client address (``peer`` and ``source`` are both the
    # address: HTTP has no peer id) and for the whole server
    requests: Limit = field(default_factory=lambda: Limit(per_peer=32, per_source=32, total=64))
    # a request the node's queue refuses waits this long for a slot before its 503 (the
    # requests above bound how many wait); 0 refuses at once
    queue_wait_s: float = 30.0
    header_s: float = 10.0  # a request head (and an idle keep-alive) must arrive by then
    read_idle_s: float = 10.0  # longest wait for the next piece of a request body
    body_s: float = 30.0  # the whole body, however it trickles in
    retry_after_s: int = 1  # the Retry-After a refusal (429/503) suggests


class ApiError(Exception):
    """An HTTP error with OpenAI's body: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated chat or text completion request."""

    kind: str  # "chat" or "text"
    model: str
    params: SamplingParams
    messages: tuple[Mapping[str, str], ...] | None = None
    prompt: str | None = None
    stream: bool = False
    include_usage: bool = False

    @property
    def text(self) -> str:
        """What an orchestrator classifies: the last user message, or the prompt."""
        if self.prompt is not None:
            return self.prompt
        users = [m["content"] for m in self.messages or () if m["role"] == "user"]
        return users[-1] if users else (self.messages or ({"content": ""},))[-1]["content"]


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # deep nesting: json's decoder recurses per level
        raise bad("the request body nests too deeply") from None
    if not isinstance(data, dict):
        raise bad("the request body must be a JSON object")
    return data


def parse_chat(body: bytes, limits: ApiLimits) -> GenerationRequest:
    data = parse_json(body)
    messages = _messages(data.get("messages"), limits)
    return _request("chat", data, messages=messages)


def parse_completion(body: bytes, limits: ApiLimits) -> GenerationRequest:
    data = parse_json(body)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt must be a non-empty string (one prompt per request)", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise _too_long(len(prompt), limits, "prompt")
    for name in ("echo",):
        if data.get(name):
            raise bad(f"{name} is not supported", name)
    if data.get("suffix") is not None:
        raise bad("suffix is not supported", "suffix")
    if data.get("best_of") not in (None, 1):
        raise bad("best_of must be 1", "best_of")
    return _request("text", data, prompt=prompt)


def _too_long(chars: int, limits: ApiLimits, param: str) -> ApiError:
    return bad(
        f"the prompt is {chars} characters; this server takes at most {limits.max_prompt_chars}",
        param,
        "context_length_exceeded",
    )


def _messages(raw: object, limits: ApiLimits) -> tuple[Mapping[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty list", "messages")
    if len(raw) > limits.max_messages:
        raise bad(f"at most {limits.max_messages} messages, got {len(raw)}", "messages")
    out: list[Mapping[str, str]] = []
    total = 0
    for i, message in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad("each message must be an object with role and content", param)
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"role must be one of {sorted(ROLES)}, got {role!r}", f"{param}.role")
        if message.get("tool_calls") or message.get("function_call"):
            raise bad("tool calls are not supported", param)
        content = _content(message.get("content"), f"{param}.content")
        total += len(content)
        if total > limits.max_prompt_chars:
            raise _too_long(total, limits, "messages")
        # the runtime's templates know no "developer": it is OpenAI's new name for system
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return tuple(out)


def _content(raw: object, param: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        parts = []
        for part in raw:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad("only text content parts are supported", param)
            text = part.get("text")
            if not isinstance(text, str):
                raise bad("a text part needs a string text", param)
            parts.append(text)
        return "".join(parts)
    raise bad("content must be a string or a list of text parts", param)


def _request(
    kind: str,
    data: Mapping[str, Any],
    *,
    messages: tuple[Mapping[str, str], ...] | None = None,
    prompt: str | None = None,
) -> GenerationRequest:
    model = data.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_CHARS:
        raise bad(f"model must be a string of 1..{MAX_MODEL_CHARS} characters", "model")
    if data.get("n") not in (None, 1):
        raise bad("n must be 1: one choice per request", "n")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if data.get(name):
            raise bad(f"{name} is not supported", name)
    response_format = data.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad("only the text response_format is supported", "response_format")
    for name in ("presence_penalty", "frequency_penalty"):
        if data.get(name) not in (None, 0, 0.0):
            raise bad(f"{name} is not supported (only 0)", name)
    stream = data.get("stream", False)
    if not isinstance(stream, bool | None):
        raise bad("stream must be a boolean", "stream")
    options = data.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise bad("stream_options is an object, and only with stream: true", "stream_options")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage must be a boolean", "stream_options")
    return GenerationRequest(
        kind,
        model,
        sampling(data, _logprobs(kind, data)),
        messages=messages,
        prompt=prompt,
        stream=bool(stream),
        include_usage=include_usage,
    )


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated ``/v1/embeddings`` request: one or more non-empty texts."""

    model: str
    inputs: tuple[str, ...]
    encoding_format: str = "float"  # or "base64": little-endian float32 bytes
    dimensions: int | None = None  # must equal the model's own when given


def parse_embeddings(body: bytes, limits: ApiLimits) -> EmbeddingRequest:
    """OpenAI's embeddings body; token-id arrays are refused (this API takes text)."""
    data = parse_json(body)
    model = data.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_CHARS:
        raise bad(f"model must be a string of 1..{MAX_MODEL_CHARS} characters", "model")
    raw = data.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise bad("input must be a non-empty string or a non-empty list of strings", "input")
    if len(texts) > limits.max_embedding_inputs:
        raise bad(f"at most {limits.max_embedding_inputs} inputs, got {len(texts)}", "input")
    total = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise bad("each input must be a string (token arrays are not supported)", "input")
        if not text:
            raise bad(f"input[{i}] is empty", "input")
        total += len(text)
        if total > limits.max_prompt_chars:
            raise _too_long(total, limits, "input")
    encoding = data.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise bad("encoding_format must be 'float' or 'base64'", "encoding_format")
    dimensions = data.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise bad("dimensions must be a positive integer", "dimensions")
    return EmbeddingRequest(model, tuple(texts), encoding or "float", dimensions)


def _or_default(data: Mapping[str, Any], name: str, default: object) -> object:
    value = data.get(name)
    return default if value is None else value


def _logprobs(kind: str, data: Mapping[str, Any]) -> tuple[bool, int]:
    """``(logprobs, top_logprobs)``: chat's boolean and count, or legacy's one count."""
    if kind == "text":
        count = data.get("logprobs")
        if count is None:
            return False, 0
        if isinstance(count, bool) or not isinstance(count, int):
            raise bad(f"logprobs must be an int in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
        try:
            return check_logprobs(True, count)
        except ValueError:
            raise bad(f"logprobs must be an int in [0, {MAX_TOP_LOGPROBS}]", "logprobs") from None
    try:
        return check_logprobs(
            _or_default(data, "logprobs", False), _or_default(data, "top_logprobs", 0)
        )
    except ValueError as exc:
        raise bad(str(exc), str(exc).split(" ", 1)[0]) from None


def sampling(data: Mapping[str, Any], logprobs: tuple[bool, int] = (False, 0)) -> SamplingParams:
    """Sampling parameters from OpenAI's field names, checked by the runtime's ranges.

    A missing temperature is the project's default (greedy), not OpenAI's 1.0: the same
    request then gives the same answer here, through ``node.generate`` and on a peer.
    """
    max_tokens = data.get("max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = _or_default(data, "max_tokens", DEFAULT_MAX_TOKENS), "max_tokens"
    stop = data.get("stop")
    stops: object = [] if stop is None else [stop] if isinstance(stop, str) else stop
    try:
        check_generation(max_tokens, stops)
    except ValueError as exc:
        raise bad(str(exc).replace("max_tokens", param, 1), _param(exc, param)) from None
    try:
        t, p, _, seed = check_sampling(
            _or_default(data, "temperature", DEFAULT_TEMPERATURE),
            _or_default(data, "top_p", DEFAULT_TOP_P),
            0,
            data.get("seed"),
        )
    except ValueError as exc:
        raise bad(str(exc), _param(exc, None)) from None
    assert isinstance(max_tokens, int) and isinstance(stops, Sequence)
    return SamplingParams.make(
        max_tokens=max_tokens, temperature=t, top_p=p, seed=seed, stop=list(stops),
        logprobs=logprobs[0], top_logprobs=logprobs[1],
    )  # fmt: skip


def _param(exc: ValueError, max_tokens_name: str | None) -> str | None:
    """The field a sampling check names first (its messages start with the field)."""
    word = str(exc).split(" ", 1)[0]
    if word == "max_tokens":
        return max_tokens_name or word
    if word in ("temperature", "top_p", "seed"):
        return word
    return "stop" if "stop" in str(exc) else None


def model_json(name: str, where: str, detail: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "p2pedge",
        "p2pedge": {"where": where, **detail},
    }


def not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model {model!r} does not exist on this node or in its swarm",
        param="model",
        code="model_not_found",
    )


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
