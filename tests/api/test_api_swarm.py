"""A model only a peer holds: listed as ``peer`` and answered there, over real libp2p."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from api_helpers import MODEL

from p2pedge.api import ApiApp, serve_api
from p2pedge.node.api import api_for
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node

HI = [{"role": "user", "content": "What is the capital of France?"}]


async def test_a_peers_model_is_listed_and_runs_on_that_peer(
    tiny: Path, config: Callable[..., NodeConfig]
) -> None:
    async with Node(config("worker", model_dirs=((MODEL, tiny),))) as worker:
        async with Node(config("front", bootstrap=(worker.addrs[0],))) as front:
            await worker.announce()
            app = ApiApp(api_for(front))
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_api, app)
                c = openai.AsyncOpenAI(
                    base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
                )
                models = {m.id: m.model_extra for m in (await c.models.list()).data}
                assert models[MODEL] == {"p2pedge": {"where": "peer", "peers": [worker.peer_id]}}
                raw = await c.chat.completions.with_raw_response.create(
                    model=MODEL, messages=HI, max_tokens=6
                )
                assert raw.headers["x-p2pedge-route"] == "peer"
                assert raw.headers["x-p2pedge-peer"] == worker.peer_id
                async with aclosing(worker.generate(MODEL, messages=HI, max_tokens=6)) as it:
                    expected = "".join([p async for p in it])
                assert raw.parse().choices[0].message.content == expected
                stream = await c.chat.completions.create(
                    model=MODEL, messages=HI, max_tokens=6, stream=True
                )
                text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
                assert text == expected
                nursery.cancel_scope.cancel()


async def test_unknown_models_do_not_turn_requests_into_dht_lookups(
    tiny: Path, config: Callable[..., NodeConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Node(config("worker", model_dirs=((MODEL, tiny),))) as worker:
        async with Node(config("front", bootstrap=(worker.addrs[0],))) as front:
            lookups = 0
            real = front.peers.find_peers

            async def counted(*args: Any, **kwargs: Any) -> Any:
                nonlocal lookups
                lookups += 1
                return await real(*args, **kwargs)

            monkeypatch.setattr(front.peers, "find_peers", counted)
            app = ApiApp(api_for(front, cards_ttl_s=3600))
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_api, app)
                c = openai.AsyncOpenAI(
                    base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
                )
                for _ in range(20):
                    with pytest.raises(openai.NotFoundError):
                        await c.chat.completions.create(model="nope", messages=HI)
                assert lookups == 1  # one fetch of the peers' cards served all twenty
                nursery.cancel_scope.cancel()
