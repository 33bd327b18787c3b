"""What the pipeline server's sans-IO machine asks its caller to do (pure data).

:class:`~.machine.ServerMachine` returns these :data:`Action` values; the trio handler
carries them out (send a reply, create or free an executor session, run a step) and, for
a finished step, :func:`onward` says where its output is pushed next (:class:`Push`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pedge.ids import LayerRange
from p2pedge.protocols.pipeline import codec


@dataclass(frozen=True)
class Send:
    reply: codec.Reply


@dataclass(frozen=True)
class Allocate:
    """Create the executor session; then call :meth:`ServerMachine.ready` or ``failed``."""

    session: int
    model: str
    layers: LayerRange
    max_length: int
    warm: str = ""  # the peer this session will push to: open that stream ahead of time


@dataclass(frozen=True, eq=False)
class Run:
    """Run one step on the executor session (after rewinding it to ``start``)."""

    session: int
    rid: int
    start: int
    x: npt.NDArray[Any]
    last_only: bool
    top_k: int = 0
    fwd: tuple[codec.Forward, ...] = ()  # push the output on to these (not from a last shard)
    ring: codec.Ring | None = None  # goes along with the pushes; a last shard continues it
    epoch: int = 0
    peer: str = ""  # the session's owner and its source address: whose turn the step takes
    source: str = ""


@dataclass(frozen=True)
class Release:
    """Free the executor session's KV cache."""

    session: int


Action = Send | Allocate | Run | Release


@dataclass(frozen=True, eq=False)
class Push:
    """Hand a finished step's output on as the next server's step (see ``push.py``)."""

    fwd: tuple[codec.Forward, ...]
    start: int
    x: npt.NDArray[Any]
    ring: codec.Ring | None
    epoch: int
    ring_token: bool = False  # a ring's last shard sending the token it picked round


def onward(run: Run, y: npt.NDArray[Any], token: int | None) -> Push | None:
    """Where a finished step's output goes next: on down its forward chain, or from a
    ring's last shard, the token it picked to the ring's head (unless that was the ring's
    last token or end of sequence); None when it goes nowhere."""
    if run.fwd:
        return Push(run.fwd, run.start, y, run.ring, run.epoch)
    ring = run.ring
    if ring is None or token is None or ring.left <= 1 or token == ring.eos:
        return None
    x = np.array([[token]], dtype=np.int64)
    return Push(ring.chain, run.start + int(run.x.shape[1]), x, ring.then(), run.epoch, True)
