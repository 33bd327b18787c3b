"""Placement under a memory budget: what fits, which window, and the error when nothing does."""

from __future__ import annotations

import pytest

from p2pedge.errors import ConfigError, MemoryBudgetError
from p2pedge.ids import LayerRange
from p2pedge.planning.budget import Budget, ModelBytes, check_fits, choose_budgeted

# 8 blocks of 100 B, a 300 B embedding table (tied head) and a 50 B final norm: 1150 B
MODEL = ModelBytes(blocks=(100,) * 8, embed=300, last=50, tied=True)


def test_shard_bytes_count_the_ends_once() -> None:
    assert MODEL.shard(LayerRange(2, 5)) == 300
    assert MODEL.shard(LayerRange(0, 2)) == 500  # embeds
    assert MODEL.shard(LayerRange(6, 8)) == 550  # tied head: the table again, and the norm
    assert MODEL.total == 800 + 300 + 50  # the full model holds the table once
    untied = ModelBytes(blocks=(100,) * 8, embed=300, last=50, tied=False)
    assert untied.shard(LayerRange(6, 8)) == 250


def test_a_lone_node_takes_the_widest_window_its_budget_holds() -> None:
    # a route starts at block 0: the embedding table and 2 blocks (520 B)
    placed = choose_budgeted(MODEL, Budget(600, kv_bytes_per_block=10), [])
    assert placed.layers == LayerRange(0, 2)


def test_a_node_that_cannot_hold_the_ends_serves_the_middle() -> None:
    big_ends = ModelBytes(blocks=(100,) * 8, embed=1000, last=0, tied=True)
    assert choose_budgeted(big_ends, Budget(550), []).layers == LayerRange(1, 6)


def test_nodes_below_the_model_size_tile_it_preferring_uncovered_blocks() -> None:
    budget = Budget(700, kv_bytes_per_block=10)
    assert budget.budget < MODEL.total
    served: list[tuple[LayerRange, float]] = []
    for _ in range(3):
        layers = choose_budgeted(MODEL, budget, served).layers
        assert budget.fits(MODEL, layers)
        covered = {b for r, _ in served for b in range(r.start, r.end)}
        assert set(range(layers.start, layers.end)) - covered  # something new each time
        served.append((layers, 1.0))
    # each starts where the route so far ends, and the last completes it
    assert [r for r, _ in served] == [LayerRange(0, 3), LayerRange(3, 7), LayerRange(7, 8)]


def test_servers_claiming_no_speed_still_cover_their_blocks() -> None:
    served = [(LayerRange(0, 3), 0.0)]
    assert choose_budgeted(MODEL, Budget(700, 10), served).layers == LayerRange(3, 7)


def test_with_the_model_covered_a_new_node_doubles_the_weakest_blocks() -> None:
    served = [(LayerRange(0, 5), 5.0), (LayerRange(5, 8), 1.0)]
    # [0, 4) would fit too, but only [5, 8) doubles the weak blocks (and aligns with 5)
    assert choose_budgeted(MODEL, Budget(700), served).layers == LayerRange(5, 8)


def test_not_even_one_block_fits_says_so_with_numbers() -> None:
    with pytest.raises(MemoryBudgetError) as caught:
        choose_budgeted(MODEL, Budget(105, kv_bytes_per_block=10), [], name="tiny")
    text = str(caught.value)
    assert "tiny" in text and "105 B" in text and "100 B of weights + 10 B" in text
    assert isinstance(caught.value, ConfigError)
    with pytest.raises(MemoryBudgetError, match="blocks 0-8"):
        check_fits(MODEL, LayerRange(0, 8), Budget(1000))
    check_fits(MODEL, LayerRange(2, 4), Budget(200))  # exactly full is fine
