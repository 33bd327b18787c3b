"""Route choice (Dijkstra over block boundaries) and card parsing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from p2pedge.ids import LayerRange
from p2pedge.planning.routes import (
    CostModel,
    Hop,
    NoRoute,
    ServerOption,
    choose_route,
    options_from_cards,
    route_seconds,
)


def opt(
    peer: str, a: int, b: int, gflops: float = 10.0, load: float = 0.0, rtt: float | None = None
) -> ServerOption:
    return ServerOption(peer, LayerRange(a, b), gflops, load, rtt)


def peers(route: list[Hop]) -> list[str]:
    return [h.peer_id for h in route]


def test_tiles_exactly_and_prefers_fewer_round_trips() -> None:
    options = [opt("a", 0, 4), opt("b", 4, 8), opt("c", 0, 2), opt("d", 2, 8), opt("e", 0, 8)]
    assert peers(choose_route(options, 8)) == ["e"]
    assert peers(choose_route(options, 8, banned={"e"})) == ["a", "b"]
    assert peers(choose_route(options, 8, banned={"e", "a"})) == ["c", "d"]


def test_compute_and_load_can_outweigh_a_hop() -> None:
    cost = CostModel(gflop_per_block_token=1.0, default_rtt_s=0.01)
    options = [opt("slow", 0, 8, gflops=1.0), opt("a", 0, 4, 100.0), opt("b", 4, 8, 100.0)]
    assert peers(choose_route(options, 8, cost=cost)) == ["a", "b"]
    busy = [opt("a", 0, 4, 100.0, load=0.95), opt("a2", 0, 4, 50.0), opt("b", 4, 8, 100.0)]
    assert peers(choose_route(busy, 8, cost=cost)) == ["a2", "b"]


def test_measured_rtt_is_used() -> None:
    options = [opt("far", 0, 8, rtt=0.5), opt("near", 0, 8, rtt=0.001)]
    route = choose_route(options, 8)
    assert peers(route) == ["near"]
    assert route_seconds(route, options, CostModel()) < 0.02


def test_sub_span_and_determinism() -> None:
    options = [opt("z", 2, 4), opt("y", 2, 4), opt("x", 4, 6), opt("w", 0, 6)]
    assert choose_route(options, 6, start=2) == [
        Hop("y", LayerRange(2, 4)),
        Hop("x", LayerRange(4, 6)),
    ]


def test_no_route() -> None:
    with pytest.raises(NoRoute, match=r"\[0, 8\)"):
        choose_route([opt("a", 0, 3), opt("b", 4, 8)], 8)
    with pytest.raises(ValueError):
        choose_route([], 0)


@dataclass
class Card:
    peer_id: str
    compute_gflops: float = 5.0
    load: float = 0.1
    layers_served: list[dict[str, Any]] = field(default_factory=list)


def test_options_from_cards_skips_junk() -> None:
    cards = [
        Card(
            "p",
            layers_served=[
                {"model": "m", "start": 0, "end": 4},
                {"model": "x", "start": 0, "end": 4},
            ],
        ),
        Card(
            "q",
            layers_served=[
                {"model": "m", "start": 4, "end": 2},
                {"model": "m", "start": "0", "end": 4},
            ],
        ),
    ]
    got = options_from_cards(cards, "m", {"p": 0.02})
    assert got == [ServerOption("p", LayerRange(0, 4), 5.0, 0.1, 0.02)]
