"""Federated map: order, exactly-once under a killed peer, back-pressure, errors.

Compute is modeled (``ModeledCompute``: a sleep of work / speed under a MockClock) and
failures injected (``PeerKiller``), both named as such; the scheduler under test is real.
"""

from __future__ import annotations

from collections import Counter

import pytest
import trio
import trio.testing

from p2pedge.errors import Busy, PeerUnavailable
from p2pedge.orchestrator.federated import (
    FederatedMapError,
    MapStats,
    Worker,
    federated_map,
)


class ModeledCompute:
    """Each peer takes ``1 / speed`` seconds per item; counts every execution."""

    def __init__(self, speeds: dict[str, float]) -> None:
        self.speeds = speeds
        self.runs: Counter[int] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, peer: str, item: int) -> tuple[int, str]:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(1.0 / self.speeds[peer])
        finally:
            self.in_flight -= 1
        self.runs[item] += 1
        return item * 10, peer


class PeerKiller:
    """Fault injector: ``victim`` dies (drops in-flight work) once ``after`` items finished."""

    def __init__(self, inner: ModeledCompute, victim: str, after: int) -> None:
        self.inner = inner
        self.victim = victim
        self.after = after
        self.dead = trio.Event()
        self.lost: list[int] = []

    async def __call__(self, peer: str, item: int) -> tuple[int, str]:
        if peer == self.victim:
            if self.dead.is_set():
                raise PeerUnavailable("connection refused")
            with trio.move_on_after(1e9) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch, scope)
                    result = await self.inner(peer, item)
                    nursery.cancel_scope.cancel()
                    return result
            self.lost.append(item)
            raise PeerUnavailable("peer died mid-request")
        result = await self.inner(peer, item)
        if sum(self.inner.runs.values()) >= self.after:
            self.dead.set()
        return result

    async def _watch(self, scope: trio.CancelScope) -> None:
        await self.dead.wait()
        scope.cancel()


def workers(n: int, speed: float = 1.0) -> list[Worker]:
    return [Worker(f"p{i}", speed) for i in range(n)]


async def test_results_in_input_order_each_once(autojump_clock: trio.testing.MockClock) -> None:
    compute = ModeledCompute({"p0": 1.0, "p1": 2.0, "p2": 4.0})
    stats = MapStats()
    ws = [Worker("p0", 1.0), Worker("p1", 2.0), Worker("p2", 4.0)]
    out = await federated_map(compute, range(70), ws, stats=stats)
    assert [x for x, _ in out] == [i * 10 for i in range(70)]
    assert set(compute.runs.values()) == {1}
    # pull scheduling gives the fast peer more work
    assert stats.per_peer["p2"] > stats.per_peer["p1"] > stats.per_peer["p0"]


async def test_killed_peer_items_rerun_elsewhere_exactly_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    compute = ModeledCompute({"p0": 1.0, "p1": 0.7, "p2": 1.0, "p3": 1.0})
    killer = PeerKiller(compute, "p1", after=10)
    stats = MapStats()
    out = await federated_map(killer, range(40), workers(4), stats=stats)
    assert killer.dead.is_set() and killer.lost, "the fault must hit an in-flight item"
    assert [x for x, _ in out] == [i * 10 for i in range(40)]
    assert sorted(compute.runs) == list(range(40))
    assert set(compute.runs.values()) == {1}
    assert stats.dead == ["p1"]
    assert all(peer != "p1" for _, peer in out[-10:])


async def test_empty_list_returns_empty_even_without_peers() -> None:
    assert await federated_map(ModeledCompute({}), [], []) == []
    assert await federated_map(ModeledCompute({"p0": 1.0}), [], workers(1)) == []


async def test_no_peer_for_non_empty_list() -> None:
    with pytest.raises(PeerUnavailable):
        await federated_map(ModeledCompute({}), [1], [])


async def test_long_lazy_list_is_drawn_with_back_pressure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    compute = ModeledCompute({f"p{i}": 1.0 for i in range(3)})
    drawn = 0

    def prompts():  # type: ignore[no-untyped-def]
        nonlocal drawn
        for i in range(5000):
            drawn += 1
            # never more than the in-flight slots (3) plus one queued item ahead of results
            assert drawn - sum(compute.runs.values()) <= 4
            yield i

    out = await federated_map(compute, prompts(), workers(3))
    assert len(out) == 5000 and compute.max_in_flight <= 3


async def test_all_peers_dead_reports_partial_results(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def flaky(peer: str, item: int) -> int:
        nonlocal calls
        calls += 1
        await trio.sleep(1)
        if item >= 3:
            raise PeerUnavailable(f"{peer} gone")
        return item

    with pytest.raises(FederatedMapError) as info:
        await federated_map(flaky, range(6), [Worker("p0")])
    assert info.value.results == {0: 0, 1: 1, 2: 2}
    assert 3 in info.value.failed


async def test_busy_peer_is_retried_not_dropped(autojump_clock: trio.testing.MockClock) -> None:
    refusals = Counter[str]()

    async def sometimes_busy(peer: str, item: int) -> int:
        await trio.sleep(0.1)
        if peer == "p0" and refusals[peer] < 3:
            refusals[peer] += 1
            raise Busy("queue full")
        return item

    stats = MapStats()
    out = await federated_map(sometimes_busy, range(10), workers(2), stats=stats)
    assert out == list(range(10))
    assert stats.dead == [] and stats.retries == 3 and stats.per_peer["p0"] > 0


async def test_near_linear_speedup_at_twenty_peers(autojump_clock: trio.testing.MockClock) -> None:
    async def timed(n: int) -> float:
        compute = ModeledCompute({f"p{i}": 1.0 for i in range(n)})
        start = trio.current_time()
        await federated_map(compute, range(400), workers(n))
        return trio.current_time() - start

    one, twenty = await timed(1), await timed(20)
    assert one / twenty >= 18
