"""A capacity limiter that serves its waiters fairly by cost: first between source
addresses, then between the peer ids of one address.

Steps wait here for the compute thread. trio's ``CapacityLimiter`` is first come, first
served: one peer with a 255-token step queued on each of eight streams made a normal
client's decode step wait for all eight. Here each source, and each peer within it, is
charged the positions its steps compute, and the waiter whose source (then peer) has been
served least goes next; a newcomer starts level with the least-served active one, so
idle time earns no credit. A one-token decode step then waits for at most the step
already running, and minting peer ids on one address buys no more than the address gets.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import outcome
import trio

from p2pedge.errors import LocalProtocolError

T = TypeVar("T")


@dataclass
class _Account:
    """Positions served to one source (or one peer), and its waiters and running steps."""

    served: int
    running: int = 0
    waiters: deque[tuple[int, int, trio.Event]] = field(default_factory=deque)  # seq, cost
    peers: dict[str, _Account] = field(default_factory=dict)  # a source's peers

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiters and not self.peers


class _Level:
    """Accounts of one level (sources, or one source's peers) and its virtual time: the
    ``served`` of the last one picked, where a newly active account starts."""

    def __init__(self) -> None:
        self.accounts: dict[str, _Account] = {}
        self.now = 0

    def enter(self, key: str) -> _Account:
        account = self.accounts.get(key)
        if account is None:
            account = self.accounts[key] = _Account(self.now)
        return account


class FairLimiter:
    """``capacity`` holders at once; waiters go least-served first, by source then peer."""

    def __init__(self, capacity: int = 1) -> None:
        if capacity < 1:
            raise LocalProtocolError("capacity must be >= 1")
        self.capacity = capacity
        self.borrowed = 0
        self.waiting = 0
        self._sources = _Level()
        self._peers: dict[str, _Level] = {}  # source -> its peers' level
        self._seq = itertools.count()

    @property
    def busy(self) -> bool:
        """Whether anything holds or waits for a slot."""
        return self.borrowed > 0 or self.waiting > 0

    @asynccontextmanager
    async def slot(self, peer: str, source: str, cost: int = 1) -> AsyncIterator[None]:
        """Hold one slot for the ``with`` block, charged ``cost`` (positions computed)."""
        await self.acquire(peer, source, cost)
        try:
            yield
        finally:
            self.release(peer, source)

    async def acquire(self, peer: str, source: str, cost: int = 1) -> None:
        src = self._sources.enter(source)
        level = self._peers.setdefault(source, _Level())
        account = level.enter(peer)
        src.peers[peer] = account
        if self.borrowed < self.capacity and not self.waiting:
            self.borrowed += 1
            self._start(source, peer, cost)
            await trio.lowlevel.checkpoint()
            return
        woken = trio.Event()
        account.waiters.append((next(self._seq), cost, woken))
        self.waiting += 1
        try:
            await woken.wait()
        except BaseException:
            if woken.is_set():  # handed a slot as it was cancelled: pass it on
                self.release(peer, source)
            else:
                account.waiters.remove(next(w for w in account.waiters if w[2] is woken))
                self.waiting -= 1
                self._tidy(source, peer)
            raise

    def release(self, peer: str, source: str) -> None:
        """Give the slot back (``peer`` and ``source`` as acquired); the next waiter gets it."""
        if self.borrowed < 1:
            raise LocalProtocolError("release without acquire")
        self._sources.accounts[source].running -= 1
        self._peers[source].accounts[peer].running -= 1
        self._tidy(source, peer)
        if not self.waiting:
            self.borrowed -= 1
            return
        source, peer = self._pick()
        _, cost, woken = self._peers[source].accounts[peer].waiters.popleft()
        self.waiting -= 1
        self._start(source, peer, cost)
        woken.set()  # the slot passes on: ``borrowed`` is unchanged

    def _start(self, source: str, peer: str, cost: int) -> None:
        for level, key in ((self._sources, source), (self._peers[source], peer)):
            account = level.accounts[key]
            level.now = max(level.now, account.served)
            account.served += cost
            account.running += 1

    def _pick(self) -> tuple[str, str]:
        """The least-served source with a waiter, then its least-served waiting peer (ties:
        whoever has waited longest)."""

        def waiting(level: _Level) -> list[tuple[int, int, str]]:
            return [
                (a.served, a.waiters[0][0], key) for key, a in level.accounts.items() if a.waiters
            ]

        sources = [
            (a.served, min(w[1] for w in waiting(self._peers[key])), key)
            for key, a in self._sources.accounts.items()
            if any(p.waiters for p in a.peers.values())
        ]
        source = min(sources)[2]
        return source, min(waiting(self._peers[source]))[2]

    def _tidy(self, source: str, peer: str) -> None:
        """Forget accounts with nothing running or waiting (they restart level)."""
        level, src = self._peers[source], self._sources.accounts[source]
        if not level.accounts[peer].running and not level.accounts[peer].waiters:
            del level.accounts[peer]
            del src.peers[peer]
        if src.idle:
            del self._sources.accounts[source]
            del self._peers[source]


class ComputePacer:
    """Positions per second one peer, and one source address, may have computed.

    The fair limiter shares the compute thread between those waiting, but a peer alone
    (or one that always has a step queued) still takes all of it, and on a machine whose
    cores other work needs too, that is the cost a flood imposes. Each peer and each source
    has a token bucket of positions: a step is charged its positions at once (the bucket
    may go negative) and waits until both buckets are back to zero before it runs. Honest
    use fits the burst (a long prompt) and the rate (decoding); a flood is held to the rate.
    Time is a parameter; keys whose buckets are full again are forgotten.
    """

    def __init__(self, per_peer: float, per_source: float, burst: float) -> None:
        if min(per_peer, per_source, burst) <= 0:
            raise LocalProtocolError("pacing rates and burst must be positive")
        self.rates = {"peer": per_peer, "source": per_source}
        self.burst = burst
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def charge(self, peer: str, source: str, cost: int, now: float) -> float:
        """Charge ``cost`` positions; the seconds to wait before computing them."""
        wait = 0.0
        for scope, key in (("peer", peer), ("source", source)):
            rate = self.rates[scope]
            tokens, last = self._buckets.get((scope, key), (self.burst, now))
            tokens = min(self.burst, tokens + max(0.0, now - last) * rate) - cost
            self._buckets[(scope, key)] = (tokens, now)
            wait = max(wait, -tokens / rate)
        if len(self._buckets) > 4096:
            self._forget_full(now)
        return wait

    def heavy(self, peer: str, source: str, now: float) -> bool:
        """Whether ``peer`` or its source has spent over half its burst lately (a long
        prompt, or a flood): its long steps then run at a lower CPU priority."""
        for scope, key in (("peer", peer), ("source", source)):
            tokens, last = self._buckets.get((scope, key), (self.burst, now))
            if tokens + max(0.0, now - last) * self.rates[scope] < self.burst / 2:
                return True
        return False

    def _forget_full(self, now: float) -> None:
        for (scope, key), (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.rates[scope] >= self.burst:
                del self._buckets[(scope, key)]


async def run_niced(fn: Callable[[], T], nice: int) -> T:
    """``fn()`` in a fresh worker thread whose CPU priority is lowered by ``nice`` (Linux,
    where a thread's nice value is its own; elsewhere, or with ``nice`` 0, an ordinary
    worker thread).

    The fair limiter orders the steps of one server; it cannot stop a long step from
    taking the cores that other processes' steps need (the next hop of a client's token,
    on the same machine). Niced, a prompt chunk runs at full speed on an idle machine
    and yields the CPU to normal-priority work when there is any. A fresh thread each
    time, since a thread cannot take its priority back (trio's workers are reused); a
    chunk costs far more than starting one. Not cancellable, like ``to_thread.run_sync``.
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return await trio.to_thread.run_sync(fn)
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    result: list[outcome.Outcome[T]] = []

    def body() -> None:
        tid = threading.get_native_id()
        try:  # this thread only; relative to what it inherited, at most 19
            os.setpriority(
                os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice)
            )
        except OSError:
            pass  # not permitted here: run at the inherited priority
        result.append(outcome.capture(fn))
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass  # trio has exited: nobody is waiting

    threading.Thread(target=body, name="p2pedge-niced-step", daemon=True).start()
    with trio.CancelScope(shield=True):
        await done.wait()
    return result[0].unwrap()
