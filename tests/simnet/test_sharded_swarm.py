"""Churn soak: six shard servers (two per block range) lose members while generating.

Node 0 is the client; nodes 1-6 serve a tiny 6-block model as ``[0,2) [2,4) [4,6)``, two
replicas each. A seeded schedule kills servers right after chosen tokens of each
generation, never the last live replica of a range, and brings a replacement in for
every killed range between generations. Every generation must finish with exactly the
greedy tokens of the unsplit model. Run twice: the client driving each token (pushed
steps), and greedy tokens going round a ring. A ring runs ahead of the client, so a kill
may come after the ring no longer needs that server: there only the tokens are checked
(a kill that certainly lands mid-ring is in ``tests/node/test_sharded_ring.py``).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import trio

from p2pedge.ids import LayerRange
from p2pedge.node.node import Node
from p2pedge.protocols.pipeline.client import ClientConfig, ShardedSession
from p2pedge.protocols.pipeline.serving import (
    ensure_shard_dir,
    open_sharded_session,
    start_pipeline_server,
)
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.shard_session import ShardModel
from p2pedge.testing.tiny import build_tiny_model
from simnet.swarm import Swarm

pytestmark = pytest.mark.slow

MODEL = "tiny"
RANGES = (LayerRange(0, 2), LayerRange(2, 4), LayerRange(4, 6))
REPLICAS = 2
GENERATIONS = 6
NEW_TOKENS = 12
SEED = 2024
RUNTIME = RuntimeConfig(intra_op_threads=1)
# Bans outlast the whole test, so a killed peer stays banned in the session that saw it.
CLIENT = ClientConfig(max_length=64, chunk=4, step_timeout=20, ban_seconds=600, max_recoveries=32)


@dataclass
class Server:
    index: int  # start order in the swarm, what Swarm.kill takes
    node: Node
    layers: LayerRange
    alive: bool = True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / MODEL, seed=11, n_layers=6)


def reference(model: ShardModel, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of the unsplit model."""
    full = model.new_session(CLIENT.max_length)
    logits, pos = full.step(np.array([prompt], np.int64), 0), len(prompt)
    out: list[int] = []
    while len(out) < n:
        out.append(int(np.argmax(logits)))
        logits = full.step(np.array([[out[-1]]], np.int64), pos)
        pos += 1
    return out


async def serve(node: Node, layers: LayerRange, model_dir: Path, shards: Path) -> None:
    await start_pipeline_server(
        node, [(MODEL, model_dir, layers)], shards_root=shards, runtime=RUNTIME
    )
    await node.announce()


async def generate(
    session: ShardedSession,
    prompt: list[int],
    kills_after: list[int],
    kill: Callable[[], Awaitable[None]],
    *,
    ring: bool,
) -> list[int]:
    """``NEW_TOKENS`` greedy tokens, calling ``kill`` once per entry of ``kills_after``
    equal to the index of the token just produced."""
    tokens: list[int] = []
    if ring:
        async with aclosing(session.stream(prompt, NEW_TOKENS)) as stream:
            async for token in stream:
                tokens.append(token)
                for _ in range(kills_after.count(len(tokens) - 1)):
                    await kill()
        return tokens
    tokens.append(int(np.argmax(await session.extend(prompt))))
    while len(tokens) < NEW_TOKENS:
        for _ in range(kills_after.count(len(tokens) - 1)):
            await kill()
        tokens.append(int(np.argmax(await session.extend([tokens[-1]]))))
    return tokens


