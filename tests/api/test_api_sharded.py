"""A model whose blocks two shard servers cover: the API streams it through them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import trio

from p2pedge.api import ApiApp, serve_api
from p2pedge.ids import ModelId
from p2pedge.models.keys import generate_key, public_key_hex
from p2pedge.node.api import api_for
from p2pedge.node.config import NodeConfig, ServeSpec
from p2pedge.node.models import TOKENIZER_FILES
from p2pedge.node.node import Node
from p2pedge.testing.tiny import build_tiny_model

MODEL = ModelId("tiny", "1")
PROMPT = "a tiny prompt"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", seed=5, n_layers=4)


async def test_a_sharded_model_streams_through_the_api(
    model_dir: Path, tmp_path: Path, config: Callable[..., NodeConfig]
) -> None:
    key = generate_key()
    trusted = tmp_path / "publisher.pub"
    trusted.write_text(public_key_hex(key))
    async with Node(config("publisher")) as publisher:
        await publisher.publish(model_dir, str(MODEL), key)
        boot = (publisher.addrs[0],)

        def server(name: str, span: str) -> NodeConfig:
            serve = (ServeSpec.parse(f"{MODEL}:{span}"),)
            return config(name, bootstrap=boot, trusted_publishers=(trusted,), serve=serve)

        async with Node(server("first", "0-2")) as first, Node(server("last", "2-4")) as last:
            await first.announced()
            await last.announced()
            front_config = config("front", bootstrap=boot, trusted_publishers=(trusted,))
            async with Node(front_config) as front, trio.open_nursery() as nursery:
                await front.pull(str(MODEL), files=list(TOKENIZER_FILES))
                port = await nursery.start(serve_api, ApiApp(api_for(front)))
                c = openai.AsyncOpenAI(
                    base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
                )
                listed = {m.id: m.model_extra for m in (await c.models.list()).data}
                assert listed[MODEL.name]["p2pedge"]["where"] == "sharded"  # type: ignore[index]
                raw = await c.completions.with_raw_response.create(
                    model=MODEL.name, prompt=PROMPT, max_tokens=8, stream=True,
                    stream_options={"include_usage": True},
                )  # fmt: skip
                assert raw.headers["x-p2pedge-route"] == "sharded"
                chunks = [chunk async for chunk in raw.parse()]
                direct = await front.complete(
                    MODEL.name, prompt=PROMPT, max_tokens=8, route="sharded"
                )
                nursery.cancel_scope.cancel()
        local = await publisher.complete(MODEL.name, prompt=PROMPT, max_tokens=8, route="local")
    # the text node.complete gives on the same route (the sharded path's decoder shows a
    # random model's stray bytes as U+FFFD where the local one drops them), same tokens
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == direct.text
    assert list(direct.token_ids) == list(local.token_ids)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(local.token_ids)
    assert usage.prompt_tokens == local.prompt_tokens
