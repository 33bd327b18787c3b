"""What a sharded session's client keeps per chain: its settings, each boundary's
history (token ids, then every hop's hidden states, by position), and each hop's
connection and progress. Recovery replays from these histories. Pure: the client machine
(``client_machine.py``) decides with these, the trio driver (``client.py``) acts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from p2pedge.errors import Busy, PeerUnavailable, RemoteProtocolError, ShardFailed
from p2pedge.planning.routes import CostModel
from p2pedge.planning.slowdown import SlowdownPolicy
from p2pedge.planning.verification import VerifyPolicy

if TYPE_CHECKING:
    from p2pedge.protocols.pipeline.connection import ShardConnection

HOP_ERRORS = (PeerUnavailable, ShardFailed, RemoteProtocolError, Busy)


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
    # Prompts and decode steps go server to server (see `pushing.py`); replays are relayed.
    push: bool = True
    # Greedy decode goes round the chain without the client (see `codec.Ring`); needs push.
    ring: bool = True
    # Move off a hop whose decode steps turn slow mid-session (None: stay on the route).
    slowdown: SlowdownPolicy | None = field(default_factory=SlowdownPolicy)
    # Spot-check servers' outputs on replicas (see `verify.py`; None: trust them).
    verify: VerifyPolicy | None = None
    # The model's widths when the caller knows them (its facts); None pins the first seen.
    # A hop whose hidden states or logits have another width fails, so a wrong-width
    # output is blamed on the hop that made it, not on the hop it would break next.
    hidden_size: int | None = None
    vocab_size: int | None = None


class History:
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

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (values found wrong, to be redone)."""
        self.length = min(self.length, length)

    def read(self, start: int, end: int) -> npt.NDArray[Any]:
        assert self.data is not None
        return self.data[start:end]


@dataclass
class HopState:
    conn: ShardConnection  # its `machine` (hop_machine.HopMachine) holds its state
    done: int = 0  # positions of the input boundary this hop has consumed


class HopFailed(Exception):
    def __init__(self, index: int, peer: str, cause: BaseException) -> None:
        super().__init__(f"hop {index} ({peer}) failed: {cause}")
        self.index = index
        self.peer = peer
        self.cause = cause
        self.others: list[HopFailed] = []  # further hops that failed at the same time


def leaves(group: BaseExceptionGroup[HopFailed]) -> list[HopFailed]:
    found: list[HopFailed] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(leaves(exc))
        elif isinstance(exc, HopFailed):
            found.append(exc)
    return found


def check_output(y: npt.NDArray[Any], n: int, last: bool) -> str | None:
    """What is wrong with a hop's output for ``n`` positions, or None."""
    if last:
        # -inf marks logits a top-k reply left out; NaN or +inf is garbage (and makes
        # the maximum NaN or +inf: one pass over the row)
        if y.ndim != 2 or y.shape[0] != 1 or not y.max(initial=-np.inf) < np.inf:
            return f"bad logits {y.dtype} {list(y.shape)}"
    elif y.ndim != 3 or y.shape[:2] != (1, n):
        return f"bad hidden states {y.dtype} {list(y.shape)} for {n} positions"
    elif not np.isfinite(y).all():
        # blame stays with the hop that produced them: the next hop would only pass them on
        return f"non-finite hidden states for {n} positions"
    return None


def rollback(hops: Sequence[HopState], boundaries: Sequence[History], p: int, fed: int) -> None:
    """Forget every hop's output from position ``p`` on, and the tokens from ``fed`` on:
    driving again recomputes them (each step names its start, so servers rewind)."""
    boundaries[0].truncate(fed)
    for history in boundaries[1:]:
        history.truncate(p)
    for hop in hops:
        hop.done = min(hop.done, p)


def hop_stats(hops: list[HopState]) -> list[dict[str, Any]]:
    """Per hop: peer, blocks, steps and mean seconds per step (for reports)."""
    return [
        {
            "peer": h.conn.peer,
            "layers": str(h.conn.layers),
            "steps": h.conn.steps,
            "mean_s": h.conn.busy_seconds / h.conn.steps if h.conn.steps else math.nan,
        }
        for h in hops
    ]


def slow_hop(hops: Sequence[HopState]) -> int | None:
    """The first hop whose decode steps turned slow (``ClientConfig.slowdown``), if any."""
    for k, hop in enumerate(hops):
        if hop.conn.window is not None and hop.conn.window.slowed():
            return k
    return None
