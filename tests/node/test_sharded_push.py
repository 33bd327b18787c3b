"""Server-to-server push over real libp2p nodes on 127.0.0.1, in one process: decode
steps go server to server, the tokens match relaying, and a hop that dies or does not
push is recovered or relayed around."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pedge.ids import LayerRange
from p2pedge.protocols.pipeline.client import ClientConfig, ShardedSession
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.protocols.pipeline.serving import open_sharded_session, start_pipeline_server
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.testing.tiny import build_tiny_model
from simnet.swarm import Swarm

PROMPT = [5, 17, 42, 99, 100, 101, 7, 8, 9, 250]
MODEL = "tiny"
THIRDS = [LayerRange(0, 2), LayerRange(2, 4), LayerRange(4, 6)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / MODEL, seed=5, n_layers=6)


async def serve_thirds(
    swarm: Swarm, model_dir: Path, tmp_path: Path, ranges: list[LayerRange]
) -> list[PipelineServer]:
    servers = []
    for i, (node, layers) in enumerate(zip(swarm.nodes[1:], ranges, strict=True)):
        servers.append(
            await start_pipeline_server(
                node,
                [(MODEL, model_dir, layers)],
                shards_root=tmp_path / str(i),
                runtime=RuntimeConfig(intra_op_threads=1),
            )
        )
        await node.announce()
    return servers


async def generate(session: ShardedSession, n: int) -> list[int]:
    tokens = [int(np.argmax(await session.extend(PROMPT)))]
    while len(tokens) < n:
        tokens.append(int(np.argmax(await session.extend([tokens[-1]]))))
    return tokens


def config(**kw: Any) -> ClientConfig:
    return ClientConfig(max_length=64, chunk=4, step_timeout=10, logits_top_k=1, **kw)


async def test_decode_steps_are_pushed_and_match_relaying(model_dir: Path, tmp_path: Path) -> None:
    async with Swarm(4, seed=2, measure_compute=False) as swarm:
        client = swarm.nodes[0]
        servers = await serve_thirds(swarm, model_dir, tmp_path, THIRDS)
        async with await open_sharded_session(client, MODEL, config=config(push=False)) as relay:
            relayed = await generate(relay, 8)
        async with await open_sharded_session(client, MODEL, config=config()) as pushed:
            assert [h.layers for h in pushed.route] == THIRDS
            tokens = await generate(pushed, 8)
            assert pushed.push_ok and pushed.pushed_steps == 7  # every decode step
        assert relay.pushed_steps == 0
    assert tokens == relayed
    # the first server pushes to the second, the second to the third, 7 steps each
    assert [s.pusher.pushed for s in servers if s.pusher] == [7, 7, 0]
    assert [s.steps_pushed_in for s in servers] == [0, 7, 7]


async def test_a_server_killed_while_pushing_is_replaced(model_dir: Path, tmp_path: Path) -> None:
    ranges = [*THIRDS, LayerRange(2, 4)]  # a spare for the middle blocks
    async with Swarm(5, seed=3, measure_compute=False) as swarm:
        client = swarm.nodes[0]
        await serve_thirds(swarm, model_dir, tmp_path, ranges)
        async with await open_sharded_session(client, MODEL, config=config(push=False)) as relay:
            expected = await generate(relay, 10)
        session = await open_sharded_session(client, MODEL, config=config())
        async with session:
            tokens = await generate(session, 4)
            victim = session.route[1].peer_id
            await swarm.kill(1 + [n.peer_id for n in swarm.nodes[1:]].index(victim))
            while len(tokens) < 10:
                tokens.append(int(np.argmax(await session.extend([tokens[-1]]))))
            assert session.recoveries == 1 and session.route[1].peer_id != victim
            assert session.push_ok and session.pushed_steps >= 8  # pushing again after it
    assert tokens == expected


async def test_a_server_that_does_not_push_is_relayed_around(
    model_dir: Path, tmp_path: Path
) -> None:
    async with Swarm(4, seed=4, measure_compute=False) as swarm:
        client = swarm.nodes[0]
        servers = await serve_thirds(swarm, model_dir, tmp_path, THIRDS)
        async with await open_sharded_session(client, MODEL, config=config(push=False)) as relay:
            expected = await generate(relay, 6)
        # fault injection: the first server's pushes go nowhere (its pusher is muted)
        muted = servers[0].pusher
        assert muted is not None

        async def drop(*args: Any, **kwargs: Any) -> bool:
            return False

        muted.push = drop  # type: ignore[method-assign]
        async with await open_sharded_session(client, MODEL, config=config()) as session:
            tokens = await generate(session, 6)
            assert not session.push_ok and session.pushed_steps == 0
            assert session.recoveries == 0  # the step was relayed, not the server banned
    assert tokens == expected


async def test_a_server_holding_consecutive_ranges_is_relayed_not_pushed_to_itself(
    model_dir: Path, tmp_path: Path
) -> None:
    async with Swarm(3, seed=5, measure_compute=False) as swarm:
        client, both, last = swarm.nodes
        await start_pipeline_server(
            both,
            [(MODEL, model_dir, THIRDS[0]), (MODEL, model_dir, THIRDS[1])],
            shards_root=tmp_path / "both",
            runtime=RuntimeConfig(intra_op_threads=1),
        )
        await start_pipeline_server(
            last,
            [(MODEL, model_dir, THIRDS[2])],
            shards_root=tmp_path / "last",
            runtime=RuntimeConfig(intra_op_threads=1),
        )
        for node in (both, last):
            await node.announce()
        async with await open_sharded_session(client, MODEL, config=config(push=False)) as relay:
            expected = await generate(relay, 6)
        async with await open_sharded_session(client, MODEL, config=config()) as session:
            assert [h.peer_id for h in session.route][:2] == [both.peer_id] * 2
            tokens = await generate(session, 6)
            assert session.pushed_steps == 0 and session.push_ok  # never tried, never stalled
    assert tokens == expected
