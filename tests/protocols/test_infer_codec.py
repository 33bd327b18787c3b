"""infer/1.0.0 codec: round trips and every limit checked on untrusted input."""

from __future__ import annotations

from typing import Any

import pytest

from p2pedge.errors import Busy, LocalProtocolError, ModelNotCached, RemoteProtocolError
from p2pedge.protocols.infer import codec
from p2pedge.protocols.infer.codec import GenParams, InferLimits, InferRequest, InferResult
from p2pedge.runtime.sampling import MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K

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
        codec.encode_request(request(params=GenParams(max_tokens=LIMITS.max_tokens + 1)), LIMITS)
    with pytest.raises(LocalProtocolError):
        codec.encode_request(request(messages=None, prompt=""), LIMITS)
    with pytest.raises(ValueError):
        GenParams(max_tokens=0)


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
        # each of these killed a node (issue 17) or would fail later, inside genai
        lambda m: m["params"].update(seed=2**31),
        lambda m: m["params"].update(seed=-1),
        lambda m: m["params"].update(top_k=2**40),
        lambda m: m["params"].update(top_k=MAX_TOP_K + 1),
        lambda m: m["params"].update(top_k=-1),
        lambda m: m["params"].update(top_p=0.0),
        lambda m: m["params"].update(top_p=1.01),
        lambda m: m["params"].update(temperature=float("nan")),
        lambda m: m["params"].update(temperature=float("inf")),
        lambda m: m["params"].update(temperature=MAX_TEMPERATURE + 0.01),
        lambda m: m["params"].update(temperature=-0.5),
        lambda m: m["params"].update(stop=[""]),
        lambda m: m["params"].update(stop="\n"),
        lambda m: m["params"].update(stop=["s"] * 9),
        lambda m: m["params"].pop("max_tokens"),
        lambda m: m.update(params=[1, 2]),
        lambda m: m.update(id=-1),
        lambda m: m.update(id=2**63),
        lambda m: m.update(id=True),
        lambda m: m.update(messages=[]),
        lambda m: m.update(messages=[{"role": "user", "content": 5}]),
        lambda m: m.update(messages=[{"role": "u" * 17, "content": "x"}]),
        lambda m: m.update(specialist="s" * 200),
        lambda m: (m.pop("messages"), m.update(prompt="")),
    ],
)
def test_malformed_requests_blame_the_peer(mutate: Any) -> None:
    msg = codec.encode_request(request(), LIMITS)
    mutate(msg)
    with pytest.raises(RemoteProtocolError):
        codec.decode_request(msg, LIMITS)


def test_edges_of_the_shared_ranges_pass() -> None:
    """What OpenAI-style callers send (temperature 2, top_p 1 as ints) decodes."""
    msg = codec.encode_request(request(), LIMITS)
    msg["params"].update(temperature=MAX_TEMPERATURE, top_p=1, top_k=MAX_TOP_K, seed=MAX_SEED)
    params = codec.decode_request(msg, LIMITS).params
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (2.0, 1, 4096, MAX_SEED)
    msg["params"] = {"max_tokens": 3}  # the rest default to the shared defaults: greedy
    assert codec.decode_request(msg, LIMITS).params == GenParams(max_tokens=3)
    assert GenParams().temperature == 0.0


def test_done_round_trip_and_checks() -> None:
    result = InferResult("hi", 3, 1, 0.01, 50.0, "stop", "cpu")
    msg = codec.encode_done(7, result)
    assert codec.decode_done(msg, LIMITS) == result
    for key, bad in (
        ("finish_reason", "exploded"),
        ("prompt_tokens", -1),
        ("ttft_s", "x"),
        ("ttft_s", float("inf")),
        ("tok_per_s", -1.0),
    ):
        broken = dict(msg, **{key: bad})
        with pytest.raises(RemoteProtocolError):
            codec.decode_done(broken, LIMITS)


def test_error_codes_map_to_typed_errors() -> None:
    assert isinstance(codec.error_from("busy", "full"), Busy)
    assert isinstance(codec.error_from("unknown_model", "x", "m@1"), ModelNotCached)
    assert isinstance(codec.error_from("too_large", "x"), LocalProtocolError)
    assert isinstance(codec.error_from("internal", "x"), codec.InferFailed)
    busy = codec.error_from("busy", "full", limit="infer.queue_slots", scope="peer")
    assert isinstance(busy, Busy) and (busy.limit, busy.scope) == ("infer.queue_slots", "peer")
    with pytest.raises(LocalProtocolError):
        codec.encode_error(1, "nope", "x")
    with pytest.raises(LocalProtocolError):
        codec.encode_error(1, "busy", "x", scope="everyone")
    with pytest.raises(RemoteProtocolError):
        codec.decode_error({"code": "nope", "message": ""})
    frame = codec.encode_error(1, "busy", "full", limit="infer.queue_slots", scope="total")
    assert codec.decode_error(frame) == codec.ErrorFrame(
        "busy", "full", "infer.queue_slots", "total"
    )
    assert codec.decode_error(codec.encode_error(1, "internal", "x")).limit == ""


def test_default_limits_keep_one_peer_and_one_address_from_filling_the_queue() -> None:
    limits = InferLimits()
    assert limits.slots_per_peer < limits.slots_per_source < limits.slots_total
    assert limits.max_request_bytes >= 4 * limits.max_prompt_chars  # any UTF-8 prompt fits
    for bad in ({"slots_per_peer": 0}, {"max_active": 0}, {"request_timeout_s": 0.0}):
        with pytest.raises(LocalProtocolError):
            InferLimits(**bad)  # type: ignore[arg-type]
