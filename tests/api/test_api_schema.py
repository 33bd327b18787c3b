"""Request validation (pure): OpenAI's fields onto the runtime's one set of ranges."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pedge.api.respond import as_api_error
from p2pedge.api.schema import ApiError, ApiLimits, parse_chat, parse_completion
from p2pedge.api.sse import Shape
from p2pedge.errors import Busy, ModelNotCached
from p2pedge.runtime.sampling import MAX_SEED, MAX_TEMPERATURE, PromptTooLong

LIMITS = ApiLimits()
HI = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> Any:
    return parse_chat(json.dumps({"model": "m", "messages": HI, **fields}).encode(), LIMITS)


def refused(**fields: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        chat(**fields)
    assert caught.value.status == 400
    return caught.value


def test_defaults_are_the_projects_not_openais() -> None:
    request = chat()
    assert request.params.greedy and request.params.max_tokens == 256
    assert not request.stream and not request.include_usage


def test_fields_map_onto_sampling_params() -> None:
    request = chat(
        max_tokens=9, temperature=0.5, top_p=0.9, seed=3, stop="END", stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    p = request.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop) == (9, 0.5, 0.9, 3, ("END",))
    assert request.stream and request.include_usage
    assert chat(max_tokens=9, max_completion_tokens=4).params.max_tokens == 4
    assert chat(temperature=None, top_p=None, n=1).params.greedy  # nulls are defaults


def test_ranges_are_the_runtimes() -> None:
    assert chat(temperature=MAX_TEMPERATURE).params.temperature == MAX_TEMPERATURE
    assert refused(temperature=MAX_TEMPERATURE + 0.01).param == "temperature"
    assert chat(seed=MAX_SEED).params.seed == MAX_SEED
    assert refused(seed=MAX_SEED + 1).param == "seed"
    assert refused(max_tokens=True).param == "max_tokens"  # bools are not ints
    assert refused(temperature="1").param == "temperature"
    assert refused(stop=[""]).param == "stop"


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 3},
        {"logprobs": "yes"},
        {"top_logprobs": 1},
        {"tools": [{"type": "function"}]},
        {"response_format": {"type": "json_object"}},
        {"presence_penalty": 0.5},
        {"stream": "yes"},
        {"stream_options": {"include_usage": True}},  # without stream
        {"model": ""},
        {"model": "m" * 300},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"messages": [{"role": "user", "content": "x"}] * 257},
    ],
)
def test_unsupported_or_malformed_fields_are_refused(fields: dict[str, Any]) -> None:
    refused(**fields)


def test_messages_accept_text_parts_and_developer_role() -> None:
    request = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
        ]
    )
    assert request.messages == (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    )
    assert request.text == "ab"


def test_prompt_length_is_capped_before_tokenizing() -> None:
    small = ApiLimits(max_prompt_chars=10)
    with pytest.raises(ApiError) as caught:
        body = {"model": "m", "messages": [{"role": "user", "content": "x" * 11}]}
        parse_chat(json.dumps(body).encode(), small)
    assert caught.value.code == "context_length_exceeded"


def test_completions_take_one_string_prompt() -> None:
    def parse(**fields: Any) -> Any:
        return parse_completion(json.dumps({"model": "m", **fields}).encode(), LIMITS)

    assert parse(prompt=["one"]).prompt == "one"
    bad_fields: list[dict[str, Any]] = [
        {"prompt": ["a", "b"]},
        {"prompt": [1, 2]},
        {"prompt": ""},
        {"prompt": "a", "echo": True},
        {"prompt": "a", "logprobs": 21},
        {"prompt": "a", "best_of": 2},
    ]
    for bad in bad_fields:
        with pytest.raises(ApiError):
            parse(**bad)


@pytest.mark.parametrize(
    "body", [b"", b"{", b"null", b"[]", b'"x"', b"\xff", b"[" * 100_000, b'{"a":' * 50_000]
)
def test_bodies_that_are_not_json_objects_are_400(body: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        parse_chat(body, LIMITS)
    assert caught.value.status == 400 and caught.value.body()["error"]["type"]


def test_node_errors_map_to_openai_statuses() -> None:
    def status(exc: BaseException) -> tuple[int, str | None, str | None]:
        error = as_api_error(exc, LIMITS)
        assert error is not None
        return error.status, error.code, error.headers.get("retry-after")

    assert status(ModelNotCached("m")) == (404, "model_not_found", None)
    assert status(PromptTooLong(300, 256)) == (400, "context_length_exceeded", None)
    assert status(Busy("q", limit="inference.queue", scope="total")) == (503, "overloaded", "1")
    assert status(Busy("q", limit="api.requests", scope="source")) == (
        429, "rate_limit_exceeded", "1",
    )  # fmt: skip
    assert as_api_error(RuntimeError("bug"), LIMITS) is None  # bugs are not dressed up


def test_sse_chunks_are_one_line_events() -> None:
    shape = Shape("chat", "chatcmpl-1", "m", 0, include_usage=True)
    raw = shape.chunk("a\nb") + shape.usage_chunk(3, 1)
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and len(events) == 3
    first, last = (json.loads(e.removeprefix("data: ")) for e in events[:2])
    assert first["choices"][0]["delta"] == {"content": "a\nb"} and first["usage"] is None
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 4


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["chat", "text"]),
    model=st.text(max_size=12),
    include_usage=st.booleans(),
    text=st.text(min_size=1, max_size=12),
)
def test_a_plain_token_event_is_the_whole_objects_encoding(
    kind: str, model: str, include_usage: bool, text: str
) -> None:
    """The per-token fast path (a cached head and tail around the text) writes exactly
    what encoding the whole chunk object writes, whatever the model name holds."""
    shape = Shape(kind, "chatcmpl-1", model, 7, include_usage)
    assert shape.chunk(text) == shape._chunk(text, None)
    assert json.loads(shape.chunk(text).removeprefix(b"data: "))["model"] == model
