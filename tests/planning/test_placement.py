"""Block placement covers the swarm's bottleneck."""

from __future__ import annotations

from p2pedge.ids import LayerRange
from p2pedge.planning.placement import (
    block_throughputs,
    choose_blocks,
    choose_blocks_from_options,
)
from p2pedge.planning.routes import ServerOption


def test_empty_swarm_starts_at_block_zero() -> None:
    p = choose_blocks(30, 10, [])
    assert p.layers == LayerRange(0, 10)
    assert "30 blocks had no server" in p.reason


def test_covers_the_gap() -> None:
    served = [(LayerRange(0, 10), 5.0), (LayerRange(20, 30), 5.0)]
    p = choose_blocks(30, 10, served)
    assert p.layers == LayerRange(10, 20)
    assert "block 10" in p.reason


def test_covers_the_weakest_region() -> None:
    served = [(LayerRange(0, 30), 1.0), (LayerRange(0, 15), 4.0)]
    assert choose_blocks(30, 10, served, my_throughput=2.0).layers.start >= 15


def test_more_blocks_than_model_takes_everything() -> None:
    assert choose_blocks(4, 10, [(LayerRange(0, 4), 1.0)]).layers == LayerRange(0, 4)


def test_block_throughputs_and_cards() -> None:
    assert block_throughputs(4, [(LayerRange(1, 3), 2.0), (LayerRange(2, 4), 1.0)]) == [
        0.0,
        2.0,
        3.0,
        1.0,
    ]
    options = [
        ServerOption("a", LayerRange(0, 6), 10.0),
        ServerOption("b", LayerRange(0, 3), 10.0, load=0.5),
    ]
    p = choose_blocks_from_options(6, 3, options, my_gflops=10.0, gflop_per_block_token=0.1)
    assert p.layers == LayerRange(3, 6)
