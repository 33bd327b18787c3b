"""Fault injectors for hostile shard servers (tests and benchmarks only).

:class:`CorruptingShard` wraps a real :class:`PipelineServer`'s step and returns wrong
but plausible results on the steps its :class:`Corruption` pattern picks: finite noise
on hidden states, or a last shard naming the wrong token. It only injects the fault; the
real server does everything else (sessions, push, ring). :func:`trial` runs one
generation against one and says when it was caught (for ``benchmarks/hostile.py``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from p2pedge.planning.routes import Hop, ServerOption
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.pipeline.actions import Run
from p2pedge.protocols.pipeline.client import ClientConfig, ShardedSession
from p2pedge.protocols.pipeline.handler import PipelineServer, StepResult
from p2pedge.protocols.pipeline.serving import LANE_OPEN_TIMEOUT, PipelineNode, swarm_options
from p2pedge.runtime.shard_session import ShardSession


@dataclass(frozen=True)
class Corruption:
    """Which steps to corrupt and how.

    ``every``: 1 corrupts every step, ``n`` every ``n``-th step the server runs (counted
    over all its sessions). ``sessions``: corrupt only in these sessions, numbered by
    the order the server first ran a step of them (None: all). ``nan``: NaN instead of
    noise (hidden states only). ``after``: leave the first ``after`` steps alone.
    """

    every: int = 1
    sessions: frozenset[int] | None = None
    nan: bool = False
    after: int = 0
    scale: float = 1.0  # noise, in units of the output's standard deviation
    seed: int = 0


@dataclass
class CorruptingShard:
    """Fault injection: ``server``'s steps corrupted as ``pattern`` says, once ``on``."""

    server: PipelineServer
    pattern: Corruption = field(default_factory=Corruption)
    on: bool = True
    steps: int = 0
    corrupted: list[float] = field(default_factory=list)  # trio time of each corruption
    _sessions: dict[int, int] = field(default_factory=dict)  # id(ShardSession) -> number
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.pattern.seed)
        self._run_step = self.server.run_step
        self.server.run_step = self._step  # type: ignore[method-assign]

    def restore(self) -> None:
        self.server.run_step = self._run_step  # type: ignore[method-assign]

    def corrupted_before(self, when: float) -> int:
        return sum(1 for t in self.corrupted if t <= when)

    def _picks(self, session: ShardSession) -> bool:
        number = self._sessions.setdefault(id(session), len(self._sessions))
        self.steps += 1
        p = self.pattern
        if not self.on or self.steps <= p.after:
            return False
        if p.sessions is not None and number not in p.sessions:
            return False
        return (self.steps - p.after) % p.every == 0

    async def _step(self, session: ShardSession, action: Run) -> StepResult:
        y, ids, token = await self._run_step(session, action)
        if not self._picks(session):
            return y, ids, token
        self.corrupted.append(trio.current_time())
        if ids is None and not session.model.info.last:
            return self._hidden(np.asarray(y)), ids, token
        return self._logits(y, ids, token, session.model.info.vocab or 1)

    def _hidden(self, y: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if self.pattern.nan:
            return np.full_like(y, np.nan)
        spread = float(np.std(y.astype(np.float32))) or 1.0
        noise = np.random.default_rng(self._rng.getrandbits(32)).standard_normal(y.shape)
        out: np.ndarray[Any, Any] = y.astype(np.float32) + self.pattern.scale * spread * noise
        return out.astype(y.dtype)

    def _logits(self, y: Any, ids: Any, token: int | None, vocab: int) -> StepResult:
        """A last shard: every named id moved by one, the picked token with them."""
        if ids is None:  # all logits: roll them, so the best one names another token
            return np.roll(np.asarray(y), 1, axis=-1), None, token
        moved = (np.asarray(ids) + 1) % vocab
        return y, moved.astype(np.int64), None if token is None else (token + 1) % vocab


async def open_route(
    node: PipelineNode,
    model: str,
    n_layers: int,
    route: Sequence[Hop],
    config: ClientConfig,
    bans: dict[str, tuple[float, int]] | None = None,
) -> ShardedSession:
    """A started session on exactly ``route`` (``open_sharded_session`` lets route choice
    pick), so that a test or benchmark can put a hostile server on it."""

    def opener(peer: str, protocol: str) -> Awaitable[FramedStream]:
        return node.lanes.open(peer, protocol, timeout=LANE_OPEN_TIMEOUT)

    async def find() -> list[ServerOption]:
        return await swarm_options(node, model)

    session = ShardedSession(opener, find, model, n_layers, config, bans=bans)
    await session.start(route)
    return session


@dataclass(frozen=True)
class Trial:
    """One generation against a corrupting server: the tokens, whether a check caught it,
    how many corrupted steps it had computed by then (all of them if never caught), and
    the wall time per token."""

    tokens: list[int]
    detected: bool
    corrupted_before_ban: int
    corrupted: int
    seconds_per_token: float


async def trial(
    node: PipelineNode,
    model: str,
    n_layers: int,
    route: Sequence[Hop],
    config: ClientConfig,
    prompt: Sequence[int],
    n: int,
    shard: CorruptingShard | None = None,
    bans: dict[str, tuple[float, int]] | None = None,
) -> Trial:
    """Generate ``n`` tokens greedily on ``route``, against ``shard`` if one is given
    (its count of corruptions starts from zero here). For ``benchmarks/hostile.py``."""
    if shard is not None:
        shard.corrupted.clear()
    async with await open_route(node, model, n_layers, route, config, bans) as session:
        began = time.perf_counter()
        tokens = await session.generate(prompt, n)
        took = (time.perf_counter() - began) / max(len(tokens), 1)
        evidence = session.audits.evidence if session.audits is not None else []
    corrupted = len(shard.corrupted) if shard is not None else 0
    caught = corrupted
    if evidence and shard is not None:
        caught = shard.corrupted_before(evidence[0].found_at)
    return Trial(tokens, bool(evidence), caught, corrupted, took)
