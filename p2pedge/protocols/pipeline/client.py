"""Sharded generation over a chain of shard servers, pipelined, surviving server loss.

The client sits between hops (as in Petals): hop ``k`` reads boundary ``k`` (token ids
for ``k == 0``, else the hidden states hop ``k - 1`` produced) and writes boundary
``k + 1``. Every boundary keeps its whole history, and each hop counts the positions
it has consumed, so one routine does prefill, decode and recovery alike: drive every
hop until it has consumed all positions. Hops run as concurrent tasks, so a long
prompt split into chunks keeps several servers busy at once (pipelining).

Decode steps (one new position, every hop in step) go server to server instead when every
server issued a push key (``push.py``): the client sends hop 0 the chain, then collects each
hop's output as it arrives, so the boundaries' histories stay complete either way.

When a hop fails (stream end, our own step deadline, an error reply) the client bans
the peer with back-off, picks a replacement chain for that hop's blocks, and sets the
new hops' counters to zero: driving again replays the stored history into them and
rebuilds their KV caches, while the hops downstream keep theirs.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from p2pedge.errors import (
    Busy,
    PeerUnavailable,
    RemoteProtocolError,
    ShardFailed,
)
from p2pedge.ids import LayerRange
from p2pedge.planning.routes import CostModel, Hop, NoRoute, ServerOption, choose_route
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.connection import ShardConnection, StreamOpener

log = logging.getLogger(__name__)

OptionsFinder = Callable[[], Awaitable[list[ServerOption]]]
# told, as a session ends, each hop's mean decode-step time (peer, blocks, seconds)
StepObserver = Callable[[str, LayerRange, float], None]
Sampler = Callable[[npt.NDArray[np.float32]], int]
HOP_ERRORS = (PeerUnavailable, ShardFailed, RemoteProtocolError, Busy)
# How long to wait for a pushed output before relaying that step instead: a multiple of
# the hop's mean step time, never under the floor.
PUSH_GRACE_FACTOR = 4.0
PUSH_GRACE_MIN_S = 1.0


def greedy(logits: npt.NDArray[np.float32]) -> int:
    return int(np.argmax(logits))


def logits_needed(temperature: float, top_k: int) -> int:
    """How many of the largest logits a sampler needs to pick what it would pick from all."""
    if temperature <= 0:
        return 1
    return top_k if top_k > 0 else 0


def make_sampler(
    temperature: float = 1.0, top_k: int = 0, seed: int = 0, top_p: float = 1.0
) -> Sampler:
    """Temperature / top-k / top-p sampling with its own seeded generator (reproducible)."""
    rng = np.random.default_rng(seed)

    def sample(logits: npt.NDArray[np.float32]) -> int:
        if temperature <= 0:
            return greedy(logits)
        z = logits.astype(np.float64) / temperature
        if 0 < top_k < z.size:
            z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_p < 1.0:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < top_p  # smallest set reaching top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(rng.choice(z.size, p=p))

    return sample


@dataclass
class ClientConfig:
    max_length: int = 512
    chunk: int = 16
    step_timeout: float = 30.0
    dtype: str = "float32"
    max_recoveries: int = 8
    ban_seconds: float = 5.0
    max_ban_seconds: float = 300.0
    cost: CostModel = field(default_factory=CostModel)
    # Logits the last shard sends per step: 0 = all; k = the k largest (enough for greedy
    # with k = 1, and for top-k sampling with k = top_k). See `logits_needed`.
    logits_top_k: int = 0
    # Decode steps go server to server (see `push.py`); prefill and replay are relayed.
    push: bool = True


class _History:
    """A boundary's values by position, in one array allocated at the first write."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.data: npt.NDArray[Any] | None = None
        self.length = 0

    def write(self, at: int, values: npt.NDArray[Any]) -> None:
        """Store ``values`` from position ``at``; positions already known stay as they are."""
        if self.data is None:
            self.data = np.zeros((self.max_length, *values.shape[1:]), dtype=values.dtype)
        n = values.shape[0]
        if at + n > self.length:
            skip = self.length - at
            self.data[self.length : at + n] = values[skip:]
            self.length = at + n

    def read(self, start: int, end: int) -> npt.NDArray[Any]:
        assert self.data is not None
        return self.data[start:end]


