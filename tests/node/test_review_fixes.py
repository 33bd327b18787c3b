"""Card load follows queued work; the sharded path samples and validates like the local one."""

from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path

import numpy as np
import pytest
import trio

from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.protocols.pipeline.sampling import make_sampler
from p2pedge.testing import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("review") / "tiny", seed=4)


async def test_card_load_reflects_running_and_queued_requests(
    tiny: Path, config: Callable[..., NodeConfig]
) -> None:
    async with Node(config("busy", local_only=True, model_dirs=(("tiny", tiny),))) as node:
        assert node.card.load == 0.0
        started = trio.Event()
        release = trio.Event()

        async def hold_one_slot() -> None:
            async with aclosing(node.generate("tiny", prompt="hello", max_tokens=50)) as pieces:
                async for _ in pieces:
                    started.set()
                    await release.wait()
                    break

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_one_slot)
            await started.wait()
            node.announcer.refresh()
            busy = node.card.load
            release.set()
        assert 0.0 < busy <= 1.0
        node.announcer.refresh()
        assert node.card.load == 0.0


def test_top_p_samples_only_from_the_nucleus() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    sample = make_sampler(temperature=1.0, seed=0, top_p=0.75)
    picks = {sample(logits, position) for position in range(300)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.75; the tail is never drawn
    wide = make_sampler(temperature=1.0, seed=0, top_p=1.0)
    assert {wide(logits, position) for position in range(300)} == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "bad", [{"temperature": -1.0}, {"top_p": 0.0}, {"max_tokens": 0}, {"top_k": -2}]
)
async def test_sharded_path_refuses_bad_sampling_before_any_peer(
    tiny: Path, config: Callable[..., NodeConfig], bad: dict[str, float]
) -> None:
    async with Node(config("client", model_dirs=(("tiny", tiny),))) as node:
        with pytest.raises(ValueError):
            await node.complete("tiny", prompt="hi", route="sharded", **bad)
