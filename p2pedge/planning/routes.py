"""Route choice: a chain of shard servers tiling the blocks ``[start, end)``, cheapest first.

Pure (no I/O). Boundaries between blocks are the graph's vertices and each server's range
is an edge from its start to its end, weighted by the estimated time of one step there:
network round trip plus compute scaled by the server's load. Dijkstra over that graph
gives the chain with the lowest estimated per-token latency, as in Petals.

Compute and load come from the servers' own cards, so until a measured step time
replaces them they are believed only within bounds: no more than ``max_gflops``, and no
more than ``claim_spread`` times the median claim among the offers being compared.
"""

from __future__ import annotations

import heapq
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from p2pedge.errors import P2PEdgeError
from p2pedge.ids import LayerRange
from p2pedge.records.card import MAX_CLAIMED_GFLOPS

MAX_LOAD = 0.95


class NoRoute(P2PEdgeError):
    """No chain of reachable, unbanned servers covers the requested blocks."""


@dataclass(frozen=True, order=True)
class ServerOption:
    """One server's offer for one model: its block range and what we know of its speed."""

    peer_id: str
    layers: LayerRange
    compute_gflops: float = 10.0
    load: float = 0.0
    rtt_s: float | None = None
    step_s: float | None = None  # a decode step's measured time here, from earlier sessions


@dataclass(frozen=True)
class CostModel:
    """How a step's time is estimated; ``tokens`` is the step's length (1 when decoding)."""

    gflop_per_block_token: float = 0.01
    default_rtt_s: float = 0.05
    default_gflops: float = 10.0  # for a card that says 0: not measured, not infinitely slow
    hop_overhead_s: float = 0.001
    tokens: int = 1
    max_gflops: float = MAX_CLAIMED_GFLOPS  # the most any card's claim is believed
    claim_spread: float = 8.0  # and at most this many times the median claim offered

    def hop_seconds(self, option: ServerOption) -> float:
        """A measured decode step when there is one (it already holds the round trip, the
        real load and the real compute), else the estimate from ping and card."""
        if option.step_s is not None and self.tokens == 1:
            return option.step_s
        rtt = self.default_rtt_s if option.rtt_s is None else option.rtt_s
        claimed = min(option.compute_gflops, self.max_gflops)
        gflops = claimed if claimed > 0 else self.default_gflops
        slowdown = 1.0 / (1.0 - min(max(option.load, 0.0), MAX_LOAD))
        compute = len(option.layers) * self.gflop_per_block_token * self.tokens / gflops
        return rtt + self.hop_overhead_s + compute * slowdown


def believed(options: Iterable[ServerOption], cost: CostModel) -> list[ServerOption]:
    """``options`` with each compute claim cut to ``claim_spread`` times the median claim
    (one per peer): a card that says it is a thousand times faster than the rest is
    believed to be a few times faster, until its measured step time says more."""
    options = list(options)
    claims = {o.peer_id: min(o.compute_gflops, cost.max_gflops) for o in options}
    positive = [c for c in claims.values() if c > 0]
    if not positive:
        return options
    ceiling = statistics.median_low(positive) * cost.claim_spread
    return [
        replace(o, compute_gflops=ceiling) if o.compute_gflops > ceiling else o for o in options
    ]


@dataclass(frozen=True)
class Hop:
    peer_id: str
    layers: LayerRange


def choose_route(
    options: Iterable[ServerOption],
    end: int,
    *,
    start: int = 0,
    cost: CostModel = CostModel(),
    banned: Collection[str] = (),
) -> list[Hop]:
    """The cheapest chain of hops whose ranges tile ``[start, end)`` exactly.

    Ties go to fewer hops, then to the lexicographically smaller chain, so the answer
    is deterministic. Raises :class:`NoRoute` when the blocks cannot be covered.
    """
    if not 0 <= start < end:
        raise ValueError(f"invalid block span [{start}, {end})")
    options = list(options)
    edges: dict[int, list[tuple[float, ServerOption]]] = {}
    for option in sorted(set(believed(options, cost))):
        r = option.layers
        if option.peer_id in banned or r.start < start or r.end > end:
            continue
        edges.setdefault(r.start, []).append((cost.hop_seconds(option), option))
    # Keys are (seconds, hops, chain): the chain breaks exact ties deterministically.
    Key = tuple[float, int, tuple[ServerOption, ...]]
    best: dict[int, Key] = {start: (0.0, 0, ())}
    heap: list[tuple[Key, int]] = [((0.0, 0, ()), start)]
    while heap:
        key, at = heapq.heappop(heap)
        if at == end:
            return [Hop(o.peer_id, o.layers) for o in key[2]]
        if best[at] < key:
            continue
        seconds, hops, chain = key
        for step_seconds, option in edges.get(at, []):
            # Rounded so that float noise in sums cannot decide between equal chains.
            new: Key = (round(seconds + step_seconds, 9), hops + 1, (*chain, option))
            to = option.layers.end
            if to not in best or new < best[to]:
                best[to] = new
                heapq.heappush(heap, (new, to))
    covered = sorted({o.layers for o in options if o.peer_id not in banned})
    raise NoRoute(f"no chain covers blocks [{start}, {end}); offers: {covered}")


def route_seconds(route: Sequence[Hop], options: Iterable[ServerOption], cost: CostModel) -> float:
    """Estimated time of one step along ``route`` (for logs and benchmarks)."""
    by_hop = {Hop(o.peer_id, o.layers): o for o in believed(options, cost)}
    return sum(cost.hop_seconds(by_hop[h]) for h in route)


class CardLike(Protocol):
    """What route choice reads from a capability card."""

    @property
    def peer_id(self) -> str: ...

    @property
    def compute_gflops(self) -> float: ...

    @property
    def load(self) -> float: ...

    @property
    def layers_served(self) -> Sequence[Any]: ...


def _field(entry: Any, key: str) -> Any:
    """Card entries are ``ServedLayers`` objects or plain maps (decoded elsewhere)."""
    return entry.get(key) if isinstance(entry, Mapping) else getattr(entry, key, None)


def options_from_cards(
    cards: Iterable[CardLike], model: str, rtts: Mapping[str, float] | None = None
) -> list[ServerOption]:
    """Every ``(peer, range)`` the cards offer for ``model``; malformed entries are skipped
    (cards are signed by their sender, not checked for sense)."""
    rtts = rtts or {}
    options: list[ServerOption] = []
    for card in cards:
        for entry in card.layers_served:
            start, end = _field(entry, "start"), _field(entry, "end")
            if _field(entry, "model") != model or type(start) is not int or type(end) is not int:
                continue
            if not 0 <= start < end:
                continue
            options.append(
                ServerOption(
                    card.peer_id,
                    LayerRange(start, end),
                    float(card.compute_gflops),
                    float(card.load),
                    rtts.get(card.peer_id),
                )
            )
    return options
