"""``logprobs`` through the official ``openai`` client against a real node's API."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from api_helpers import MODEL, Serve

from p2pedge.api import ApiApp, serve_api
from p2pedge.api.backend import Piece
from p2pedge.api.logprobs import FLOOR, Logprobs
from p2pedge.node.api import api_for
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.runtime.sampling import Logprob

HI = [{"role": "user", "content": "Hello, how are you?"}]


def client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)


def tokens_generated(app: ApiApp) -> float:
    sample = app.metrics.registry.get_sample_value(
        "p2pedge_tokens_generated_total", {"route": "local"}
    )
    return sample or 0.0


def check_entry(entry: Any) -> None:
    assert entry.logprob <= 0.0 and math.exp(entry.logprob) <= 1.0
    assert entry.bytes == list(entry.token.encode())


async def test_chat_logprobs_whole_and_streamed(serve: Serve) -> None:
    async with serve() as api:
        c = client(api.base_url)
        plain = await c.chat.completions.create(model=MODEL, messages=HI, max_tokens=12)
        reply = await c.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=12, logprobs=True, top_logprobs=3
        )
        stream = await c.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=12, logprobs=True, top_logprobs=3, stream=True
        )
        chunks = [chunk async for chunk in stream]
    choice = reply.choices[0]
    # asking for logprobs changes nothing that is generated
    assert choice.message.content == plain.choices[0].message.content
    assert plain.choices[0].logprobs is None
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert reply.usage is not None and len(content) == reply.usage.completion_tokens
    assert reply.usage == plain.usage and reply.usage.prompt_tokens > 5
    for entry in content:
        check_entry(entry)
        assert len(entry.top_logprobs) == 3
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        for alt in entry.top_logprobs:
            check_entry(alt)
        # greedy: the chosen token is the likeliest alternative
        assert entry.logprob == pytest.approx(values[0], abs=1e-9)
        assert entry.token == entry.top_logprobs[0].token
    # streamed: the same tokens and numbers, spread over the chunks, the text unchanged
    streamed = [
        e
        for ch in chunks
        if ch.choices and ch.choices[0].logprobs
        for e in ch.choices[0].logprobs.content or []
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content


async def test_chat_logprobs_without_alternatives(serve: Serve) -> None:
    async with serve() as api:
        reply = await client(api.base_url).chat.completions.create(
            model=MODEL, messages=HI, max_tokens=5, logprobs=True
        )
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(e.top_logprobs == [] for e in content)


async def test_legacy_completion_logprobs(serve: Serve) -> None:
    async with serve() as api:
        c = client(api.base_url)
        prompt = "The quick brown fox"
        whole = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=2)
        plain = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
        stream = await c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, logprobs=2, stream=True
        )
        chunks = [chunk async for chunk in stream]
    choice = whole.choices[0]
    assert choice.text == plain.choices[0].text and plain.choices[0].logprobs is None
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    assert whole.usage is not None and len(lp.tokens) == whole.usage.completion_tokens
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    offset = 0
    for token, value, top, at in zip(
        lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset, strict=True
    ):
        assert at == offset
        offset += len(token)
        assert value <= 0.0 and 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(value, abs=1e-9)  # greedy
    streamed = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens or []] == lp.tokens
    assert [o for s in streamed for o in s.text_offset or []] == lp.text_offset


BAD = [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),  # alternatives without logprobs
    ("chat", {"logprobs": "yes"}, "logprobs"),
    ("text", {"logprobs": 21}, "logprobs"),
    ("text", {"logprobs": True}, "logprobs"),
    ("text", {"logprobs": 1.5}, "logprobs"),
]


async def test_bad_logprob_values_are_400(serve: Serve) -> None:
    async with serve() as api:
        c = client(api.base_url)
        for path, extra, param in BAD:
            with pytest.raises(openai.BadRequestError) as caught:
                if path == "chat":
                    await c.chat.completions.create(
                        model=MODEL, messages=HI, max_tokens=2, extra_body=extra
                    )
                else:
                    await c.completions.create(
                        model=MODEL, prompt="a", max_tokens=2, extra_body=extra
                    )
            body: Any = caught.value.body
            assert (body["param"], body["type"]) == (param, "invalid_request_error"), extra
        # ``auto`` answers through the orchestrator, which returns text, not logits
        with pytest.raises(openai.BadRequestError) as caught:
            await c.chat.completions.create(model="auto", messages=HI, max_tokens=2, logprobs=True)
        assert "models this node runs itself" in caught.value.message
        assert tokens_generated(api.app) == 0  # ``auto`` would have run here, locally


async def test_a_model_a_peer_runs_refuses_logprobs_before_compute(
    tiny: Path, config: Callable[..., NodeConfig]
) -> None:
    """Only this node's own runtime reads logits: a model that would run on a peer (or on
    a sharded ring, the same check) is a 400 naming logprobs, and nothing runs."""
    holder_cfg = config("holder", model_dirs=((MODEL, tiny),))
    async with Node(holder_cfg) as holder:
        await holder.announced()
        front_cfg = config("front", bootstrap=(holder.addrs[0],))
        async with Node(front_cfg) as front, trio.open_nursery() as nursery:
            app = ApiApp(api_for(front))
            port = await nursery.start(serve_api, app)
            c = client(f"http://127.0.0.1:{port}/v1")
            listed = {m.id: m.model_extra for m in (await c.models.list()).data}
            assert listed[MODEL]["p2pedge"]["where"] == "peer"  # type: ignore[index]
            with pytest.raises(openai.BadRequestError) as caught:
                await c.chat.completions.create(
                    model=MODEL, messages=HI, max_tokens=2, logprobs=True
                )
            nursery.cancel_scope.cancel()
        body: Any = caught.value.body
        assert body["param"] == "logprobs"
        assert "models this node runs itself" in body["message"]
        assert holder.cache.loaded() == []  # the holder never loaded the model


def test_rendering_keeps_json_finite_and_the_likeliest_of_equal_texts() -> None:
    """JSON has no -inf or NaN, and two ids can decode to the same text (e.g. two pieces
    of one character, both ""): legacy's ``{token: logprob}`` keeps the likeliest."""
    alts = (Logprob(7, "é", -0.1), Logprob(8, "", -1.0), Logprob(9, "", -2.0))
    piece = Piece("é", 7, Logprob(7, "é", -0.1), alts)
    worst = Piece("", 9, Logprob(9, "", -math.inf), (Logprob(3, "x", math.nan),))
    chat = Logprobs("chat", True)
    chat.add(piece)
    chat.add(worst)
    content = json.loads(json.dumps(chat.take(), allow_nan=False))["content"]
    assert content[0]["bytes"] == [0xC3, 0xA9] and len(content[0]["top_logprobs"]) == 3
    assert content[1]["logprob"] == FLOOR and content[1]["top_logprobs"][0]["logprob"] == FLOOR
    assert chat.take() == {"content": [], "refusal": None}  # taken once
    legacy = Logprobs("text", True)
    legacy.add(piece)
    legacy.add(worst)
    out = legacy.take()
    assert out is not None
    assert out["top_logprobs"][0] == {"é": -0.1, "": -1.0}
    assert out["text_offset"] == [0, 1] and out["token_logprobs"] == [-0.1, FLOOR]
    assert Logprobs("chat", False).take() is None
