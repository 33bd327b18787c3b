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
    believed,
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


def test_claimed_compute_is_believed_only_within_bounds() -> None:
    """A card claiming 1e9 GFLOPS is believed to be a few times faster than its peers, so
    a nearby honest server still wins; once step times are measured, they decide."""
    cost = CostModel(gflop_per_block_token=10.0, default_rtt_s=0.01)
    honest = opt("honest", 0, 8, gflops=100.0, rtt=0.001)
    liar = opt("liar", 0, 8, gflops=1e9, rtt=0.75)
    assert peers(choose_route([honest, liar], 8, cost=cost)) == ["honest"]
    believing = CostModel(gflop_per_block_token=10.0, max_gflops=1e12, claim_spread=1e12)
    assert peers(choose_route([honest, liar], 8, cost=believing)) == ["liar"]
    # The bound is relative to what the offers claim: among fast peers a fast one is fast.
    fast = [opt("a", 0, 8, gflops=400.0, rtt=0.001), opt("b", 0, 8, gflops=450.0, rtt=0.01)]
    assert [o.compute_gflops for o in believed([*fast, liar], cost)] == [400.0, 450.0, 3600.0]
    assert route_seconds([Hop("liar", LayerRange(0, 8))], [honest, liar], cost) == pytest.approx(
        0.75 + cost.hop_overhead_s + 8 * 10.0 / (100.0 * cost.claim_spread)
    )
    # A measured decode step replaces the claim altogether.
    measured = [honest, ServerOption("liar", LayerRange(0, 8), 1e9, 0.0, 0.001, step_s=0.002)]
    assert peers(choose_route(measured, 8, cost=cost)) == ["liar"]
    slow_liar = ServerOption("liar", LayerRange(0, 8), 1e9, 0.0, 0.001, step_s=5.0)
    assert peers(choose_route([honest, slow_liar], 8, cost=cost)) == ["honest"]


def test_absolute_ceiling_applies_to_a_lone_offer() -> None:
    cost = CostModel(gflop_per_block_token=10.0)
    lone = opt("lone", 0, 8, gflops=1e9, rtt=0.0)
    assert cost.hop_seconds(lone) == pytest.approx(cost.hop_overhead_s + 8 * 10.0 / cost.max_gflops)
