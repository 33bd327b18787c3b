"""Round trips for route choice: pinged once, kept a while, a silent peer charged the
timeout. Real nodes over loopback, plus injected slow and failing pings under a mock
clock for the timing rules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing

from p2pedge.ids import LayerRange
from p2pedge.node.config import NodeConfig
from p2pedge.node.latency import PeerLatency
from p2pedge.node.node import Node
from p2pedge.protocols.pipeline.serving import start_pipeline_server
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.testing.tiny import build_tiny_model
from simnet.swarm import Swarm

Config = Callable[..., NodeConfig]


def test_pings_are_concurrent_cached_and_a_silent_peer_costs_the_timeout() -> None:
    delays = {"fast": 0.010, "slow": 0.200, "hung": 60.0}
    calls: list[str] = []

    async def injected_ping(peer: str) -> float:  # fault injection: modeled link delays
        calls.append(peer)
        if peer == "broken":
            raise OSError("connection refused")
        began = trio.current_time()
        await trio.sleep(delays[peer])
        return trio.current_time() - began

    async def scenario() -> None:
        latency = PeerLatency(injected_ping, own_peer="me", timeout_s=0.5, ttl_s=30)
        began = trio.current_time()
        rtts = await latency.rtts(["fast", "slow", "hung", "broken", "me"])
        assert trio.current_time() - began == 0.5  # all at once, bounded by the timeout
        assert rtts == {"fast": 0.010, "slow": 0.200, "hung": 0.5, "broken": 0.5, "me": 0.0}
        assert sorted(calls) == ["broken", "fast", "hung", "slow"]
        await latency.rtts(["fast", "slow"])  # fresh: no new pings
        assert len(calls) == 4
        await trio.sleep(31)
        await latency.rtts(["fast"])  # stale: pinged again
        assert calls[-1] == "fast" and len(calls) == 5

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_real_nodes_measure_each_other_and_routes_see_it(config: Config) -> None:
    async with Node(config("a")) as a, Node(config("b")) as b:
        await b.connect(a.addrs[0])
        rtts = await b.latency.rtts([a.peer_id, b.peer_id])
        assert 0.0 < rtts[a.peer_id] < b.latency.timeout_s
        assert rtts[b.peer_id] == 0.0
        assert b.latency.pings_sent == 1


async def test_a_server_placing_itself_pings_nobody(tmp_path: Path) -> None:
    """Placement weighs the cards' compute only, so starting a server costs no pings."""
    model_dir = build_tiny_model(tmp_path / "tiny", seed=5, n_layers=6)
    runtime = RuntimeConfig(intra_op_threads=1)
    async with Swarm(2, seed=6, measure_compute=False) as swarm:
        first, second = swarm.nodes
        await start_pipeline_server(
            first,
            [("tiny", model_dir, LayerRange(0, 3))],
            shards_root=tmp_path / "a",
            runtime=runtime,
        )
        await first.announce()
        assert first.peer_id in {c.peer_id for c in await second.find_peers(None)}
        server = await start_pipeline_server(
            second,
            [("tiny", model_dir, None)],
            shards_root=tmp_path / "b",
            runtime=runtime,
            n_blocks=3,
        )
        assert [e["end"] - e["start"] for e in server.layers_served()] == [3]
        assert second.latency.pings_sent == 0
