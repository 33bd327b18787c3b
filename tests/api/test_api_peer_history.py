"""Chat with a model a peer holds whole sends the whole conversation and the sampling."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import openai
import trio
from api_helpers import MODEL

from p2pedge.api import ApiApp, serve_api
from p2pedge.node.api import api_for
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node

HISTORY = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


async def test_history_and_sampling_reach_the_peer(
    tiny: Path, config: Callable[..., NodeConfig]
) -> None:
    async with Node(config("worker", model_dirs=((MODEL, tiny),))) as worker:
        async with Node(config("front", bootstrap=(worker.addrs[0],))) as front:
            await worker.announce()
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_api, ApiApp(api_for(front)))
                c = openai.AsyncOpenAI(
                    base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
                )

                async def on_worker(**kwargs: Any) -> str:
                    async with aclosing(worker.generate(MODEL, **kwargs)) as pieces:
                        return "".join([p async for p in pieces])

                sampled = {"temperature": 0.9, "top_p": 0.8, "seed": 7}
                raw = await c.chat.completions.with_raw_response.create(
                    model=MODEL, messages=HISTORY, max_tokens=8, **sampled
                )
                assert raw.headers["x-p2pedge-route"] == "peer"
                reply = raw.parse()
                whole = await on_worker(messages=HISTORY, max_tokens=8, **sampled)
                last_only = await on_worker(messages=HISTORY[-1:], max_tokens=8, **sampled)
                greedy = await on_worker(messages=HISTORY, max_tokens=8)
                assert len({whole, last_only, greedy}) == 3  # the test can tell them apart
                assert reply.choices[0].message.content == whole
                assert reply.usage is not None and reply.usage.prompt_tokens > 20
                text = await c.completions.create(
                    model=MODEL, prompt="Once upon a time", max_tokens=6, stop=[" the"]
                )
                expected = await on_worker(prompt="Once upon a time", max_tokens=6, stop=[" the"])
                assert text.choices[0].text == expected
                nursery.cancel_scope.cancel()
