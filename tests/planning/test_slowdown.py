"""Spotting a hop that slows down mid-session: its recent decode steps against its first."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pedge.planning.slowdown import SlowdownPolicy, StepWindow

POLICY = SlowdownPolicy(factor=3.0, min_extra_s=0.02, baseline_steps=4, window=4)


def window_of(*steps: float) -> StepWindow:
    w = StepWindow(POLICY)
    for s in steps:
        w.add(s)
    return w


def test_nothing_is_judged_before_the_baseline_and_the_window_are_full() -> None:
    assert not window_of(0.01, 0.01, 0.01).slowed()
    assert not window_of(0.01, 0.01, 0.01, 0.01, 0.5, 0.5, 0.5).slowed()
    assert str(window_of(0.01)) == "not measured yet"


def test_a_hop_three_times_slower_by_at_least_the_margin_is_slow() -> None:
    w = window_of(0.010, 0.010, 0.010, 0.010, 0.100, 0.100, 0.100, 0.100)
    assert w.slowed()
    assert w.baseline_s == pytest.approx(0.010) and w.recent_s == pytest.approx(0.100)
    assert str(w) == "decode steps 10.0 ms at first, 100.0 ms lately"


def test_one_hiccup_is_not_a_slowdown() -> None:
    w = window_of(0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 2.0)  # mean 0.5 s, one step
    assert not w.slowed()
    for _ in range(3):
        w.add(0.05)  # now every recent step is 5x the baseline: sustained
    assert w.slowed()


def test_the_window_forgets_old_steps() -> None:
    w = window_of(0.01, 0.01, 0.01, 0.01, 0.1, 0.1, 0.1, 0.1)
    for _ in range(4):
        w.add(0.01)  # it recovered
    assert not w.slowed()


def test_jitter_on_fast_steps_is_not_a_slowdown() -> None:
    # 5x slower, but only 8 ms more per step: below the margin a replay would cost
    assert not window_of(0.002, 0.002, 0.002, 0.002, 0.010, 0.010, 0.010, 0.010).slowed()
    # 2.5x slower and far more than the margin: below the factor
    assert not window_of(0.1, 0.1, 0.1, 0.1, 0.25, 0.25, 0.25, 0.25).slowed()


@pytest.mark.parametrize(
    "kw",
    [{"factor": 1.0}, {"min_extra_s": -1.0}, {"baseline_steps": 0}, {"window": 0}],
)
def test_policy_values_are_checked(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SlowdownPolicy(**kw)  # type: ignore[arg-type]


def test_a_negative_step_time_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        StepWindow(POLICY).add(-0.001)


@given(
    base=st.floats(min_value=1e-4, max_value=1.0),
    ratio=st.floats(min_value=0.0, max_value=10.0),
)
def test_steady_steps_are_slow_exactly_when_the_margins_say(base: float, ratio: float) -> None:
    w = window_of(*[base] * 4, *[base * ratio] * 4)
    assert w.baseline_s is not None and w.recent_s is not None
    assert w.baseline_s == pytest.approx(base) and w.recent_s == pytest.approx(base * ratio)
    expected = w.recent_s >= 3.0 * w.baseline_s and w.recent_s - w.baseline_s >= 0.02
    assert w.slowed() == expected
