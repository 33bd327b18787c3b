"""A shard server that turns slow mid-session is left for a replica, over real libp2p nodes
on 127.0.0.1 in one process: relayed, pushed and round a ring, with the same tokens."""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pedge.ids import LayerRange
from p2pedge.planning.slowdown import SlowdownPolicy
from p2pedge.protocols.pipeline.client import ClientConfig, ShardedSession
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.protocols.pipeline.serving import open_sharded_session, swarm_options
from p2pedge.testing.tiny import build_tiny_model
from simnet.swarm import Swarm
from tests.node.test_sharded_push import MODEL, PROMPT, serve_thirds

TOKENS = 16
SLOW_AFTER = 6  # tokens before the fault
DELAY_S = 0.1  # per step once slow: far above a tiny model's step and the policy's margin
POLICY = SlowdownPolicy(factor=3.0, min_extra_s=0.02, baseline_steps=3, window=3)
MODES: dict[str, dict[str, Any]] = {
    "relay": {"push": False},
    "push": {"ring": False},
    "ring": {},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / MODEL, seed=5, n_layers=6)


def config(**kw: Any) -> ClientConfig:
    base: dict[str, Any] = {
        "max_length": 64,
        "chunk": 4,
        "step_timeout": 10,
        "logits_top_k": 1,
        "slowdown": POLICY,
    }
    return ClientConfig(**base | kw)


def slow_switch(swarm: Swarm, servers: list[PipelineServer], peer: str) -> dict[str, bool]:
    """Fault injection: once ``switch["on"]``, every step on ``peer``'s server first waits
    ``DELAY_S`` (a server busy with other work), without blocking the shared event loop."""
    server = servers[[n.peer_id for n in swarm.nodes[1:]].index(peer)]
    run_step, switch = server.run_step, {"on": False}

    async def slow_step(*args: Any) -> Any:
        if switch["on"]:
            await trio.sleep(DELAY_S)
        return await run_step(*args)

    server.run_step = slow_step  # type: ignore[method-assign]
    return switch


async def stream_with_fault(session: ShardedSession, switch: dict[str, bool]) -> list[int]:
    tokens: list[int] = []
    async with aclosing(session.stream(PROMPT, TOKENS)) as stream:
        async for token in stream:
            tokens.append(token)
            if len(tokens) == SLOW_AFTER:
                switch["on"] = True
    return tokens


@pytest.mark.parametrize("mode", MODES)
async def test_a_hop_that_slows_down_is_left_for_a_replica(
    model_dir: Path, tmp_path: Path, mode: str
) -> None:
    ranges = [LayerRange(0, 3), LayerRange(3, 6), LayerRange(3, 6)]
    async with Swarm(4, seed=11, measure_compute=False) as swarm:
        servers = await serve_thirds(swarm, model_dir, tmp_path, ranges)
        client = swarm.nodes[0]
        async with await open_sharded_session(client, MODEL, config=config(push=False)) as ref:
            expected = await ref.generate(PROMPT, TOKENS)
        session = await open_sharded_session(client, MODEL, config=config(**MODES[mode]))
        async with session:
            slow_peer = session.route[1].peer_id
            switch = slow_switch(swarm, servers, slow_peer)
            tokens = await stream_with_fault(session, switch)
            assert session.reroutes == 1 and session.recoveries == 0
            assert session.route[1].peer_id != slow_peer
            assert slow_peer not in session.banned()  # slow is not dead: no ban
            if mode == "ring":
                assert session.ring_steps > SLOW_AFTER  # rings before and after the move
        # the slow steps reach route choice (smoothed with the reference run's fast ones),
        # so the next session starts on the other replica
        steps = {o.peer_id: o.step_s for o in await swarm_options(client, MODEL)}
        assert (steps[slow_peer] or 0.0) > DELAY_S / 4
        async with await open_sharded_session(client, MODEL, config=config()) as later:
            assert later.route[1].peer_id != slow_peer
    assert tokens == expected


async def test_a_slow_hop_nobody_else_serves_is_kept(model_dir: Path, tmp_path: Path) -> None:
    async with Swarm(3, seed=12, measure_compute=False) as swarm:
        servers = await serve_thirds(
            swarm, model_dir, tmp_path, [LayerRange(0, 3), LayerRange(3, 6)]
        )
        client = swarm.nodes[0]
        async with await open_sharded_session(client, MODEL, config=config(push=False)) as ref:
            expected = await ref.generate(PROMPT, TOKENS)
        async with await open_sharded_session(client, MODEL, config=config()) as session:
            route = session.route
            switch = slow_switch(swarm, servers, route[1].peer_id)
            tokens = await stream_with_fault(session, switch)
            assert session.reroutes == 0 and session.route == route
            assert session.hops[1].conn.window is None  # judged once, then left alone
    assert tokens == expected


async def test_without_a_policy_the_session_stays_on_its_route(
    model_dir: Path, tmp_path: Path
) -> None:
    ranges = [LayerRange(0, 3), LayerRange(3, 6), LayerRange(3, 6)]
    async with Swarm(4, seed=13, measure_compute=False) as swarm:
        servers = await serve_thirds(swarm, model_dir, tmp_path, ranges)
        session = await open_sharded_session(swarm.nodes[0], MODEL, config=config(slowdown=None))
        async with session:
            route = session.route
            await stream_with_fault(session, slow_switch(swarm, servers, route[1].peer_id))
            assert session.reroutes == 0 and session.route == route