@pytest.mark.parametrize("ring", [False, True], ids=["pushed", "ring"])
async def test_generations_survive_random_kills_of_replicated_servers(
    model_dir: Path, tmp_path: Path, ring: bool
) -> None:
    rng = random.Random(SEED)
    full = ShardModel(model_dir / "model.onnx", RUNTIME)
    prompts = [
        [rng.randrange(3, 300) for _ in range(rng.randint(3, 16))] for _ in range(GENERATIONS)
    ]
    expected = [reference(full, prompt, NEW_TOKENS) for prompt in prompts]
    shards = tmp_path / "shards"
    outputs: list[list[int]] = []
    total_recoveries = 0
    route_kills = 0
    async with Swarm(1 + REPLICAS * len(RANGES), seed=SEED, measure_compute=False) as swarm:
        client = swarm.nodes[0]
        servers: list[Server] = []
        for layers in RANGES:  # built once up front, so servers can load them concurrently
            await trio.to_thread.run_sync(ensure_shard_dir, model_dir, layers, shards)
        async with trio.open_nursery() as nursery:
            for i, node in enumerate(swarm.nodes[1:]):
                servers.append(Server(1 + i, node, RANGES[i % len(RANGES)]))
                nursery.start_soon(serve, node, servers[-1].layers, model_dir, shards)
        started = len(servers) + 1

        def live(layers: LayerRange) -> list[Server]:
            return [s for s in servers if s.alive and s.layers == layers]

        async def kill_one(route: set[str]) -> str | None:
            """Kill a random server whose range keeps a live replica; its id if on ``route``.

            Three times in four the victim is drawn from the route, so that most kills
            interrupt the session rather than an idle replica.
            """
            eligible = [s for s in servers if s.alive and len(live(s.layers)) >= 2]
            on_route = [s for s in eligible if s.node.peer_id in route]
            victim = rng.choice(on_route if on_route and rng.random() < 0.75 else eligible)
            # The schedule's rule, checked here: a range never loses its last server.
            assert len(live(victim.layers)) >= 2
            await swarm.kill(victim.index)
            victim.alive = False
            # A stopped in-process node can leave one connection to the client open (no
            # EOF, unlike a dead process); a new stream on it then hangs until the 10 s
            # open deadline. Dropping it keeps later sessions' failed dials fast: they
            # still see the dead peer's card and must recover from it.
            await client.network.disconnect(victim.node.peer_id)
            assert victim.node not in swarm.nodes
            assert all(live(layers) for layers in RANGES)
            return victim.node.peer_id if victim.node.peer_id in route else None

        for generation, prompt in enumerate(prompts):
            # Kill after token k (0-based) for each k drawn; two draws may coincide.
            kills_after = [rng.randrange(NEW_TOKENS - 1) for _ in range(rng.randint(1, 2))]
            killed_on_route: list[str] = []
            config = dataclasses.replace(CLIENT, logits_top_k=1) if ring else CLIENT
            session = await open_sharded_session(client, MODEL, n_layers=6, config=config)

            async def kill() -> None:
                hit = await kill_one({h.peer_id for h in session.route})  # noqa: B023
                if hit is not None:
                    killed_on_route.append(hit)  # noqa: B023

            async with session:
                dead = {s.node.peer_id for s in servers if not s.alive}
                assert not dead & {h.peer_id for h in session.route}
                tokens = await generate(session, prompt, kills_after, kill, ring=ring)
                assert (session.ring_steps > 0) == ring, generation
                route = {h.peer_id for h in session.route}
                assert [h.layers for h in session.route] == list(RANGES)
                if not ring:  # a ring may already be past a server when it is killed
                    assert set(killed_on_route) <= session.banned(), generation
                    assert not route & {s.node.peer_id for s in servers if not s.alive}
                    assert session.recoveries >= len(killed_on_route), generation
                total_recoveries += session.recoveries
                route_kills += len(killed_on_route)
            assert tokens == expected[generation], generation
            outputs.append(tokens)
            if generation == len(prompts) - 1:
                break
            # Replacements: each range back to full strength before the next generation.
            for layers in RANGES:
                while len(live(layers)) < REPLICAS:
                    node = await swarm.add()
                    assert swarm.nodes[-1] is node
                    servers.append(Server(started, node, layers))
                    started += 1
                    await serve(node, layers, model_dir, shards)
    assert outputs == expected
    assert route_kills > 0 and total_recoveries >= (0 if ring else route_kills)
    assert sum(not s.alive for s in servers) >= GENERATIONS
