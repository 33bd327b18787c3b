"""Block placement: which contiguous blocks a new server should load.

Pure. A swarm runs a model only as fast as its weakest block (every token passes through
every block), so, as Petals does, a server joining with room for ``n`` blocks covers the
window whose weakest block is weakest today; the answer carries a reason for the log.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from p2pedge.ids import LayerRange
from p2pedge.planning.routes import ServerOption


@dataclass(frozen=True)
class Placement:
    layers: LayerRange
    reason: str


def block_throughputs(n_layers: int, served: Iterable[tuple[LayerRange, float]]) -> list[float]:
    """Per block, the summed throughput (tokens/s) of every server that holds it."""
    per_block = [0.0] * n_layers
    for layers, throughput in served:
        for b in range(max(layers.start, 0), min(layers.end, n_layers)):
            per_block[b] += max(throughput, 0.0)
    return per_block


def choose_blocks(
    n_layers: int,
    n_blocks: int,
    served: Iterable[tuple[LayerRange, float]],
    my_throughput: float = 1.0,
) -> Placement:
    """The window of ``n_blocks`` blocks that most raises the swarm's bottleneck.

    Windows are ranked by the swarm's weakest block once we join, then by how weak the
    window is today (helping the thinnest region), then by position (deterministic).
    """
    if n_layers < 1:
        raise ValueError("a model has at least one block")
    n = min(max(n_blocks, 1), n_layers)
    before = block_throughputs(n_layers, served)
    best: tuple[float, float, int] | None = None
    for s in range(n_layers - n + 1):
        after = [t + my_throughput if s <= b < s + n else t for b, t in enumerate(before)]
        key = (-min(after), sum(before[s : s + n]), s)
        if best is None or key < best:
            best = key
    assert best is not None
    start = best[2]
    layers = LayerRange(start, start + n)
    weakest = min(range(n_layers), key=lambda b: (before[b], b))
    reason = (
        f"blocks {layers}: swarm bottleneck was {before[weakest]:.3g} tok/s at block "
        f"{weakest}, becomes {-best[0]:.3g} tok/s with us"
    )
    if before[weakest] == 0.0:
        missing = [b for b, t in enumerate(before) if t == 0.0]
        reason += f" ({len(missing)} blocks had no server)"
    return Placement(layers, reason)


def throughput_of(option: ServerOption, gflop_per_block_token: float) -> float:
    """Tokens/s one server can push through each of its blocks, given its load."""
    spare = 1.0 - min(max(option.load, 0.0), 0.95)
    return option.compute_gflops * spare / max(gflop_per_block_token * len(option.layers), 1e-12)


def choose_blocks_from_options(
    n_layers: int,
    n_blocks: int,
    options: Sequence[ServerOption],
    my_gflops: float,
    gflop_per_block_token: float,
) -> Placement:
    """:func:`choose_blocks` fed from capability cards (see ``options_from_cards``)."""
    served = [(o.layers, throughput_of(o, gflop_per_block_token)) for o in options]
    mine = my_gflops / max(gflop_per_block_token * min(n_blocks, n_layers), 1e-12)
    return choose_blocks(n_layers, n_blocks, served, mine)
