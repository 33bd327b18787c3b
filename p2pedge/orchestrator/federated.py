"""Federated batches: spread independent requests over peers, results in input order.

Workers *pull* items, so a fast peer naturally does more; the cards' capacity and load
only matter at the tail, where a slow peer taking one of the last items would keep the
whole batch waiting. There a worker takes an item only if no other peer is expected to
finish it sooner (earliest-finish rule, with per-peer durations learned online and seeded
from card capacity). A peer that fails has its item put back at the head of the queue
for someone else; a result is stored only once per index, so nothing is lost or doubled.
Items are drawn lazily from the input iterable, which is the back-pressure for very long
lists: at most ``sum(slots)`` requests are in flight.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import trio

from p2pedge.errors import (
    Busy,
    ModelLoadError,
    ModelNotCached,
    P2PEdgeError,
    PeerUnavailable,
    RemoteProtocolError,
)
from p2pedge.protocols.infer.codec import InferFailed

T = TypeVar("T")
R = TypeVar("R")

RETRYABLE: tuple[type[BaseException], ...] = (
    PeerUnavailable,
    Busy,
    RemoteProtocolError,
    ModelNotCached,
    ModelLoadError,
    InferFailed,
)


class CapacityCard(Protocol):
    """Card fields the scheduler reads (the lead's CapabilityCard fits)."""

    @property
    def peer_id(self) -> str: ...

    @property
    def compute_gflops(self) -> float: ...

    @property
    def load(self) -> float: ...


@dataclass
class Worker:
    """One peer as seen by the scheduler: a capacity estimate and parallel slots."""

    peer_id: str
    speed: float = 1.0
    slots: int = 1
    alive: bool = True
    busy_since: list[float] = field(default_factory=list)
    mean_s: float | None = None
    done: int = 0
    failed: int = 0

    def observe(self, seconds: float) -> None:
        self.mean_s = seconds if self.mean_s is None else 0.7 * self.mean_s + 0.3 * seconds
        self.done += 1


def capacity(card: CapacityCard) -> float:
    """Usable compute: advertised GFLOP/s times the idle share (never quite zero)."""
    load = min(max(float(card.load), 0.0), 1.0)
    return max(float(card.compute_gflops), 1e-3) * max(1.0 - load, 0.05)


def workers_from_cards(cards: Iterable[CapacityCard], *, slots: int = 1) -> list[Worker]:
    return [Worker(c.peer_id, capacity(c), slots) for c in cards]


class FederatedMapError(P2PEdgeError):
    """Some items failed on every peer tried; ``results`` holds the ones that succeeded."""

    def __init__(self, failed: Mapping[int, BaseException], results: Mapping[int, Any]) -> None:
        self.failed = dict(failed)
        self.results = dict(results)
        first = next(iter(self.failed.items()), None)
        detail = f"; item {first[0]}: {first[1]!r}" if first else ""
        super().__init__(f"{len(self.failed)} item(s) failed{detail}")


@dataclass
class _Job(Generic[T]):
    index: int
    item: T
    attempts: int = 0
    tried: set[str] = field(default_factory=set)


@dataclass
class MapStats:
    """What happened, for tests and benchmarks."""

    per_peer: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    dead: list[str] = field(default_factory=list)


class _Scheduler(Generic[T, R]):
    def __init__(
        self,
        execute: Callable[[str, T], Awaitable[R]],
        items: Iterable[T],
        workers: Sequence[Worker],
        max_attempts: int,
        busy_backoff_s: float,
    ) -> None:
        self.execute = execute
        self.source: Iterator[T] = iter(items)
        self.next_index = 0
        self.exhausted = False
        self.retry: deque[_Job[T]] = deque()
        self.workers = list(workers)
        self.max_attempts = max_attempts
        self.busy_backoff_s = busy_backoff_s
        self.results: dict[int, R] = {}
        self.failed: dict[int, BaseException] = {}
        self.in_flight = 0
        self.changed = trio.Event()
        self.stats = MapStats()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _remaining_hint(self) -> int | None:
        """Queued items, or None when the source may still hold many."""
        if not self.exhausted:
            return None
        return len(self.retry)

    def _pull(self) -> None:
        if self.exhausted or self.retry:
            return
        try:
            item = next(self.source)
        except StopIteration:
            self.exhausted = True
            return
        self.retry.append(_Job(self.next_index, item))
        self.next_index += 1

    def _estimate(self, worker: Worker) -> float | None:
        if worker.mean_s is not None:
            return worker.mean_s
        known = [w for w in self.workers if w.mean_s is not None]
        if not known:
            return None
        ref = sum((w.mean_s or 0.0) * w.speed for w in known) / len(known)
        return ref / max(worker.speed, 1e-9)

    def _should_wait(self, worker: Worker, now: float) -> bool:
        """Earliest-finish rule: leave the last items to peers that will finish sooner."""
        self._pull()
        remaining = self._remaining_hint()
        if remaining is None or remaining == 0:
            return False
        mine = self._estimate(worker)
        if mine is None:
            return False
        my_finish = now + mine
        sooner = 0
        for other in self.workers:
            if other is worker or not other.alive:
                continue
            est = self._estimate(other)
            if est is None:
                continue
            frees = [max(now, t + est) for t in other.busy_since]
            frees += [now] * (other.slots - len(other.busy_since))
            sooner += sum(1 for f in frees if f + est < my_finish)
        return remaining <= sooner

    def _take(self, worker: Worker) -> _Job[T] | None:
        self._pull()
        for _ in range(len(self.retry)):
            job = self.retry.popleft()
            if worker.peer_id not in job.tried or self._all_tried(job):
                return job
            self.retry.append(job)
        return None

    def _all_tried(self, job: _Job[T]) -> bool:
        return all(w.peer_id in job.tried for w in self.workers if w.alive)

    async def run_slot(self, worker: Worker) -> None:
        while worker.alive:
            now = trio.current_time()
            job = None if self._should_wait(worker, now) else self._take(worker)
            if job is None:
                if self.exhausted and not self.retry and self.in_flight == 0:
                    return
                await self.changed.wait()
                continue
            await self._attempt(worker, job)

    async def _attempt(self, worker: Worker, job: _Job[T]) -> None:
        self.in_flight += 1
        start = trio.current_time()
        worker.busy_since.append(start)
        busy = False
        try:
            result = await self.execute(worker.peer_id, job.item)
        except RETRYABLE as exc:
            busy = isinstance(exc, Busy)
            self._failed_attempt(worker, job, exc)
        else:
            worker.observe(trio.current_time() - start)
            if job.index not in self.results:
                self.results[job.index] = result
                self.stats.per_peer[worker.peer_id] = self.stats.per_peer.get(worker.peer_id, 0) + 1
        finally:
            worker.busy_since.remove(start)
            self.in_flight -= 1
            self._notify()
        if busy:
            await trio.sleep(self.busy_backoff_s)

    def _failed_attempt(self, worker: Worker, job: _Job[T], exc: BaseException) -> None:
        job.attempts += 1
        job.tried.add(worker.peer_id)
        worker.failed += 1
        if not isinstance(exc, Busy):
            worker.alive = False
            self.stats.dead.append(worker.peer_id)
        if job.attempts >= self.max_attempts or not any(w.alive for w in self.workers):
            self.failed[job.index] = exc
        else:
            self.stats.retries += 1
            self.retry.appendleft(job)


async def federated_map(
    execute: Callable[[str, T], Awaitable[R]],
    items: Iterable[T],
    workers: Sequence[Worker],
    *,
    max_attempts: int = 3,
    busy_backoff_s: float = 0.05,
    stats: MapStats | None = None,
) -> list[R]:
    """Run ``execute(peer_id, item)`` for every item; results in input order.

    A peer that fails (unreachable, garbage, model missing or failing) is dropped for the
    rest of the batch and its item retried on another; :class:`Busy` only retries. An
    item that fails ``max_attempts`` times (or when no peer is left) makes the whole call
    raise :class:`FederatedMapError` carrying the partial results.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    if not workers:
        empty = iter(items)
        if next(empty, None) is None:
            return []
        raise PeerUnavailable("no peer offers this model")
    sched: _Scheduler[T, R] = _Scheduler(execute, items, workers, max_attempts, busy_backoff_s)
    if stats is not None:
        sched.stats = stats
    async with trio.open_nursery() as nursery:
        for worker in workers:
            for _ in range(max(worker.slots, 1)):
                nursery.start_soon(sched.run_slot, worker)
    sched._pull()
    if sched.failed or sched.retry:
        for job in sched.retry:
            sched.failed.setdefault(job.index, PeerUnavailable("no live peer left"))
        raise FederatedMapError(sched.failed, sched.results)
    return [sched.results[i] for i in range(sched.next_index)]


def expected_makespan(work: int, speeds: Sequence[float]) -> float:
    """Lower bound for ``work`` unit items on peers of the given items-per-second."""
    total = sum(speeds)
    return math.inf if total <= 0 else work / total
