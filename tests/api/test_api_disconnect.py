"""A client that goes away stops its generation within the token being computed."""

from __future__ import annotations

from typing import Any

import openai
import pytest
import trio
from api_helpers import MODEL, Gated, Serve, wait_until

from p2pedge.testing import real_model_dir

HI = [{"role": "user", "content": "Tell me a long story about a fox."}]


async def test_disconnect_mid_stream_cancels_the_generation(serve: Serve) -> None:
    gated: list[Gated] = []

    def wrap(inner: Any) -> Gated:
        gated.append(Gated(inner))
        return gated[0]

    async with serve(wrap=wrap) as api:
        gate = gated[0]
        c = openai.AsyncOpenAI(base_url=api.base_url, api_key="unused", max_retries=0)
        gate.release(3)
        stream = await c.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=200, stream=True
        )
        await gate.wait_released(3)
        await wait_until(lambda: gate.computed == 4)  # the next token, held at the gate
        await stream.close()  # the client hangs up mid-stream
        with trio.fail_after(10):
            await gate.closed.wait()  # the app closed the generation without more tokens
        assert (gate.computed, gate.released) == (4, 3)  # at most the token in flight
        assert api.app.metrics.registry.get_sample_value("p2pedge_api_disconnects_total") == 1
        await wait_until(lambda: api.node.models.inference.load() == 0.0)  # slot freed
        await wait_until(lambda: api.app.requests.held() == 0)  # and the request's quota
        # and the node serves the next client at once
        gate.release(100)
        reply = await c.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
        assert reply.usage is not None and reply.usage.completion_tokens == 3


async def test_disconnect_while_waiting_for_the_first_token_frees_everything(
    serve: Serve,
) -> None:
    gated: list[Gated] = []

    def wrap(inner: Any) -> Gated:
        gated.append(Gated(inner))
        return gated[0]

    async with serve(wrap=wrap) as api:
        gate = gated[0]
        c = openai.AsyncOpenAI(base_url=api.base_url, api_key="unused", max_retries=0, timeout=30.0)
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                await c.chat.completions.create(model=MODEL, messages=HI, max_tokens=50)

            nursery.start_soon(ask)
            await wait_until(lambda: gate.computed == 1)  # computed, not yet let through
            nursery.cancel_scope.cancel()  # the client gives up (closes its connection)
        with trio.fail_after(10):
            await gate.closed.wait()
        assert gate.released == 0
        await wait_until(lambda: api.app.requests.held() == 0)
        depth = api.app.metrics.registry.get_sample_value("p2pedge_queue_depth")
        assert depth == 0


@pytest.mark.real_model
async def test_disconnect_stops_a_real_generation_long_before_it_would_end(
    serve: Serve, config: Any
) -> None:
    try:
        real = real_model_dir()
    except FileNotFoundError:
        pytest.skip("the real model is not imported (make model)")
    from p2pedge.api import ApiApp, serve_api
    from p2pedge.node.api import api_for
    from p2pedge.node.node import Node

    async with Node(config("real", local_only=True, model_dirs=(("real", real),))) as node:
        app = ApiApp(api_for(node))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_api, app)
            c = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
            )
            stream = await c.chat.completions.create(
                model="real", messages=HI, max_tokens=4000, stream=True
            )
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 5:
                    break
            await stream.close()
            # 4000 tokens would take a minute; the slot is free within a few tokens
            await wait_until(lambda: node.models.inference.load() == 0.0, timeout=5.0)
            made = app.metrics.registry.get_sample_value(
                "p2pedge_tokens_generated_total", {"route": "local"}
            )
            assert made is not None and made < 100, made
            nursery.cancel_scope.cancel()
