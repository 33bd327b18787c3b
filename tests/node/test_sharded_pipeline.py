"""Sharded generation over real libp2p nodes on 127.0.0.1, in one process.

Servers build their shard directories from an imported tiny model, announce the ranges
in their cards; the client picks a route from the cards, and survives a server's death.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from p2pedge.ids import LayerRange
from p2pedge.planning.routes import choose_route
from p2pedge.protocols.pipeline.client import ClientConfig
from p2pedge.protocols.pipeline.serving import (
    open_sharded_session,
    start_pipeline_server,
    swarm_options,
)
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.shard_session import ShardModel, ShardSession
from p2pedge.runtime.text import TextCodec
from p2pedge.testing.tiny import build_tiny_model
from simnet.swarm import Swarm

PROMPT = [5, 17, 42, 99, 100, 101, 7, 8, 9, 250]
MODEL = "tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / MODEL, seed=5, n_layers=6)


def reference(model_dir: Path, n: int) -> list[int]:
    full = ShardModel(model_dir / "model.onnx", RuntimeConfig(intra_op_threads=1)).new_session(64)
    logits, pos, out = full.step(np.array([PROMPT], np.int64), 0), len(PROMPT), []
    while len(out) < n:
        out.append(int(np.argmax(logits)))
        logits = full.step(np.array([[out[-1]]], np.int64), pos)
        pos += 1
    return out


async def test_generation_across_nodes_survives_a_dead_server(
    model_dir: Path, tmp_path: Path
) -> None:
    expected = reference(model_dir, 10)
    runtime = RuntimeConfig(intra_op_threads=1)
    async with Swarm(4, seed=1, measure_compute=False) as swarm:
        client, *servers = swarm.nodes
        ranges = [LayerRange(0, 3), LayerRange(3, 6), LayerRange(3, 6)]
        for i, (node, layers) in enumerate(zip(servers, ranges, strict=True)):
            await start_pipeline_server(
                node, [(MODEL, model_dir, layers)], shards_root=tmp_path / str(i), runtime=runtime
            )
            await node.announce()
        session = await open_sharded_session(
            client, MODEL, config=ClientConfig(max_length=64, chunk=4, step_timeout=10)
        )
        async with session:
            assert [h.layers for h in session.route] == [LayerRange(0, 3), LayerRange(3, 6)]
            assert (client.lanes.opened, client.lanes.fallbacks) == (2, 0)  # both hops on lanes
            tokens = [int(np.argmax(await session.extend(PROMPT)))]
            tokens.append(int(np.argmax(await session.extend([tokens[-1]]))))
            # Kill the server of blocks 3-6 mid-generation: its host closes.
            victim = session.route[1].peer_id
            await swarm.kill(1 + [n.peer_id for n in servers].index(victim))
            while len(tokens) < 10:
                tokens.append(int(np.argmax(await session.extend([tokens[-1]]))))
            assert session.recoveries == 1
            assert session.route[1].peer_id != victim
            assert victim in session.banned()
            assert client.lanes.opened == 3  # the replacement hop is on a lane too
    assert tokens == expected


async def test_node_complete_loads_the_tokenizer_once_off_the_event_loop(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing a tokenizer.json is ~0.2 s of CPU for SmolLM2: the sharded path does it once
    per model directory, in a worker thread, not on the event loop per request."""
    loads: list[tuple[Path, bool]] = []
    real_init = TextCodec.__init__

    def counting_init(self: TextCodec, path: Path) -> None:
        loads.append((Path(path), threading.current_thread() is threading.main_thread()))
        real_init(self, path)

    monkeypatch.setattr(TextCodec, "__init__", counting_init)
    runtime = RuntimeConfig(intra_op_threads=1)
    async with Swarm(3, seed=2, measure_compute=False) as swarm:
        client, *servers = swarm.nodes
        halves = [LayerRange(0, 3), LayerRange(3, 6)]
        for i, (node, layers) in enumerate(zip(servers, halves, strict=True)):
            await start_pipeline_server(
                node, [(MODEL, model_dir, layers)], shards_root=tmp_path / str(i), runtime=runtime
            )
            await node.announce()
        client.models.add_model_dir(MODEL, model_dir)  # its tokenizer; route forced below
        first = await client.complete(MODEL, prompt="hello there", max_tokens=4, route="sharded")
        again = await client.complete(MODEL, prompt="hello there", max_tokens=4, route="sharded")
    assert first.route and first.token_ids == again.token_ids
    assert loads == [(model_dir, False)]  # once, and not on the trio (main) thread


class SlowSession(ShardSession):
    """Fault injection: a real shard session whose steps take ``delay["s"]`` longer (a
    server that is slower than its card says, e.g. busy with other work)."""

    def __init__(self, model: ShardModel, max_length: int, delay: dict[str, float]) -> None:
        super().__init__(model, max_length)
        self.delay = delay

    def step(self, x: np.ndarray, start: int, *, last_only: bool = True) -> np.ndarray:
        time.sleep(self.delay["s"])  # in the server's worker thread
        return super().step(x, start, last_only=last_only)


async def test_route_choice_learns_from_measured_decode_steps(
    model_dir: Path, tmp_path: Path
) -> None:
    """Two servers offer blocks 3-6 with the same card; the one a first session found slow
    is avoided by later sessions (first for the unmeasured one, then with both measured),
    though cards and pings alone would pick it again."""
    runtime = RuntimeConfig(intra_op_threads=1)
    delays: dict[str, dict[str, float]] = {}
    async with Swarm(4, seed=3, measure_compute=False) as swarm:
        client, *servers = swarm.nodes
        ranges = [LayerRange(0, 3), LayerRange(3, 6), LayerRange(3, 6)]
        for i, (node, layers) in enumerate(zip(servers, ranges, strict=True)):
            server = await start_pipeline_server(
                node, [(MODEL, model_dir, layers)], shards_root=tmp_path / str(i), runtime=runtime
            )
            server.costs.inline_budget_s = 0.0  # slow steps must not stall the shared loop
            model = server.shards[(MODEL, layers)]
            delay = delays[node.peer_id] = {"s": 0.0}
            model.new_session = partial(SlowSession, model, delay=delay)  # type: ignore[method-assign]
            await node.announce()
        config = ClientConfig(max_length=64, chunk=4, step_timeout=10, logits_top_k=1)
        first = await open_sharded_session(client, MODEL, config=config)
        async with first:
            route = first.route
            slow_peer = route[1].peer_id
            delays[slow_peer]["s"] = 0.15  # far above a loopback ping and a tiny step
            tokens = [int(np.argmax(await first.extend(PROMPT)))]
            for _ in range(4):
                tokens.append(int(np.argmax(await first.extend([tokens[-1]]))))
        options = await swarm_options(client, MODEL)
        measured = {o.peer_id: o.step_s for o in options if o.layers == LayerRange(3, 6)}
        assert measured[slow_peer] is not None and measured[slow_peer] >= 0.15
        on_cards_alone = [dataclasses.replace(o, step_s=None) for o in options]
        assert choose_route(on_cards_alone, 6) == route  # it would pick the slow one again
        runs = []
        for _ in range(2):  # the other server, unmeasured, then measured as the faster one
            async with await open_sharded_session(client, MODEL, config=config) as later:
                assert later.route[1].peer_id != slow_peer
                again = [int(np.argmax(await later.extend(PROMPT)))]
                for _ in range(4):
                    again.append(int(np.argmax(await later.extend([again[-1]]))))
                runs.append(again)
        options = await swarm_options(client, MODEL)
        assert all(o.step_s is not None for o in options)  # every hop has been measured
    assert runs == [tokens, tokens]
