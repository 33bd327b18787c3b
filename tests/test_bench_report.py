"""The one ratio every benchmark reports (benchmarks/_report.py): median of paired
per-round ratios with the min-max spread, and how it is printed."""

from __future__ import annotations

import pytest

from benchmarks._report import (
    Ratio,
    headline,
    paired_ratio,
    ratio_cell,
    ratio_fields,
    turns,
)


def test_paired_ratio_is_the_median_of_per_round_ratios_not_a_ratio_of_medians() -> None:
    a = [4.0, 2.0, 10.0]
    b = [2.0, 1.0, 4.0]  # per round 2, 2, 2.5
    assert paired_ratio(a, b) == Ratio(2.0, 2.0, 2.5)
    c = [1.0, 3.0, 9.0]
    d = [1.0, 1.0, 9.0]  # per round 1, 3, 1: median 1, while the ratio of medians is 3
    assert paired_ratio(c, d) == Ratio(1.0, 1.0, 3.0)


def test_paired_ratio_spread_and_unequal_rounds() -> None:
    ratio = paired_ratio([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0])
    assert (ratio.median, ratio.low, ratio.high) == (1.25, 0.5, 2.0)
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])  # rounds must pair one to one


def test_ratio_printing() -> None:
    ratio = Ratio(0.9234, 0.851, 0.9712)
    assert ratio_cell(ratio) == "0.92x (0.85-0.97x)"
    assert ratio_cell(ratio, 3, "") == "0.923 (0.851-0.971)"
    fields = ratio_fields("x_vs_y", ratio)
    assert fields == {"x_vs_y": "0.92", "x_vs_y_min": "0.85", "x_vs_y_max": "0.97"}
    assert headline({"a": "1", **fields}) == "a=1 x_vs_y=0.92 x_vs_y_min=0.85 x_vs_y_max=0.97"


def test_turns_rotate_so_each_side_goes_first_equally() -> None:
    sides = ["local", "sharded", "bare"]
    orders = [turns(sides, r) for r in range(6)]
    assert orders[0] == sides
    assert orders[1] == ["sharded", "bare", "local"]
    firsts = [order[0] for order in orders]
    assert all(firsts.count(side) == 2 for side in sides)
    assert all(sorted(order) == sorted(sides) for order in orders)
    assert turns(["a", "b"], 3) == ["b", "a"]
