"""Compute pacing: a peer (and a source address) past its positions-per-second share
waits; others do not. Virtual time (autojump clock), so the waits are exact."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from p2pedge.ids import LayerRange
from p2pedge.protocols._stream import FramedStream, memory_stream_pair
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.fair import ComputePacer
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.protocols.pipeline.limits import PipelineLimits
from p2pedge.testing.shards import tiny_shards

MODEL = "tiny"
FIRST = LayerRange(0, 2)


def test_the_burst_is_free_then_each_position_costs_one_over_the_rate() -> None:
    pacer = ComputePacer(per_peer=10.0, per_source=100.0, burst=20.0)
    assert pacer.charge("a", "s", 20, now=0.0) == 0.0
    assert pacer.charge("a", "s", 5, now=0.0) == pytest.approx(0.5)
    assert pacer.charge("b", "t", 5, now=0.0) == 0.0  # another peer has its own share
    assert pacer.charge("a", "s", 5, now=10.0) == 0.0  # refilled, capped at the burst


def test_new_peer_ids_on_one_source_share_its_rate() -> None:
    pacer = ComputePacer(per_peer=100.0, per_source=10.0, burst=20.0)
    waits = [pacer.charge(f"sybil{i}", "10.0.0.9", 10, now=0.0) for i in range(4)]
    assert waits == [0.0, 0.0, pytest.approx(1.0), pytest.approx(2.0)]
    assert pacer.charge("other", "10.0.0.8", 10, now=0.0) == 0.0


def test_rates_must_be_positive() -> None:
    with pytest.raises(Exception, match="positive"):
        ComputePacer(per_peer=0.0, per_source=1.0, burst=1.0)


@pytest.fixture(scope="module")
def shards() -> dict[LayerRange, Any]:
    return tiny_shards([(0, 2), (2, 4)], n_layers=4, seed=1)[0]


async def test_a_flooder_past_its_share_waits_while_another_peer_does_not(
    shards: dict[LayerRange, Any], autojump_clock: trio.testing.MockClock
) -> None:
    limits = PipelineLimits(compute_rate_peer=8.0, compute_rate_source=8.0, compute_burst=16.0)
    server = PipelineServer({(MODEL, FIRST): shards[FIRST]}, offload=False, limits=limits)
    async with trio.open_nursery() as nursery:

        async def client(peer: str, source: str) -> tuple[FramedStream, int]:
            ours, theirs = memory_stream_pair()
            nursery.start_soon(server.handle, FramedStream(theirs, source=source), peer)
            stream = FramedStream(ours)
            await stream.send(codec.to_map(codec.Open(1, MODEL, 0, 2, 64)))
            opened = codec.from_map(await stream.receive())
            assert isinstance(opened, codec.Opened)
            return stream, opened.session

        async def step(stream: FramedStream, session: int, start: int, n: int) -> float:
            began = trio.current_time()
            x = np.arange(start, start + n, dtype=np.int64).reshape(1, n) % 50
            await stream.send(codec.to_map(codec.Step(2, session, start, x)))
            assert isinstance(codec.from_map(await stream.receive()), codec.Output)
            return trio.current_time() - began

        flood, flood_session = await client("flooder", "10.0.0.1")
        calm, calm_session = await client("calm", "10.0.0.2")
        assert await step(flood, flood_session, 0, 16) == pytest.approx(0.0)  # the burst
        assert await step(flood, flood_session, 16, 16) == pytest.approx(2.0)  # 16 / 8 per s
        assert await step(calm, calm_session, 0, 16) == pytest.approx(0.0)
        nursery.cancel_scope.cancel()
