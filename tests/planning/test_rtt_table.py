"""The RTT table behind route choice: smoothing, expiry, what needs measuring."""

from __future__ import annotations

import pytest

from p2pedge.ids import LayerRange
from p2pedge.planning.latency import RTT_SMOOTHING, RttTable, StepTimes
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


def test_step_times_are_per_server_model_and_blocks_and_expire() -> None:
    times = StepTimes(ttl_s=100.0)
    times.record("a", "m", 0, 10, 0.020, now=0.0)
    times.record("a", "m", 0, 10, 0.040, now=1.0)
    assert times.fresh("a", "m", 0, 10, now=2.0) == pytest.approx(0.020 + RTT_SMOOTHING * 0.020)
    assert times.fresh("a", "m", 10, 20, now=2.0) is None  # other blocks
    assert times.fresh("a", "other", 0, 10, now=2.0) is None  # other model
    assert times.fresh("b", "m", 0, 10, now=2.0) is None  # other server
    assert times.fresh("a", "m", 0, 10, now=102.0) is None  # stale


def test_a_measured_decode_step_outweighs_the_estimate() -> None:
    """Two servers whose cards and pings look alike: the one our sessions saw slow loses;
    prefill (several tokens per step) still uses the estimate."""
    slow = ServerOption("a", LayerRange(0, 8), rtt_s=0.001, step_s=0.200)
    fast = ServerOption("b", LayerRange(0, 8), rtt_s=0.001, step_s=0.015)
    assert [h.peer_id for h in choose_route([slow, fast], 8)] == ["b"]
    unmeasured = ServerOption("b", LayerRange(0, 8), rtt_s=0.001)
    assert [h.peer_id for h in choose_route([slow, unmeasured], 8)] == ["b"]
    assert CostModel().hop_seconds(slow) == 0.200
    assert CostModel(tokens=16).hop_seconds(slow) == CostModel(tokens=16).hop_seconds(unmeasured)