@dataclass
class _HopState:
    conn: ShardConnection
    done: int = 0  # positions of the input boundary this hop has consumed


class _HopFailed(Exception):
    def __init__(self, index: int, peer: str, cause: BaseException) -> None:
        super().__init__(f"hop {index} ({peer}) failed: {cause}")
        self.index = index
        self.peer = peer
        self.cause = cause


class ShardedSession:
    """Generation state for one sequence across a chain of shard servers."""

    def __init__(
        self,
        opener: StreamOpener,
        find_options: OptionsFinder,
        model: str,
        n_layers: int,
        config: ClientConfig | None = None,
        *,
        bans: dict[str, tuple[float, int]] | None = None,
        observe: StepObserver | None = None,
    ) -> None:
        """``bans`` may be shared between sessions (a node's), so a dead peer found by one
        session is skipped by the next instead of being re-learned; ``observe`` hears each
        hop's decode-step time when the session ends, for later route choice."""
        self.opener = opener
        self.find_options = find_options
        self.model = model
        self.n_layers = n_layers
        self.config = config or ClientConfig()
        self.hops: list[_HopState] = []
        self.boundaries: list[_History] = []
        self.last_logits: npt.NDArray[np.float32] | None = None
        self.recoveries = 0
        self._bans: dict[str, tuple[float, int]] = {} if bans is None else bans
        self._observe = observe
        self._progress = trio.Event()
        self.push_ok = self.config.push  # off for good once a pushed output fails to come
        self.pushed_steps = 0

    # --- set-up and tear-down --------------------------------------------------------

    async def __aenter__(self) -> ShardedSession:
        """Start unless already started (``open_sharded_session`` returns a started one;
        starting twice would open a second chain and strand the first one's sessions)."""
        if not self.hops:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def route(self) -> list[Hop]:
        return [Hop(h.conn.peer, h.conn.layers) for h in self.hops]

    def banned(self) -> set[str]:
        now = trio.current_time()
        return {peer for peer, (until, _) in self._bans.items() if until > now}

    def ban(self, peer: str) -> None:
        _, strikes = self._bans.get(peer, (0.0, 0))
        seconds = min(self.config.ban_seconds * 2**strikes, self.config.max_ban_seconds)
        self._bans[peer] = (trio.current_time() + seconds, strikes + 1)

    async def start(self, route: Sequence[Hop] | None = None) -> None:
        self.boundaries = [_History(self.config.max_length)]
        first = True
        while True:
            plan = list(route) if route is not None and first else await self._plan(0, None)
            first = False
            try:
                self.hops = await self._open_chain(plan)
                break
            except _HopFailed as failure:
                await self._note_failure(failure)
        self.boundaries += [_History(self.config.max_length) for _ in self.hops]

    async def aclose(self) -> None:
        if self._observe is not None:
            for hop in self.hops:
                if hop.conn.decode_steps:
                    mean = hop.conn.decode_seconds / hop.conn.decode_steps
                    self._observe(hop.conn.peer, hop.conn.layers, mean)
        async with trio.open_nursery() as nursery:
            for hop in self.hops:
                nursery.start_soon(hop.conn.close)
        self.hops = []

    async def _plan(self, start: int, end: int | None) -> list[Hop]:
        options = await self.find_options()
        return choose_route(
            options,
            self.n_layers if end is None else end,
            start=start,
            cost=self.config.cost,
            banned=self.banned(),
        )

    async def _open_chain(self, plan: Sequence[Hop]) -> list[_HopState]:
        conns: list[ShardConnection | None] = [None] * len(plan)
        failures: list[_HopFailed] = []

        async def open_one(i: int, hop: Hop) -> None:
            try:
                conns[i] = await ShardConnection.open(
                    self.opener,
                    hop.peer_id,
                    self.model,
                    hop.layers,
                    self.config.max_length,
                    timeout=self.config.step_timeout,
                    dtype=self.config.dtype,
                )
            except HOP_ERRORS as exc:
                failures.append(_HopFailed(i, hop.peer_id, exc))

        async with trio.open_nursery() as nursery:
            for i, hop in enumerate(plan):
                nursery.start_soon(open_one, i, hop)
        if failures:
            for conn in conns:
                if conn is not None:
                    await conn.close()
            first = min(failures, key=lambda f: f.index)
            for other in failures:  # every peer that failed is banned, not only the first
                if other is not first:
                    log.warning("pipeline %s", other)
                    self.ban(other.peer)
            raise first
        return [_HopState(c) for c in conns if c is not None]

    async def _note_failure(self, failure: _HopFailed) -> None:
        self.recoveries += 1
        log.warning("pipeline %s", failure)
        self.ban(failure.peer)
        if self.recoveries > self.config.max_recoveries:
            raise ShardFailed(f"gave up after {self.recoveries - 1} recoveries") from failure.cause

    # --- driving ---------------------------------------------------------------------

    async def extend(self, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        """Feed ``tokens`` after everything so far; the logits of the last one."""
        ids = np.asarray(tokens, dtype=np.int64)
        target = self.boundaries[0].length + ids.size
        if ids.size == 0 or target > self.config.max_length:
            raise ValueError(f"{target} positions do not fit max_length {self.config.max_length}")
        self.boundaries[0].write(self.boundaries[0].length, ids)
        while True:
            failure: _HopFailed | None = None
            try:
                await self._drive(target)
            except* _HopFailed as group:
                failure = min(_leaves(group), key=lambda f: f.index)
            if failure is None:
                assert self.last_logits is not None
                return self.last_logits
            await self._note_failure(failure)
            await self._replace(failure.index)

    async def _drive(self, target: int) -> None:
        if self._can_push(target):
            await self._push_step(target)  # relaying below finishes whatever it did not
            if all(h.done == target for h in self.hops):
                return  # every hop is done: no idle hop workers to start
        async with trio.open_nursery() as nursery:
            for k in range(len(self.hops)):
                nursery.start_soon(self._hop_worker, k, target)

    async def _hop_worker(self, k: int, target: int) -> None:
        hop, source = self.hops[k], self.boundaries[k]
        last = k == len(self.hops) - 1
        while hop.done < target:
            while source.length <= hop.done:
                await self._progress.wait()
            end = min(source.length, hop.done + self.config.chunk)
            x = source.read(hop.done, end)[None]
            try:
                top_k = self.config.logits_top_k if last else 0
                y = await hop.conn.step(x, hop.done, top_k=top_k)
            except HOP_ERRORS as exc:
                raise _HopFailed(k, hop.conn.peer, exc) from exc
            self._accept(k, y, hop.done, end, target)

    def _can_push(self, target: int) -> bool:
        return (
            self.push_ok
            and len(self.hops) > 1
            and all(h.done == target - 1 for h in self.hops)
            and all(h.conn.key for h in self.hops)  # a server without a key does not push
            # a server holding two consecutive ranges would push to itself: relay instead
            and all(a.conn.peer != b.conn.peer for a, b in itertools.pairwise(self.hops))
        )

    async def _push_step(self, target: int) -> None:
        """One new position through the chain, pushed server to server: send it to the
        first hop with the chain after it, then collect every hop's output (the client
        keeps each boundary's history for recovery)."""
        start, last = target - 1, len(self.hops) - 1
        top_k = self.config.logits_top_k
        fwd = tuple(
            codec.Forward(h.conn.peer, h.conn.session, h.conn.key, top_k if k == last else 0)
            for k, h in enumerate(self.hops)
            if k > 0
        )
        first = self.hops[0]
        try:
            y = await first.conn.step(self.boundaries[0].read(start, target)[None], start, fwd=fwd)
        except HOP_ERRORS as exc:
            raise _HopFailed(0, first.conn.peer, exc) from exc
        self._accept(0, y, start, target, target)
        for k in range(1, last + 1):
            hop = self.hops[k]
            mean = hop.conn.busy_seconds / hop.conn.steps if hop.conn.steps else 0.0
            grace = max(PUSH_GRACE_MIN_S, PUSH_GRACE_FACTOR * mean)
            try:
                out = await hop.conn.pushed(top_k if k == last else 0, within=grace)
            except HOP_ERRORS as exc:
                raise _HopFailed(k, hop.conn.peer, exc) from exc
            if out is None:
                self.push_ok = False
                log.info("no pushed output from hop %s in %.3g s; relaying from now on", k, grace)
                return
            self._accept(k, out, start, target, target)
        self.pushed_steps += 1

    def _accept(self, k: int, y: npt.NDArray[Any], start: int, end: int, target: int) -> None:
        """Hop ``k``'s output for positions ``start .. end``, checked and stored (the last
        hop's logits are kept when they are for ``target``, the end of this extend)."""
        hop, last = self.hops[k], k == len(self.hops) - 1
        problem = self._check_output(y, end - start, last)
        if problem:
            raise _HopFailed(k, hop.conn.peer, RemoteProtocolError(problem))
        if last:
            if end == target:
                self.last_logits = y[0]
            self.boundaries[k + 1].write(start, np.zeros(end - start, dtype=np.int8))
        else:
            self.boundaries[k + 1].write(start, y[0])
        hop.done = end
        self._progress.set()
        self._progress = trio.Event()

    def _check_output(self, y: npt.NDArray[Any], n: int, last: bool) -> str | None:
        if last:
            # -inf marks logits a top-k reply left out; NaN or +inf is garbage (and makes
            # the maximum NaN or +inf: one pass over the row)
            if y.ndim != 2 or y.shape[0] != 1 or not y.max(initial=-np.inf) < np.inf:
                return f"bad logits {y.dtype} {list(y.shape)}"
        elif y.ndim != 3 or y.shape[:2] != (1, n):
            return f"bad hidden states {y.dtype} {list(y.shape)} for {n} positions"
        return None

    async def _replace(self, index: int) -> None:
        """Swap hop ``index`` for a fresh chain over its blocks (or up to a later boundary)."""
        old = self.hops[index]
        await old.conn.abort()
        start = old.conn.layers.start
        ends = [h.conn.layers.end for h in self.hops[index:]]
        while True:
            plan: list[Hop] | None = None
            for j, end in enumerate(ends):
                try:
                    plan = await self._plan(start, end)
                except NoRoute:
                    continue
                last_replaced = index + j
                break
            if plan is None:
                raise ShardFailed(f"no server left for blocks {start}-{ends[-1]}")
            try:
                new = await self._open_chain(plan)
                break
            except _HopFailed as failure:
                await self._note_failure(failure)
        for gone in self.hops[index + 1 : last_replaced + 1]:
            await gone.conn.close()
        inner = [_History(self.config.max_length) for _ in new[:-1]]
        self.hops[index : last_replaced + 1] = new
        self.boundaries[index + 1 : last_replaced + 1] = inner
        log.info("pipeline replaced hop %s with %s", index, [str(h.layers) for h in plan])

    # --- generation ------------------------------------------------------------------

    async def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        eos_id: int | None = None,
        sampler: Sampler = greedy,
    ) -> list[int]:
        """Prefill ``prompt`` (pipelined in chunks), then decode token by token."""
        logits = await self.extend(prompt)
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = sampler(logits)
            out.append(token)
            if token == eos_id or len(out) == max_new_tokens:
                break
            logits = await self.extend([token])
        return out

    def hop_stats(self) -> list[dict[str, Any]]:
        """Per hop: peer, blocks, steps and mean seconds per step (for reports)."""
        return [
            {
                "peer": h.conn.peer,
                "layers": str(h.conn.layers),
                "steps": h.conn.steps,
                "mean_s": h.conn.busy_seconds / h.conn.steps if h.conn.steps else math.nan,
            }
            for h in self.hops
        ]


def _leaves(group: BaseExceptionGroup[_HopFailed]) -> list[_HopFailed]:
    found: list[_HopFailed] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        elif isinstance(exc, _HopFailed):
            found.append(exc)
    return found
