"""Sans-IO client side of the pipeline protocol: what the client decides, with no I/O.

One session on one server is a :class:`~.hop_machine.HopMachine`.

:class:`ClientMachine` is one sequence across a chain of hops: positions per hop, each
boundary's history, which way the next positions go (relayed hop by hop, pushed server
to server, or round a ring), the ring's epoch, bans, and recovery (which hops a failure
replaces and which positions are replayed onto the new ones, so tokens come out the same).
The trio code (``client.py``, ``pushing.py``, ``connection.py``) carries out its
decisions; nothing here awaits, and callers pass ``now`` where time matters.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pedge.errors import LocalProtocolError, RemoteProtocolError, ShardFailed
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.chain import (
    ClientConfig,
    History,
    HopFailed,
    HopState,
    check_output,
)
from p2pedge.protocols.pipeline.hop_machine import KEPT_POSITIONS, HopMachine

# How long to wait for a pushed output before relaying that step instead: a multiple of
# the hop's mean step time, never under the floor.
PUSH_GRACE_FACTOR = 4.0
PUSH_GRACE_MIN_S = 1.0
RING_TOP_K = 1  # a ring's last server names its token; the client needs only the top-1


def pushes_to(peers: Sequence[str], successor: str, push: bool) -> list[str]:
    """Where each server of a chain over ``peers`` will push: the next one (the last to
    ``successor``), or nowhere when push is off or it would push to itself."""
    chain = [*peers, successor]
    return [b if push and b != a else "" for a, b in itertools.pairwise(chain)]


class ClientMachine:
    """One sequence across a chain of hops (see the module docstring). ``bans`` may be
    shared between sessions (a node's): peer -> (banned until, strikes)."""

    def __init__(
        self, config: ClientConfig, bans: dict[str, tuple[float, int]] | None = None
    ) -> None:
        self.config = config
        self.hops: list[HopState] = []
        self.boundaries: list[History] = []
        # where each hop's steps ended: a replay onto a replacement steps at the same
        # places, so it computes with the same batch shapes (kernels with 8-bit activations
        # round a batch differently from single steps) and the tokens come out the same
        self.cuts: list[list[int]] = []
        self.last_logits: npt.NDArray[np.float32] | None = None
        self.bans: dict[str, tuple[float, int]] = {} if bans is None else bans
        self.distrusted: set[str] = set()  # caught computing wrong: off routes for good
        self.recoveries = 0
        self.push_ok = config.push  # off for good once a pushed output fails to come
        self.ring_ok = config.ring and config.push  # off until a hop is replaced
        self.epoch = 0  # rings so far; steps carry it, servers refuse older pushes
        self.pushed_steps = 0
        self.pushed_chunks = 0
        self.ring_steps = 0  # tokens that came round a ring
        self.detections = 0
        self.widths = {"hidden": config.hidden_size, "vocab": config.vocab_size}

    # --- route, bans, recovery -------------------------------------------------------

    def banned(self, now: float) -> set[str]:
        live = {peer for peer, (until, _) in self.bans.items() if until > now}
        return live | self.distrusted

    def ban(self, peer: str, now: float) -> None:
        _, strikes = self.bans.get(peer, (0.0, 0))
        seconds = min(self.config.ban_seconds * 2**strikes, self.config.max_ban_seconds)
        self.bans[peer] = (now + seconds, strikes + 1)

    def failed(self, failure: HopFailed, now: float) -> None:
        """A hop failed (or could not open): ban its peer; past ``max_recoveries``, give up."""
        self.recoveries += 1
        self.ban(failure.peer, now)
        if self.recoveries > self.config.max_recoveries:
            raise ShardFailed(f"gave up after {self.recoveries - 1} recoveries") from failure.cause

    def started(self, hops: list[HopState]) -> None:
        self.hops = hops
        self.boundaries = [History(self.config.max_length) for _ in range(len(hops) + 1)]
        self.cuts = [[] for _ in hops]
        self._keep_evidence(hops)

    def _keep_evidence(self, hops: list[HopState]) -> None:
        """Signed outputs are kept as evidence only where checks may need them."""
        for hop in hops:
            hop.conn.machine.keep = KEPT_POSITIONS if self.config.verify is not None else 0

    def replaceable(self, index: int) -> tuple[int, list[int]]:
        """Hop ``index``'s first block, and the block ends a replacement chain may stop at
        (its own end, or a later hop's, replacing those hops too)."""
        return self.hops[index].conn.machine.layers.start, [
            h.conn.machine.layers.end for h in self.hops[index:]
        ]

    def successor(self, first: int, last: int, plan_first: str) -> str:
        """Where the last server of a chain replacing ``hops[first..last]`` will push: the
        hop after them, or round a ring the chain's first server ('' when it will not)."""
        if last + 1 < len(self.hops):
            return self.hops[last + 1].conn.machine.peer
        if not self.config.ring:
            return ""
        return self.hops[0].conn.machine.peer if first > 0 else plan_first

    def replaced(self, first: int, last: int, new: list[HopState]) -> list[HopState]:
        """``new`` in place of ``hops[first..last]``, each at position 0 with empty inner
        boundaries: driving again replays :meth:`replay` onto them. Returns the old hops."""
        old = self.hops[first : last + 1]
        self.hops[first : last + 1] = new
        if len(new) != len(old):  # other ranges: each new hop steps where the first did
            self.cuts[first : last + 1] = [list(self.cuts[first]) for _ in new]
        self._keep_evidence(new)
        inner = [History(self.config.max_length) for _ in new[:-1]]
        self.boundaries[first + 1 : last + 1] = inner
        self.ring_ok = self.config.ring and self.config.push  # a new chain: try again
        return old

    def replay(self, k: int) -> tuple[int, int]:
        """The positions hop ``k`` has yet to consume of what its input boundary holds."""
        return self.hops[k].done, self.boundaries[k].length

    # --- feeding and driving ---------------------------------------------------------

    def feed(self, tokens: Sequence[int]) -> int:
        """Store ``tokens`` after everything fed so far; the position to drive through."""
        ids = np.asarray(tokens, dtype=np.int64)
        at = self.boundaries[0].length
        target = at + ids.size
        if ids.size == 0 or target > self.config.max_length:
            raise ValueError(f"{target} positions do not fit max_length {self.config.max_length}")
        self.boundaries[0].write(at, ids)
        return target

    def settled(self, target: int) -> bool:
        return all(h.done >= target for h in self.hops)

    def relay_next(self, k: int, target: int) -> tuple[int, int] | None:
        """The positions hop ``k`` should be relayed next on the way to ``target`` (at
        most a chunk), or None while its input has nothing new for it."""
        hop, source = self.hops[k], self.boundaries[k]
        if hop.done >= target:
            raise LocalProtocolError(f"hop {k} is already through position {target}")
        if source.length <= hop.done:
            return None
        end = min(source.length, hop.done + self.config.chunk)
        cuts = self.cuts[k]
        later = bisect.bisect_right(cuts, hop.done)
        if later < len(cuts):  # a replay: end where this hop's step ended before
            end = min(end, cuts[later])
        return hop.done, end

    def step_input(self, k: int, start: int, end: int) -> npt.NDArray[Any]:
        return self.boundaries[k].read(start, end)[None]

    def top_k(self, k: int) -> int:
        return self.config.logits_top_k if k == len(self.hops) - 1 else 0

    def accept(self, k: int, y: npt.NDArray[Any], start: int, end: int, target: int) -> None:
        """Hop ``k``'s output for positions ``start .. end``, checked and stored (the last
        hop's logits are kept when they are for ``target``); a bad one fails the hop."""
        hop, last = self.hops[k], k == len(self.hops) - 1
        if start != hop.done or end <= start:
            raise LocalProtocolError(f"hop {k} is at {hop.done}, not {start}..{end}")
        problem = check_output(y, end - start, last) or self._check_width(y, last)
        if problem:
            raise HopFailed(k, hop.conn.machine.peer, RemoteProtocolError(problem))
        if last:
            if end == target:
                self.last_logits = y[0]
            self.boundaries[k + 1].write(start, np.zeros(end - start, dtype=np.int8))
        else:
            self.boundaries[k + 1].write(start, y[0])
        hop.done = end
        cuts = self.cuts[k]
        if not cuts or end > cuts[-1]:
            cuts.append(end)
        elif cuts[bisect.bisect_left(cuts, end)] != end:
            bisect.insort(cuts, end)

    def _check_width(self, y: npt.NDArray[Any], last: bool) -> str | None:
        """Every hop's hidden states share one width, and logits one vocabulary."""
        kind = "vocab" if last else "hidden"
        width, pinned = int(y.shape[-1]), self.widths[kind]
        if pinned is None:
            self.widths[kind] = width
        elif width != pinned:
            return f"{kind} width {width}, the chain's is {pinned}"
        return None

    def chain_pushes(self, *, ring: bool = False) -> bool:
        """Every server can push to the next (and round a ring, the last to the first)."""
        machines = [h.conn.machine for h in self.hops]
        chain = machines + machines[:1] if ring else machines
        return (
            len(machines) > 1
            and all(m.key for m in machines)  # a server without a key does not push
            # a server holding two consecutive ranges would push to itself: relay instead
            and all(a.peer != b.peer for a, b in itertools.pairwise(chain))
        )

    def can_push(self, target: int) -> bool:
        """Every hop is at the same position short of ``target`` and the chain pushes."""
        at = self.hops[0].done
        return (
            self.push_ok
            and at < target
            and all(h.done == at for h in self.hops)
            and self.chain_pushes()
        )

    def can_ring(self) -> bool:
        """Every hop has consumed every fed token and the chain pushes round."""
        at = self.boundaries[0].length
        return (
            self.ring_ok
            and not self.detections  # stale ring outputs could pass for redone positions
            and all(h.done == at for h in self.hops)
            and self.chain_pushes(ring=True)
        )

    def forwards(self, last_top_k: int) -> tuple[codec.Forward, ...]:
        """Every hop as a push target; the last one sends ``last_top_k`` logits."""
        last = len(self.hops) - 1
        return tuple(
            codec.Forward(m.peer, m.session, m.key, last_top_k if k == last else 0)
            for k, m in enumerate(h.conn.machine for h in self.hops)
        )

    def chunks(self, target: int) -> list[tuple[int, int]]:
        """A pushed prompt's chunks, from where every hop is up to ``target``."""
        start, size = self.hops[0].done, self.config.chunk
        return [(a, min(a + size, target)) for a in range(start, target, size)]

    @staticmethod
    def grace(machines: Sequence[HopMachine], floor_s: float = 0.0) -> float:
        """How long to wait for an output that needs these hops' steps before giving up
        on it: a multiple of their mean step times (or ``floor_s``), never under the floor."""
        means = sum(m.busy_seconds / m.steps for m in machines if m.steps)
        return max(PUSH_GRACE_MIN_S, PUSH_GRACE_FACTOR * max(means, floor_s))

    def pushed_late(self) -> None:
        """A pushed output did not come in time: relay from now on."""
        self.push_ok = False

    # --- the ring --------------------------------------------------------------------

    def ring_begin(self, token: int, n: int, eos_id: int | None, spec: Any) -> codec.Ring:
        """Feed ``token`` and describe a ring of up to ``n`` tokens for the first step."""
        at = self.boundaries[0].length
        self.boundaries[0].write(at, np.array([token], dtype=np.int64))
        eos = codec.NO_EOS if eos_id is None else eos_id
        return codec.Ring(self.forwards(RING_TOP_K), n, eos, spec)

    def ring_token(self, greedy: bool) -> int:
        """The token the last server says it picked; for greedy, its top-1 (checked)."""
        last = self.hops[-1].conn.machine
        token = last.last_token
        mismatch = (
            greedy and self.last_logits is not None and token != int(np.argmax(self.last_logits))
        )
        if token is None or mismatch:
            problem = f"ring step answered with token {token}, not the greedy pick"
            raise HopFailed(len(self.hops) - 1, last.peer, RemoteProtocolError(problem))
        self.ring_steps += 1
        return token

    def ring_feed(self, at: int, token: int) -> None:
        """A ring token the ring goes on with: it is fed at ``at``."""
        self.boundaries[0].write(at, np.array([token], dtype=np.int64))

    def ring_end(self, *, late: bool = False) -> None:
        """Whatever is still going round is stale from here on; a late output ends rings
        for this chain."""
        self.epoch += 1
        if late:
            self.ring_ok = False
