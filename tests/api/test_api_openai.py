"""The official ``openai`` client against a real node's API over loopback."""

from __future__ import annotations

import json
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from api_helpers import MODEL, Gated, Serve, wait_until

from p2pedge.api import ApiLimits
from p2pedge.errors import PeerUnavailable
from p2pedge.ids import ModelId
from p2pedge.node.models import NodeModels
from p2pedge.quota import Limit

HI = [{"role": "user", "content": "Hello, how are you?"}]


def tokens_generated(api: Any) -> float:
    sample = api.app.metrics.registry.get_sample_value(
        "p2pedge_tokens_generated_total", {"route": "local"}
    )
    return sample or 0.0


def client(base_url: str, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, **kwargs)


async def local_answer(api: Any, **kwargs: Any) -> str:
    """The same request through ``node.generate``, for comparison."""
    async with aclosing(api.node.generate(MODEL, **kwargs)) as pieces:
        return "".join([p async for p in pieces])


async def test_async_chat_matches_node_generate_with_usage(serve: Serve) -> None:
    async with serve() as api:
        reply = await client(api.base_url).chat.completions.create(
            model=MODEL, messages=HI, max_tokens=12
        )
        expected = await local_answer(api, messages=HI, max_tokens=12)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].finish_reason in ("length", "stop")
        assert reply.object == "chat.completion" and reply.model == MODEL
        assert reply.usage is not None
        assert 0 < reply.usage.completion_tokens <= 12
        assert reply.usage.prompt_tokens > 5  # the chat template's tokens around the text
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_a_streamed_local_answer_resolves_its_model_once(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding where a model runs resolves its name (in a worker thread); the generation
    reuses that directory instead of resolving the name again on the way to the first
    token."""
    resolved: list[str] = []
    original = NodeModels.resolve

    def counted(self: NodeModels, model: ModelId) -> Path:
        resolved.append(model.name)
        return original(self, model)

    monkeypatch.setattr(NodeModels, "resolve", counted)
    async with serve() as api:
        stream = await client(api.base_url).chat.completions.create(
            model=MODEL, messages=HI, max_tokens=4, stream=True
        )
        assert len([chunk async for chunk in stream]) > 2
        assert resolved == [MODEL]


async def test_sync_client_streams_chat_and_ends_with_usage(serve: Serve) -> None:
    async with serve() as api:

        def run() -> list[Any]:
            sync = openai.OpenAI(base_url=api.base_url, api_key="unused", max_retries=0)
            stream = sync.chat.completions.create(
                model=MODEL, messages=HI, max_tokens=10, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            return list(stream)

        chunks = await trio.to_thread.run_sync(run)
        expected = await local_answer(api, messages=HI, max_tokens=10)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] in ("length", "stop") and set(finishes[:-1]) == {None}
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 10 or finishes[-1] == "stop"
        assert all(c.usage is None for c in chunks[:-1])


async def test_sync_chat_and_async_stream_agree(serve: Serve) -> None:
    async with serve() as api:

        def run() -> str | None:
            sync = openai.OpenAI(base_url=api.base_url, api_key="unused", max_retries=0)
            reply = sync.chat.completions.create(model=MODEL, messages=HI, max_tokens=8)
            return reply.choices[0].message.content

        whole = await trio.to_thread.run_sync(run)
        stream = await client(api.base_url).chat.completions.create(
            model=MODEL, messages=HI, max_tokens=8, stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream]
        assert whole and "".join(pieces) == whole


async def test_text_completions_streaming_and_not(serve: Serve) -> None:
    async with serve() as api:
        c = client(api.base_url)
        prompt = "The quick brown fox"
        whole = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, seed=7)
        expected = await local_answer(api, prompt=prompt, max_tokens=6)
        assert whole.object == "text_completion" and whole.choices[0].text == expected
        assert whole.usage is not None and whole.usage.prompt_tokens > 0
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, stream=True)
        assert "".join([ch.choices[0].text async for ch in stream]) == expected


async def test_sampling_parameters_reach_the_runtime(serve: Serve) -> None:
    async with serve() as api:
        c = client(api.base_url)

        async def sample(seed: int) -> str | None:
            reply = await c.chat.completions.create(
                model=MODEL, messages=HI, max_tokens=12, temperature=1.5, top_p=0.95, seed=seed
            )
            return reply.choices[0].message.content

        a, b, other = await sample(1), await sample(1), await sample(2)
        assert a == b  # the seed reached the sampler
        assert a == await local_answer(
            api, messages=HI, max_tokens=12, temperature=1.5, top_p=0.95, seed=1
        )
        assert other != a
        greedy = await local_answer(api, messages=HI, max_tokens=30)
        stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
        cut = await c.chat.completions.create(
            model=MODEL, messages=HI, max_completion_tokens=30, stop=[stop]
        )
        assert cut.choices[0].message.content == greedy[: greedy.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


async def test_models_list_marks_where_each_runs(serve: Serve) -> None:
    async with serve() as api:
        models = {m.id: m for m in (await client(api.base_url).models.list()).data}
        assert models[MODEL].model_extra["p2pedge"]["where"] == "local"  # type: ignore[index]
        assert models["auto"].model_extra["p2pedge"]["where"] == "auto"  # type: ignore[index]
        assert models["translate"].model_extra["p2pedge"]["category"] == "translate"  # type: ignore[index]
        one = await client(api.base_url).models.retrieve(MODEL)
        assert one.id == MODEL


async def test_auto_routes_through_the_orchestrator_and_says_where(serve: Serve) -> None:
    async with serve() as api:
        raw = await client(api.base_url).chat.completions.with_raw_response.create(
            model="auto",
            messages=[{"role": "user", "content": "Translate 'good morning' into French."}],
            max_tokens=6,
        )
        assert raw.headers["x-p2pedge-route"] == "local"
        assert raw.headers["x-p2pedge-specialist"] == "translate"
        assert raw.headers["x-p2pedge-model"] == MODEL
        reply = raw.parse()
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 6
        stream = await client(api.base_url).chat.completions.create(
            model="translate", messages=HI, max_tokens=4, stream=True
        )
        assert [c async for c in stream][-1].choices[0].finish_reason in ("length", "stop")


# -- errors, one per code ---------------------------------------------------------------


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
    return body


async def test_unknown_model_is_404_model_not_found(serve: Serve) -> None:
    async with serve() as api:
        with pytest.raises(openai.NotFoundError) as caught:
            await client(api.base_url).chat.completions.create(model="nope", messages=HI)
        assert error_of(caught.value)["code"] == "model_not_found"
        assert error_of(caught.value)["param"] == "model"
        with pytest.raises(openai.NotFoundError):
            await client(api.base_url).models.retrieve("nope")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 1 << 20}, "max_completion_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(
    serve: Serve, extra: dict[str, Any], param: str
) -> None:
    async with serve() as api:
        args: dict[str, Any] = {"model": MODEL, "messages": HI, **extra}
        with pytest.raises(openai.BadRequestError) as caught:
            await client(api.base_url).chat.completions.create(**args)
        assert error_of(caught.value)["param"] == param
        assert error_of(caught.value)["type"] == "invalid_request_error"
        assert tokens_generated(api) == 0  # nothing computed


async def test_malformed_json_is_400(serve: Serve) -> None:
    async with serve() as api, httpx.AsyncClient() as http:
        for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
            r = await http.post(f"{api.base_url}/chat/completions", content=body)
            assert r.status_code == 400, body
            assert r.json()["error"]["type"] == "invalid_request_error"
        # and the node still serves a well-formed request afterwards
        r = await http.post(
            f"{api.base_url}/chat/completions",
            json={"model": MODEL, "messages": HI, "max_tokens": 2},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0


async def test_prompt_over_the_context_is_400_before_any_token(serve: Serve) -> None:
    async with serve() as api:
        long = [{"role": "user", "content": "the quick brown fox " * 200}]  # > 256 tokens
        with pytest.raises(openai.BadRequestError) as caught:
            await client(api.base_url).chat.completions.create(
                model=MODEL, messages=long, stream=True
            )
        assert error_of(caught.value)["code"] == "context_length_exceeded"
        assert tokens_generated(api) == 0
        huge = [{"role": "user", "content": "x" * (300 * 1024)}]  # refused before tokenizing
        with pytest.raises(openai.BadRequestError) as caught:
            await client(api.base_url).chat.completions.create(model=MODEL, messages=huge)
        assert error_of(caught.value)["code"] == "context_length_exceeded"


async def test_oversized_body_is_refused_before_parsing(serve: Serve) -> None:
    async with serve(limits=ApiLimits(max_body_bytes=4096)) as api, httpx.AsyncClient() as h:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "y" * 8000}]})
        r = await h.post(f"{api.base_url}/chat/completions", content=body.encode())
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        async def chunked() -> Any:  # no content-length: the cap applies while reading
            for _ in range(8):
                yield b"x" * 1024

        r = await h.post(f"{api.base_url}/chat/completions", content=chunked())
        assert r.status_code == 413


async def test_bearer_key_is_required_when_set(serve: Serve) -> None:
    async with serve(key="s3cret") as api:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client(api.base_url).models.list()
        assert error_of(caught.value)["code"] == "invalid_api_key"
        good = openai.AsyncOpenAI(base_url=api.base_url, api_key="s3cret", max_retries=0)
        assert MODEL in {m.id for m in (await good.models.list()).data}
        async with httpx.AsyncClient() as h:
            assert (await h.get(f"{api.root}/metrics")).status_code == 401


async def test_cors_allows_only_the_configured_origins(serve: Serve) -> None:
    async with serve(cors_origins=["http://ui.example"]) as api, httpx.AsyncClient() as h:
        pre = {"origin": "http://ui.example", "access-control-request-method": "POST"}
        r = await h.options(f"{api.base_url}/chat/completions", headers=pre)
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        r = await h.get(f"{api.base_url}/models", headers={"origin": "http://ui.example"})
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        r = await h.get(f"{api.base_url}/models", headers={"origin": "http://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = await h.options(f"{api.base_url}/models", headers={"origin": "http://evil.example"})
        assert r.status_code == 403


async def test_per_address_quota_is_429_and_full_total_is_503_with_retry_after(
    serve: Serve,
) -> None:
    gated: list[Gated] = []

    def wrap(inner: Any) -> Gated:
        gated.append(Gated(inner))
        return gated[0]

    limits = ApiLimits(requests=Limit(per_peer=1, per_source=1, total=2))
    async with serve(wrap=wrap, limits=limits) as api, trio.open_nursery() as nursery:
        gate = gated[0]
        held: list[Any] = []

        async def hold(address: str) -> None:
            transport = httpx.AsyncHTTPTransport(local_address=address)
            c = client(api.base_url, http_client=httpx.AsyncClient(transport=transport))
            stream = await c.chat.completions.create(
                model=MODEL, messages=HI, max_tokens=3, stream=True
            )
            held.append([ch async for ch in stream])

        nursery.start_soon(hold, "127.0.0.1")
        await wait_until(lambda: api.app.requests.held() == 1)
        with pytest.raises(openai.RateLimitError) as caught:  # same address again
            await client(api.base_url).chat.completions.create(model=MODEL, messages=HI)
        assert caught.value.response.headers["retry-after"] == "1"
        assert error_of(caught.value)["code"] == "rate_limit_exceeded"
        nursery.start_soon(hold, "127.0.0.2")  # another address fits the total
        await wait_until(lambda: api.app.requests.held() == 2)
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.3")
        third = client(api.base_url, http_client=httpx.AsyncClient(transport=transport))
        with pytest.raises(openai.InternalServerError) as over:
            await third.chat.completions.create(model=MODEL, messages=HI)
        assert over.value.status_code == 503
        assert over.value.response.headers["retry-after"] == "1"
        assert api.app.requests.held() == 2  # refusals hold nothing
        gate.release(100)
    assert len(held) == 2  # both held streams finished normally once the gate opened
    assert all(h[-1].choices[0].finish_reason == "length" for h in held)
    assert api.app.requests.held() == 0


async def test_full_node_queue_is_503_with_retry_after_and_drains(serve: Serve) -> None:
    gated: list[Gated] = []

    def wrap(inner: Any) -> Gated:
        gated.append(Gated(inner))
        return gated[0]

    limits = ApiLimits(queue_wait_s=0)  # refuse at once
    async with serve(wrap=wrap, limits=limits) as api, trio.open_nursery() as nursery:
        gate = gated[0]
        inference = api.node.models.inference
        done: list[str | None] = []

        async def one() -> None:
            reply = await client(api.base_url).chat.completions.create(
                model=MODEL, messages=HI, max_tokens=2
            )
            done.append(reply.choices[0].message.content)

        admitted = inference.config.max_active_per_model + inference.config.queue_limit
        for _ in range(admitted):  # as many running as the node runs at once, the rest queued
            nursery.start_soon(one)
        await wait_until(lambda: inference.load() == 1.0)
        with pytest.raises(openai.InternalServerError) as caught:
            await client(api.base_url).chat.completions.create(model=MODEL, messages=HI)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1"
        assert error_of(caught.value)["code"] == "overloaded"
        gate.release(1000)
    assert len(done) == admitted
    assert inference.load() == 0.0


async def test_a_request_past_the_node_queue_waits_for_a_slot(serve: Serve) -> None:
    gated: list[Gated] = []

    def wrap(inner: Any) -> Gated:
        gated.append(Gated(inner))
        return gated[0]

    async with serve(wrap=wrap) as api, trio.open_nursery() as nursery:
        gate = gated[0]
        inference = api.node.models.inference
        done: list[str | None] = []

        async def one() -> None:
            reply = await client(api.base_url).chat.completions.create(
                model=MODEL, messages=HI, max_tokens=2
            )
            done.append(reply.choices[0].message.content)

        admitted = inference.config.max_active_per_model + inference.config.queue_limit
        for _ in range(admitted):
            nursery.start_soon(one)
        await wait_until(lambda: inference.load() == 1.0)
        for _ in range(3):  # refused by the node, held by the API
            nursery.start_soon(one)
        depth = api.app.metrics.registry.get_sample_value
        await wait_until(lambda: depth("p2pedge_queue_depth") == admitted + 3)
        assert inference.load() == 1.0
        gate.release(1000)
    assert len(done) == admitted + 3  # every request answered, none refused
    assert api.app.requests.held() == 0


class FailsMidStream(Gated):
    """The node's stream, breaking after two tokens as a lost shard server would."""

    async def stream(self, target: Any, request: Any, usage: Any = None) -> Any:
        pieces = self.inner.stream(target, request, usage)
        made = 0
        async with aclosing(pieces):  # type: ignore[type-var]
            async for piece in pieces:
                made += 1
                if made > 2:
                    raise PeerUnavailable("shard server 12D3... went away")
                yield piece


async def test_a_failure_mid_stream_ends_the_stream_with_an_error_event(serve: Serve) -> None:
    async with serve(wrap=FailsMidStream) as api:
        stream = await client(api.base_url).chat.completions.create(
            model=MODEL, messages=HI, max_tokens=20, stream=True
        )
        with pytest.raises(openai.APIError, match="went away"):
            async for _ in stream:
                pass
        async with httpx.AsyncClient() as h:  # the raw framing: an error event, then [DONE]
            body = {"model": MODEL, "messages": HI, "max_tokens": 20, "stream": True}
            r = await h.post(f"{api.base_url}/chat/completions", json=body)
        assert r.status_code == 200  # the stream had started
        events = r.text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]
        assert json.loads(events[-3].removeprefix("data: "))["error"]["code"] == "peer_unavailable"
        # the next request is served
        reply = await client(api.base_url).chat.completions.create(
            model=MODEL, messages=HI, max_tokens=2
        )
        assert reply.choices[0].message.content is not None
