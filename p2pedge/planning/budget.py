"""Placement under a memory budget: which contiguous blocks a node can afford to serve.

Pure. A node with ``budget`` bytes holds its shard's weights plus a KV reservation per
block it serves (so at least one session of ``kv_tokens`` positions always fits). Blocks
differ in cost only at the ends: the first shard also holds the embedding table, the last
the final norm and the LM head (the embedding table again when the head is tied). A route's
hops tile the model exactly (a shard cannot be entered mid-way), so a node weighs the
windows that start where a route from block 0 already reaches; among those that fit it
takes one that completes a route, then the one that most raises the swarm's bottleneck,
then the one covering most of the weakest blocks (those no peer serves yet, while any are
uncovered), then the longest: nodes whose budgets are each below the model's size thus
tile it without being told where.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from p2pedge.errors import MemoryBudgetError
from p2pedge.ids import LayerRange
from p2pedge.planning.placement import Placement, block_throughputs, throughput_of
from p2pedge.planning.routes import ServerOption


@dataclass(frozen=True)
class ModelBytes:
    """A model's weight bytes by where a shard needs them.

    ``blocks[i]``: block ``i``'s weights; ``embed``: the embedding table (first shard, and
    the last when ``tied``); ``last``: what only the last shard holds besides (final norm,
    an untied head, tables derived from the head); ``common``: what every shard holds
    (rotary caches, its graph)."""

    blocks: tuple[int, ...]
    embed: int
    last: int
    tied: bool
    common: int = 0

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ValueError("a model has at least one block")
        if min(min(self.blocks), self.embed, self.last, self.common) < 0:
            raise ValueError(f"byte counts must be >= 0: {self}")

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def total(self) -> int:
        return self.shard(LayerRange(0, self.n_layers))

    def shard(self, layers: LayerRange) -> int:
        """Weight bytes of the shard over ``layers``."""
        if layers.end > self.n_layers:
            raise ValueError(f"layer range {layers} exceeds {self.n_layers} blocks")
        first, last = layers.start == 0, layers.end == self.n_layers
        total = self.common + sum(self.blocks[layers.start : layers.end])
        if first or (last and self.tied):
            total += self.embed
        if last:
            total += self.last
        return total


@dataclass(frozen=True)
class Budget:
    """``budget`` bytes for weights and KV together; ``kv_bytes_per_block`` is reserved
    for every block served (a session's KV grows with the blocks it spans)."""

    budget: int
    kv_bytes_per_block: int = 0

    def needs(self, model: ModelBytes, layers: LayerRange) -> int:
        return model.shard(layers) + self.kv_bytes_per_block * len(layers)

    def fits(self, model: ModelBytes, layers: LayerRange) -> bool:
        return self.needs(model, layers) <= self.budget


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1_000_000 else f"{n} B"


def check_fits(model: ModelBytes, layers: LayerRange, budget: Budget, name: str = "") -> None:
    """Raise :class:`MemoryBudgetError` with the numbers when ``layers`` do not fit."""
    need, weights = budget.needs(model, layers), model.shard(layers)
    if need > budget.budget:
        raise MemoryBudgetError(
            f"memory budget {_mb(budget.budget)} cannot hold blocks {layers} of "
            f"{name or 'the model'}: {_mb(weights)} of weights + {_mb(need - weights)} "
            f"KV reservation = {_mb(need)}"
        )


def fitting_windows(model: ModelBytes, budget: Budget) -> list[LayerRange]:
    """For each start block, the longest window from there that fits (none if none does)."""
    n = model.n_layers
    out: list[LayerRange] = []
    for start in range(n):
        best = None
        for end in range(start + 1, n + 1):  # bytes only grow with ``end``
            if not budget.fits(model, LayerRange(start, end)):
                break
            best = LayerRange(start, end)
        if best is not None:
            out.append(best)
    return out


def reachable(ranges: Iterable[LayerRange]) -> set[int]:
    """Block boundaries a route from block 0 reaches over ``ranges`` (hops tile exactly:
    a shard cannot be entered in its middle)."""
    by_start: dict[int, list[int]] = {}
    for r in ranges:
        by_start.setdefault(r.start, []).append(r.end)
    seen, todo = {0}, [0]
    while todo:
        for end in by_start.get(todo.pop(), ()):
            if end not in seen:
                seen.add(end)
                todo.append(end)
    return seen


def candidates(model: ModelBytes, budget: Budget, ranges: Sequence[LayerRange]) -> list[LayerRange]:
    """Windows worth weighing: those that start where a route from block 0 already gets
    to, at their longest or ending where a served range starts (so they plug into it);
    every longest window when none of those fits (a middle server waiting for its ends)."""
    windows = fitting_windows(model, budget)
    reach, ends = reachable(ranges), {r.start for r in ranges}
    out: list[LayerRange] = []
    for w in windows:
        if w.start in reach:
            out.append(w)
            out.extend(LayerRange(w.start, e) for e in sorted(ends) if w.start < e < w.end)
    return out or windows


def choose_budgeted(
    model: ModelBytes,
    budget: Budget,
    served: Iterable[tuple[LayerRange, float]],
    my_throughput: float = 1.0,
    name: str = "",
) -> Placement:
    """The window within ``budget`` that most helps the swarm (see the module docstring):
    first one that completes a route over every block, then the bottleneck, the weakest
    blocks covered, the length.

    Raises :class:`MemoryBudgetError`, with the cheapest block's numbers, when not even
    one block fits.
    """
    n = model.n_layers
    served = list(served)
    ranges = [r for r, _ in served]
    windows = candidates(model, budget, ranges)
    if not windows:
        cheapest = min(
            (LayerRange(b, b + 1) for b in range(n)),
            key=lambda r: (budget.needs(model, r), r.start),
        )
        check_fits(model, cheapest, budget, name)
        raise AssertionError("unreachable: the cheapest block fits but no window does")
    before = block_throughputs(n, served)
    weakest = min(before)
    # a server whose card claims no speed still covers its blocks
    held = {b for r in ranges for b in range(r.start, min(r.end, n))}
    uncovered = n - len(held)

    def key(w: LayerRange) -> tuple[bool, float, int, int, int, float, int]:
        complete = n in reachable([*ranges, w])
        after = [t + my_throughput if b in w else t for b, t in enumerate(before)]
        new = sum(1 for b in range(w.start, w.end) if b not in held)
        weak = sum(1 for b in range(w.start, w.end) if before[b] <= weakest)
        spent = sum(before[w.start : w.end])
        return (not complete, -min(after), -new, -weak, -len(w), spent, w.start)

    layers = min(windows, key=key)
    reason = (
        f"blocks {layers} within {_mb(budget.budget)}: {_mb(budget.needs(model, layers))} "
        f"(model {_mb(model.total)}); {uncovered} of {n} blocks had no server"
    )
    return Placement(layers, reason)


def choose_budgeted_from_options(
    model: ModelBytes,
    budget: Budget,
    options: Sequence[ServerOption],
    my_gflops: float,
    gflop_per_block_token: float,
    name: str = "",
) -> Placement:
    """:func:`choose_budgeted` fed from capability cards (see ``options_from_cards``); our
    own speed is taken over the largest window that fits."""
    served = [(o.layers, throughput_of(o, gflop_per_block_token)) for o in options]
    widest = max((len(w) for w in fitting_windows(model, budget)), default=1)
    mine = my_gflops / max(gflop_per_block_token * widest, 1e-12)
    return choose_budgeted(model, budget, served, mine, name)
