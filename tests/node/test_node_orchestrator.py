"""The orchestrator through the Node API, on a tiny model in local mode and over the swarm."""

from collections.abc import Callable
from pathlib import Path

import pytest

from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.testing import build_tiny_model

MODEL = "smollm2-135m-instruct"  # the catalog's model; a tiny stand-in here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("orch") / "tiny", seed=3)


async def test_ask_routes_by_category_and_explains(
    tiny: Path, config: Callable[..., NodeConfig]
) -> None:
    async with Node(config("solo", local_only=True, model_dirs=((MODEL, tiny),))) as node:
        answer = await node.ask("Translate 'good morning' into French, please.", max_tokens=8)
        assert answer.decision.category == "translate"
        assert answer.decision.where == "local"
        assert answer.decision.reason
        fan = await node.ask_many(
            "Explain what a hash map is.", ["chat", "summarize", "explain-code"], max_tokens=4
        )
        assert [a.decision.category for a in fan.answers] == ["chat", "summarize", "explain-code"]


async def test_map_runs_on_a_peer_that_has_the_model(
    tiny: Path, config: Callable[..., NodeConfig]
) -> None:
    async with Node(config("worker", model_dirs=((MODEL, tiny),))) as worker:
        async with Node(config("caller", bootstrap=(worker.addrs[0],))) as caller:
            await worker.announce()
            answers = await caller.map(
                MODEL, ["one", "two", "three"], max_tokens=3, include_local=False
            )
            assert len(answers) == 3
            assert {a.decision.peer_id for a in answers} == {worker.peer_id}
