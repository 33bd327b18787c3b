"""Limits of a pipeline server: what one peer, one source address and everyone together
may hold (sessions, KV bytes, queued steps), and the accounts that enforce them.

Pure: the machine charges sessions when it opens them; the handler charges queued steps.
A refusal is :class:`~p2pedge.errors.Busy` naming the limit, answered on the wire as a
``budget`` error carrying the limit and the scope.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pedge.errors import Busy, LocalProtocolError
from p2pedge.protocols.pipeline import codec
from p2pedge.quota import Grant, Limit, Quota

DEFAULT_MAX_STEP_TOKENS = 2048
DEFAULT_STEP_CHUNK = 32  # positions per turn for the compute thread (0: whole steps)
DEFAULT_SESSION_LIMIT = Limit(per_peer=8, per_source=16, total=256)
DEFAULT_QUEUED_STEPS = Limit(per_peer=8, per_source=16, total=128)


@dataclass(frozen=True)
class PipelineLimits:
    """What one peer, one source address and the whole server may hold of a pipeline
    server. Sessions and KV bytes are held while a session is open; a queued step from
    the moment its request is taken in until it is computed. KV shares are fractions of
    the server's KV budget. Sources get more than peers (a household behind one address)
    but minting peer ids never gets one address more than its source share.

    ``step_chunk`` is how many positions of a long step run per turn for the compute
    thread (other peers' steps run between its chunks; 0 runs whole steps); a peer or source that
    has spent over half of ``compute_burst`` lately gets its chunks run at
    ``long_step_nice`` lower CPU priority (Linux; 0: never).
    ``max_warming`` bounds the push streams being opened ahead of time (each is a dial to
    a peer a client named); ``max_push_streams`` the push streams kept open.

    ``compute_rate_*`` are the positions per second one peer and one source address may
    have computed after a burst of ``compute_burst`` (:class:`~.fair.ComputePacer`): a
    step past its share waits, it is not refused. The burst covers a long prompt; the rates
    cover decoding many sessions at once."""

    sessions: Limit = DEFAULT_SESSION_LIMIT
    kv_peer_share: float = 0.5
    kv_source_share: float = 0.75
    queued_steps: Limit = DEFAULT_QUEUED_STEPS
    max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS
    step_chunk: int = DEFAULT_STEP_CHUNK
    long_step_nice: int = 10
    max_warming: int = 16
    max_push_streams: int = 64
    compute_rate_peer: float = 256.0
    compute_rate_source: float = 512.0
    compute_burst: float = 1024.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.kv_peer_share <= 1.0 and 0.0 <= self.kv_source_share <= 1.0):
            raise LocalProtocolError(f"KV shares must be fractions in [0, 1]: {self}")
        if min(self.compute_rate_peer, self.compute_rate_source, self.compute_burst) <= 0:
            raise LocalProtocolError(f"compute rates and burst must be positive: {self}")
        if self.step_chunk < 0 or not 0 <= self.long_step_nice <= 19:
            raise LocalProtocolError(f"step_chunk must be >= 0 and nice in [0, 19]: {self}")
        if min(self.max_step_tokens, self.max_warming, self.max_push_streams) < 1:
            raise LocalProtocolError(f"step tokens and push streams must be >= 1: {self}")


class PipelineQuotas:
    """The server-wide accounts behind :class:`PipelineLimits` (one per server)."""

    def __init__(self, limits: PipelineLimits, budget_bytes: int) -> None:
        self.limits = limits
        self.sessions = Quota("pipeline.sessions", limits.sessions)
        kv = Limit(
            int(budget_bytes * limits.kv_peer_share),
            int(budget_bytes * limits.kv_source_share),
            budget_bytes,
        )
        self.kv_bytes = Quota("pipeline.kv_bytes", kv)
        self.queued_steps = Quota("pipeline.queued_steps", limits.queued_steps)

    def open(self, peer: str, source: str, kv_bytes: int) -> tuple[Grant, Grant]:
        """Charge a session and its KV bytes, or raise :class:`Busy` having charged neither."""
        session = self.sessions.acquire(peer, source)
        try:
            return session, self.kv_bytes.acquire(peer, source, kv_bytes)
        except Busy:
            self.sessions.release(session)
            raise

    def close(self, grants: tuple[Grant, Grant]) -> None:
        self.sessions.release(grants[0])
        self.kv_bytes.release(grants[1])


def kv_budget_bytes(memory_left: int) -> int:
    """The KV budget a memory-budgeted server keeps: what its loaded weights leave of its
    budget. Every session's KV bytes are charged against it when the session opens, so a
    session that would overflow the budget is refused with :class:`Busy` (``budget``)."""
    if memory_left < 0:
        raise LocalProtocolError(f"weights already exceed the memory budget by {-memory_left} B")
    return memory_left


def refusal(rid: int, busy: Busy) -> codec.Error:
    """The wire answer to a quota's refusal: it names the limit and the scope."""
    return codec.Error(rid, codec.E_BUDGET, str(busy)[: codec.MAX_TEXT], busy.limit, busy.scope)
