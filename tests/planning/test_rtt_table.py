"""The RTT table behind route choice: smoothing, expiry, what needs measuring."""

from __future__ import annotations

import pytest

from p2pedge.ids import LayerRange
from p2pedge.planning.latency import RTT_SMOOTHING, RttTable
from p2pedge.planning.routes import CostModel, ServerOption, choose_route


def test_fresh_values_smooth_and_stale_ones_are_measured_again() -> None:
    table = RttTable(ttl_s=10.0)
    assert table.stale(["a", "b", "a"], now=0.0) == ["a", "b"]
    table.record("a", 0.010, now=0.0)
    table.record("a", 0.030, now=1.0)
    assert table.fresh("a", now=1.0) == pytest.approx(0.010 + RTT_SMOOTHING * 0.020)
    assert table.stale(["a", "b"], now=5.0) == ["b"]
    assert table.known(["a", "b"], now=5.0) == {"a": pytest.approx(0.020)}
    assert table.fresh("a", now=11.5) is None  # older than the ttl: measure again
    table.record("a", 0.050, now=12.0)  # a stale value is replaced, not smoothed
    assert table.fresh("a", now=12.0) == 0.050
    table.forget_stale(now=30.0)
    assert table.stale(["a"], now=30.0) == ["a"]
    with pytest.raises(ValueError):
        table.record("a", -1.0, now=0.0)


def test_measured_round_trips_decide_between_equal_offers() -> None:
    offers = [ServerOption("near", LayerRange(0, 4)), ServerOption("far", LayerRange(0, 4))]
    table = RttTable()
    table.record("near", 0.002, now=0.0)
    table.record("far", 0.080, now=0.0)
    rtts = table.known(["near", "far"], now=1.0)
    measured = [ServerOption(o.peer_id, o.layers, rtt_s=rtts[o.peer_id]) for o in offers]
    assert [h.peer_id for h in choose_route(measured, 4, cost=CostModel())] == ["near"]
    # without measurements the tie goes to the name, which is why they are measured
    assert [h.peer_id for h in choose_route(offers, 4, cost=CostModel())] == ["far"]
