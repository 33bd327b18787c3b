"""Decode round the chain (``codec.Ring``) over real libp2p nodes on 127.0.0.1, in one
process: the last server feeds each token to the first, the client only listens; greedy
and sampled tokens equal relaying, end of sequence stops the ring, and a hop that dies or
goes quiet mid-ring is replaced or relayed around with the same tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pedge.ids import LayerRange
from p2pedge.node.node import Node
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.client import ClientConfig
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.protocols.pipeline.sampling import make_sampler
from p2pedge.protocols.pipeline.serving import open_sharded_session
from p2pedge.testing.tiny import build_tiny_model
from simnet.swarm import Swarm
from tests.node.test_sharded_push import MODEL, PROMPT, THIRDS, serve_thirds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / MODEL, seed=5, n_layers=6)


async def stall_then_kill(swarm: Swarm, servers: list[PipelineServer], peer: str) -> None:
    """Fault injection: the server of ``peer`` hangs at its next step; once a step has
    reached it (so the ring is certainly waiting on it), its node is killed."""
    index = [n.peer_id for n in swarm.nodes[1:]].index(peer)
    reached = trio.Event()

    async def stuck(*args: Any) -> Any:
        reached.set()
        await trio.sleep_forever()

    servers[index].run_step = stuck  # type: ignore[method-assign]
    await reached.wait()
    await swarm.kill(1 + index)


@asynccontextmanager
async def ring_swarm(
    model_dir: Path, tmp_path: Path, seed: int, ranges: list[LayerRange] = THIRDS
) -> AsyncIterator[tuple[Swarm, Node, list[PipelineServer]]]:
    """A client (node 0) and one shard server per range, real nodes in one process."""
    async with Swarm(1 + len(ranges), seed=seed, measure_compute=False) as swarm:
        yield swarm, swarm.nodes[0], await serve_thirds(swarm, model_dir, tmp_path, ranges)


def config(**kw: Any) -> ClientConfig:
    return ClientConfig(
        **{"max_length": 64, "chunk": 4, "step_timeout": 10, "logits_top_k": 1} | kw
    )


async def relayed(swarm: Swarm, n: int) -> list[int]:
    """``n`` greedy tokens with the client relaying every step (the reference)."""
    async with await open_sharded_session(swarm.nodes[0], MODEL, config=config(push=False)) as s:
        tokens = await s.generate(PROMPT, n)
        assert s.ring_steps == 0 and s.pushed_steps == 0
    return tokens


async def test_greedy_tokens_go_round_the_ring_and_match_relaying(
    model_dir: Path, tmp_path: Path
) -> None:
    async with ring_swarm(model_dir, tmp_path, 6) as (swarm, client, servers):
        expected = await relayed(swarm, 10)
        async with await open_sharded_session(client, MODEL, config=config()) as ring:
            tokens = await ring.generate(PROMPT, 10)
            # the prefill gives the first token; the other nine came round the ring
            assert ring.ring_steps == 9 and ring.pushed_steps == 0 and ring.recoveries == 0
            assert ring.pushed_chunks == 3  # the 10-token prompt went server to server too
    assert tokens == expected
    # the last server fed eight tokens back to the first; the ninth ended the ring
    assert [s.ring_steps_sent for s in servers] == [0, 0, 8]
    assert [s.steps_pushed_in for s in servers] == [8 + 3, 9 + 3, 9 + 3]


async def test_end_of_sequence_stops_the_ring(model_dir: Path, tmp_path: Path) -> None:
    async with ring_swarm(model_dir, tmp_path, 7) as (swarm, client, servers):
        expected = await relayed(swarm, 10)
        eos = expected[3]
        assert eos not in expected[:3]  # the tiny model's output, checked: a fair end token
        async with await open_sharded_session(client, MODEL, config=config()) as ring:
            tokens = await ring.generate(PROMPT, 10, eos_id=eos)
    assert tokens == expected[:4]
    assert servers[2].ring_steps_sent == 2  # tokens 1 and 2 went back; 3 was the end


async def test_a_server_killed_mid_ring_is_replaced_and_the_ring_resumes(
    model_dir: Path, tmp_path: Path
) -> None:
    ranges = [*THIRDS, LayerRange(2, 4)]  # a spare for the middle blocks
    async with ring_swarm(model_dir, tmp_path, 8, ranges) as (swarm, client, servers):
        expected = await relayed(swarm, 12)
        session = await open_sharded_session(client, MODEL, config=config())
        tokens: list[int] = []
        async with session, aclosing(session.stream(PROMPT, 12)) as stream:
            async for token in stream:
                tokens.append(token)
                if len(tokens) == 4:
                    assert session.ring_steps == 3
                    victim = session.route[1].peer_id
                    await stall_then_kill(swarm, servers, victim)
            assert session.recoveries == 1 and session.route[1].peer_id != victim
            assert session.ring_steps >= 8  # round the new chain after the replacement
            assert session.epoch >= 2  # the broken ring's pushes are refused from here on
    assert tokens == expected


async def test_a_ring_whose_token_never_comes_back_falls_back_to_relaying(
    model_dir: Path, tmp_path: Path
) -> None:
    async with ring_swarm(model_dir, tmp_path, 9) as (swarm, client, servers):
        expected = await relayed(swarm, 6)
        # fault injection: the last server's pushes to the ring's head are lost
        pusher = servers[2].pusher
        assert pusher is not None
        real_push = pusher.push

        async def lose_ring_pushes(
            fwd: tuple[codec.Forward, ...], start: int, y: Any, **kw: Any
        ) -> bool:
            if len(fwd) == len(THIRDS):  # the whole chain: a token going back to the head
                return False
            return await real_push(fwd, start, y, **kw)

        pusher.push = lose_ring_pushes  # type: ignore[method-assign]
        async with await open_sharded_session(client, MODEL, config=config()) as session:
            tokens = await session.generate(PROMPT, 6)
            assert session.ring_steps == 1 and not session.ring_ok
            assert session.recoveries == 0  # nobody was banned: the step was relayed
            assert session.pushed_steps == 4  # the rest went by plain push
    assert tokens == expected


async def test_sampled_tokens_round_a_ring_equal_sampled_relaying(
    model_dir: Path, tmp_path: Path
) -> None:
    """The last server samples with the ring's spec; the draw for each position is fixed
    by the seed, so relaying, a ring, and a ring whose tokens stop coming back (the client
    takes over) all give the same tokens."""
    sampler = make_sampler(temperature=1.3, top_k=0, seed=11, top_p=0.9)
    async with ring_swarm(model_dir, tmp_path, 11) as (_, client, servers):
        # every logit reaches the client when it samples itself (logits_needed is 0)
        relay_config = config(push=False, logits_top_k=0)
        async with await open_sharded_session(client, MODEL, config=relay_config) as relay:
            expected = await relay.generate(PROMPT, 10, sampler=sampler)
        assert len(set(expected)) > 2  # sampled: not the greedy run's tokens over and over
        sampled = config(logits_top_k=0)
        async with await open_sharded_session(client, MODEL, config=sampled) as ring:
            assert await ring.generate(PROMPT, 10, sampler=sampler) == expected
            assert ring.ring_steps == 9
        # fault injection: after two tokens, the last server's pushes to the head are lost
        pusher = servers[2].pusher
        assert pusher is not None
        real_push, sent = pusher.push, []

        async def lose_later_ring_pushes(
            fwd: tuple[codec.Forward, ...], start: int, y: Any, **kw: Any
        ) -> bool:
            if len(fwd) == len(THIRDS):
                sent.append(start)
                if len(sent) > 2:
                    return False
            return await real_push(fwd, start, y, **kw)

        pusher.push = lose_later_ring_pushes  # type: ignore[method-assign]
        async with await open_sharded_session(client, MODEL, config=sampled) as broken:
            assert await broken.generate(PROMPT, 10, sampler=sampler) == expected
            assert broken.ring_steps == 3 and not broken.ring_ok and broken.recoveries == 0


async def test_servers_open_their_push_streams_at_session_open(
    model_dir: Path, tmp_path: Path
) -> None:
    """Told where they will push when the session opens, servers dial during the prefill:
    round the ring every push (the last server's to the first included) reuses that."""
    async with ring_swarm(model_dir, tmp_path, 12) as (swarm, client, servers):
        expected = await relayed(swarm, 8)
        peers = [n.peer_id for n in swarm.nodes[1:]]
        async with await open_sharded_session(client, MODEL, config=config()) as ring:
            assert [h.peer_id for h in ring.route] == peers
            with trio.fail_after(10):
                for server, successor in zip(servers, peers[1:] + peers[:1], strict=True):
                    assert server.pusher is not None
                    await server.pusher.stream_to(successor)
            lanes = [n.lanes.opened for n in swarm.nodes[1:]]
            tokens = await ring.generate(PROMPT, 8)
            assert ring.ring_steps == 7
        assert tokens == expected
        assert [n.lanes.opened for n in swarm.nodes[1:]] == lanes  # no push had to dial
        assert [s.pusher.warmed for s in servers if s.pusher] == [1, 1, 1]


async def test_without_push_servers_are_not_told_where_to_push(
    model_dir: Path, tmp_path: Path
) -> None:
    async with ring_swarm(model_dir, tmp_path, 13) as (swarm, _client, servers):
        await relayed(swarm, 4)
        assert [s.pusher.warmed for s in servers if s.pusher] == [0, 0, 0]
        assert [n.lanes.opened for n in swarm.nodes[1:]] == [0, 0, 0]
