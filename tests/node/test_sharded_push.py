"""Server-to-server push over real libp2p nodes on 127.0.0.1, in one process: decode
steps go server to server, the tokens match relaying, and a hop that dies or does not
push is recovered or relayed around."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

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
            assert pushed.pushed_chunks == 3  # and the 10-token prompt, in chunks of 4
        assert relay.pushed_steps == 0 and relay.pushed_chunks == 0
    assert tokens == relayed
    # the first server pushes to the second, the second to the third: 3 chunks, 7 steps;
    # the client sent the first server the prompt's chunks as pushes into its session
    assert [s.pusher.pushed for s in servers if s.pusher] == [10, 10, 0]
    assert [s.steps_pushed_in for s in servers] == [3, 10, 10]


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
            assert not session.push_ok and session.pushed_steps == session.pushed_chunks == 0
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


def _record_steps(server: PipelineServer, calls: list[tuple[int, int]]) -> None:
    """Fault-free instrumentation: note each step's start and positions as it begins."""
    run_step = server.run_step

    async def noted(session: Any, action: Any) -> Any:
        calls.append((action.start, int(action.x.shape[1])))
        return await run_step(session, action)

    server.run_step = noted  # type: ignore[method-assign]


async def test_a_pushed_prompt_gives_the_relayed_hidden_states(
    model_dir: Path, tmp_path: Path
) -> None:
    async with Swarm(4, seed=6, measure_compute=False) as swarm:
        client = swarm.nodes[0]
        servers = await serve_thirds(swarm, model_dir, tmp_path, THIRDS)
        calls: list[list[tuple[int, int]]] = [[], [], []]
        async with await open_sharded_session(client, MODEL, config=config(push=False)) as relay:
            relayed = await relay.extend(PROMPT)
            relayed_hidden = [b.read(0, len(PROMPT)).copy() for b in relay.boundaries[1:3]]
        for server, noted in zip(servers, calls, strict=True):
            _record_steps(server, noted)
        async with await open_sharded_session(client, MODEL, config=config()) as pushed:
            logits = await pushed.extend(PROMPT)
            assert pushed.pushed_chunks == 3 and pushed.push_ok
            hidden = [b.read(0, len(PROMPT)) for b in pushed.boundaries[1:3]]
    assert np.array_equal(logits, relayed)
    for ours, theirs in zip(hidden, relayed_hidden, strict=True):
        assert np.array_equal(ours, theirs)
    assert calls == [[(0, 4), (4, 4), (8, 2)]] * 3  # every server ran each chunk once
    assert [s.steps_pushed_in for s in servers] == [3, 3, 3]


async def test_prompt_chunks_keep_several_servers_busy_at_once(
    model_dir: Path, tmp_path: Path
) -> None:
    """The second server holds its first chunk until the first server has begun the
    third: that only finishes if the first server gets more chunks while the second one
    still works, as in a pipeline (chunk by chunk through the whole chain would hang)."""
    async with Swarm(4, seed=7, measure_compute=False) as swarm:
        client = swarm.nodes[0]
        servers = await serve_thirds(swarm, model_dir, tmp_path, THIRDS)
        third_chunk_began = trio.Event()
        first_calls: list[tuple[int, int]] = []
        _record_steps(servers[0], first_calls)
        run_first, run_second = servers[0].run_step, servers[1].run_step

        async def first(session: Any, action: Any) -> Any:
            if action.start == 8:
                third_chunk_began.set()
            return await run_first(session, action)

        async def second(session: Any, action: Any) -> Any:
            if action.start == 0:  # fault injection: hold the first chunk
                await third_chunk_began.wait()
            return await run_second(session, action)

        servers[0].run_step, servers[1].run_step = first, second  # type: ignore[method-assign]
        async with await open_sharded_session(client, MODEL, config=config()) as session:
            with trio.fail_after(20):
                await session.extend(PROMPT)
            assert session.pushed_chunks == 3 and session.push_ok
        assert third_chunk_began.is_set()


async def test_a_server_killed_mid_prompt_is_replaced_with_the_same_tokens(
    model_dir: Path, tmp_path: Path
) -> None:
    ranges = [*THIRDS, LayerRange(2, 4)]  # a spare for the middle blocks
    async with Swarm(5, seed=8, measure_compute=False) as swarm:
        client = swarm.nodes[0]
        servers = await serve_thirds(swarm, model_dir, tmp_path, ranges)
        async with await open_sharded_session(client, MODEL, config=config(push=False)) as relay:
            expected = await generate(relay, 6)
        session = await open_sharded_session(client, MODEL, config=config())
        victim = session.route[1].peer_id
        index = [n.peer_id for n in swarm.nodes[1:]].index(victim)
        reached = trio.Event()
        run_step = servers[index].run_step

        async def stall_at_second_chunk(sess: Any, action: Any) -> Any:
            if action.start == 4:  # fault injection: hang here, then the node is killed
                reached.set()
                await trio.sleep_forever()
            return await run_step(sess, action)

        servers[index].run_step = stall_at_second_chunk  # type: ignore[method-assign]

        async def kill_when_stalled() -> None:
            await reached.wait()
            await swarm.kill(1 + index)

        async with session, trio.open_nursery() as nursery:
            nursery.start_soon(kill_when_stalled)
            tokens = await generate(session, 6)
            assert session.recoveries == 1 and session.route[1].peer_id != victim
            assert victim in session.banned()
    assert tokens == expected
