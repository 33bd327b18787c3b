"""infer/1.0.0 codec: round trips and every limit checked on untrusted input."""

from __future__ import annotations

from typing import Any

import pytest

from p2pedge.errors import Busy, LocalProtocolError, ModelNotCached, RemoteProtocolError
from p2pedge.protocols.infer import codec
from p2pedge.protocols.infer.codec import GenParams, InferLimits, InferRequest, InferResult

LIMITS = InferLimits(max_prompt_chars=100, max_messages=3, max_tokens=256)


def request(**kw: Any) -> InferRequest:
    base: dict[str, Any] = {"id": 7, "model": "m@1", "messages": (("user", "hi"),)}
    base.update(kw)
    return InferRequest(**base)


def test_request_round_trip() -> None:
    req = request(params=GenParams(max_tokens=5, temperature=0.1, seed=3, stop=("\n",)))
    assert codec.decode_request(codec.encode_request(req, LIMITS), LIMITS) == req
    raw = request(messages=None, prompt="plain")
    assert codec.decode_request(codec.encode_request(raw, LIMITS), LIMITS) == raw


def test_we_refuse_to_send_a_broken_request() -> None:
    with pytest.raises(LocalProtocolError):
        codec.encode_request(request(prompt="both"), LIMITS)
    with pytest.raises(LocalProtocolError):
        codec.encode_request(request(params=GenParams(max_tokens=0)), LIMITS)


def test_oversized_prompt_is_overflow_not_blame() -> None:
    msg = codec.encode_request(request(), LIMITS)
    msg["messages"] = [{"role": "user", "content": "x" * 101}]
    with pytest.raises(OverflowError):
        codec.decode_request(msg, LIMITS)
    msg["messages"] = [{"role": "user", "content": "x"}] * 4
    with pytest.raises(OverflowError):
        codec.decode_request(msg, LIMITS)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.pop("model"),
        lambda m: m.update(v=2),
        lambda m: m.update(id="7"),
        lambda m: m.update(messages=["not a map"]),
        lambda m: m.update(messages=[{"role": "root", "content": "x"}]),
        lambda m: m["params"].update(max_tokens=10_000),
        lambda m: m["params"].update(max_tokens=True),
        lambda m: m["params"].update(temperature="hot"),
        lambda m: m["params"].update(stop=["x" * 100]),
        lambda m: m["params"].update(seed=1.5),
        lambda m: m.update(prompt="and a prompt"),
        lambda m: m.update(model="x" * 200),
    ],
)
def test_malformed_requests_blame_the_peer(mutate: Any) -> None:
    msg = codec.encode_request(request(), LIMITS)
    mutate(msg)
    with pytest.raises(RemoteProtocolError):
        codec.decode_request(msg, LIMITS)


def test_done_round_trip_and_checks() -> None:
    result = InferResult("hi", 3, 1, 0.01, 50.0, "stop", "cpu")
    msg = codec.encode_done(7, result)
    assert codec.decode_done(msg, LIMITS) == result
    for key, bad in (("finish_reason", "exploded"), ("prompt_tokens", -1), ("ttft_s", "x")):
        broken = dict(msg, **{key: bad})
        with pytest.raises(RemoteProtocolError):
            codec.decode_done(broken, LIMITS)


def test_error_codes_map_to_typed_errors() -> None:
    assert isinstance(codec.error_from("busy", "full"), Busy)
    assert isinstance(codec.error_from("unknown_model", "x", "m@1"), ModelNotCached)
    assert isinstance(codec.error_from("too_large", "x"), LocalProtocolError)
    assert isinstance(codec.error_from("internal", "x"), codec.InferFailed)
    with pytest.raises(LocalProtocolError):
        codec.encode_error(1, "nope", "x")
    with pytest.raises(RemoteProtocolError):
        codec.decode_error({"code": "nope", "message": ""})
