"""Sans-IO client side of the pipeline protocol: what the client decides, with no I/O.

:class:`HopMachine` is one session on one server: the request in flight and the reply it
expects, and the typing of what comes back (a reply that does not match the pending
request, or names another session, or has the wrong shape, is the server's fault:
:class:`~p2pedge.errors.RemoteProtocolError`; a request made while one is pending, or a
push without a key, is ours: :class:`~p2pedge.errors.LocalProtocolError`).

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
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pedge.errors import Busy, LocalProtocolError, RemoteProtocolError, ShardFailed
from p2pedge.ids import LayerRange
from p2pedge.planning.slowdown import StepWindow
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.attest import output_digest, reply_digest, signature_ok
from p2pedge.protocols.pipeline.chain import (
    ClientConfig,
    History,
    HopFailed,
    HopState,
    check_output,
)
from p2pedge.records.peer_ids import ed25519_from_peer_id

# How long to wait for a pushed output before relaying that step instead: a multiple of
# the hop's mean step time, never under the floor.
PUSH_GRACE_FACTOR = 4.0
PUSH_GRACE_MIN_S = 1.0
RING_TOP_K = 1  # a ring's last server names its token; the client needs only the top-1
KEPT_POSITIONS = 1024  # signed outputs kept per hop for evidence, counted in positions


def error_to_exception(err: codec.Error, peer: str) -> Exception:
    """A server's error reply as our typed error (a refusal for budget is :class:`Busy`)."""
    text = f"{peer}: {err.code}: {err.message}"
    if err.code == codec.E_BUDGET:
        return Busy(text, limit=err.limit, scope=err.scope)
    if err.code == codec.E_BAD_REQUEST:
        return LocalProtocolError(text)
    return ShardFailed(text)


@dataclass(frozen=True, eq=False)
class Signed:
    """A signed output as received, for positions ``start .. end`` (kept for evidence)."""

    start: int
    end: int
    reply: codec.Output


@dataclass(frozen=True)
class Expect:
    """The request in flight on a hop and the reply type it is owed."""

    rid: int
    reply: type[codec.Opened] | type[codec.Output] | type[codec.Closed]


class HopMachine:
    """One session on ``peer`` for blocks ``layers``: request ids, the pending request,
    the session's id and push key, its step times (for grace times and slowdowns), and
    its signed outputs (checked on receipt, the latest kept as evidence)."""

    def __init__(self, peer: str, layers: LayerRange) -> None:
        self.peer = peer
        self.layers = layers
        self.model = ""
        self.session = 0
        self.key = b""  # the session's push key: other servers may push steps into it
        self.pending: Expect | None = None  # a cancelled request's reply is drained first
        self._rid = 0
        self.steps = 0
        self.busy_seconds = 0.0
        self.decode_steps = 0  # one-position steps and their seconds, send to output
        self.decode_seconds = 0.0
        self.window: StepWindow | None = None  # decode-step times, to spot a slowdown
        self.last_token: int | None = None  # the token named by the last output, if any
        self.signs: bool | None = None  # whether the server signs (fixed by its first output)
        self.signed: deque[Signed] = deque()  # latest signed outputs, ``keep`` positions at most
        self.keep = KEPT_POSITIONS  # 0 where nothing checks the outputs (no evidence to keep)
        self._kept = 0
        self._public: bytes | None = None
        self._start = 0  # where the step in flight starts

    def _request(self, reply: type[codec.Opened] | type[codec.Output] | type[codec.Closed]) -> int:
        if self.pending is not None:
            raise LocalProtocolError(f"request {self.pending.rid} to {self.peer} still pending")
        self._rid += 1
        self.pending = Expect(self._rid, reply)
        return self._rid

    def open(
        self, model: str, max_length: int, dtype: str = "float32", pushes_to: str = ""
    ) -> codec.Open:
        rid = self._request(codec.Opened)
        self.model = model
        start, end = self.layers.start, self.layers.end
        return codec.Open(rid, model, start, end, max_length, dtype, pushes_to)

    def step(
        self,
        x: npt.NDArray[Any],
        start: int,
        *,
        top_k: int = 0,
        fwd: tuple[codec.Forward, ...] = (),
        ring: codec.Ring | None = None,
        epoch: int = 0,
    ) -> codec.Step:
        if not self.session:
            raise LocalProtocolError(f"no open session on {self.peer} to step")
        rid = self._request(codec.Output)
        self._start = start
        return codec.Step(rid, self.session, start, x, top_k, fwd, ring=ring, epoch=epoch)

    def push(
        self,
        x: npt.NDArray[Any],
        start: int,
        fwd: tuple[codec.Forward, ...],
        epoch: int,
        *,
        top_k: int = 0,
    ) -> codec.Step:
        """A step into our own session the way another server would push one (with the
        session's key, ``rid`` 0, no reply awaited: its output comes as a pushed one)."""
        if not self.key:
            raise LocalProtocolError(f"{self.peer} gave no push key for session {self.session}")
        return codec.Step(0, self.session, start, x, top_k, fwd, self.key, epoch=epoch)

    def close(self) -> codec.Close:
        rid = self._request(codec.Closed)
        return codec.Close(rid, self.session)

    def receive(self, msg: codec.Message, *, abandoned: bool = False) -> codec.Message | None:
        """The reply to the pending request, checked; None for a message to skip (a reply
        to an earlier request, a pushed output). An error reply raises as typed, unless
        the pending request is ``abandoned`` (given up on: its error no longer matters)."""
        expect = self.pending
        if expect is None:
            raise LocalProtocolError(f"no request to {self.peer} is pending")
        if msg.rid == expect.rid:
            self.pending = None
            if isinstance(msg, codec.Error):
                if abandoned:
                    return None
                raise error_to_exception(msg, self.peer)
            if not isinstance(msg, expect.reply):
                raise RemoteProtocolError(f"{self.peer} answered request {msg.rid} with {msg!r}")
            if isinstance(msg, codec.Opened):
                self.session, self.key = msg.session, msg.key
            elif getattr(msg, "session", None) != self.session:
                raise RemoteProtocolError(f"{self.peer} answered for session {msg!r}")
            return msg
        if msg.rid > expect.rid:
            raise RemoteProtocolError(f"{self.peer} answered unknown request {msg.rid}")
        if isinstance(msg, codec.Error) and msg.rid == 0:
            raise error_to_exception(msg, self.peer)
        return None

    def receive_pushed(self, msg: codec.Message, start: int) -> codec.Output | None:
        """A pushed output (``rid`` 0) for position ``start``, or None for a message to
        skip: a reply to an earlier request (which settles it), a stale pushed output."""
        if msg.rid == 0:
            if isinstance(msg, codec.Error):
                raise error_to_exception(msg, self.peer)
            if not isinstance(msg, codec.Output) or msg.session != self.session:
                raise RemoteProtocolError(f"{self.peer} pushed {msg!r}")
            if msg.at != start:
                return None  # a stale output: its step was relayed since
            return msg
        if msg.rid > self._rid:
            raise RemoteProtocolError(f"{self.peer} answered unknown request {msg.rid}")
        if self.pending is not None and msg.rid == self.pending.rid:
            self.pending = None
        return None

    def output(
        self, reply: codec.Message, top_k: int, took: float | None, positions: int
    ) -> npt.NDArray[Any]:
        """A step's output; with ``top_k`` on a last shard, full-width logits rebuilt from
        the top-k the server sent. ``took`` (None: not timed) goes into the step times."""
        if not isinstance(reply, codec.Output) or reply.session != self.session:
            raise RemoteProtocolError(f"{self.peer} answered a step with {reply!r}")
        self._check_signed(reply, positions)
        self.last_token = reply.token
        if took is not None:
            self.steps += 1
            self.busy_seconds += took
            if positions == 1:
                self.decode_steps += 1
                self.decode_seconds += took
                if self.window is not None:
                    self.window.add(took)
        if reply.ids is not None:
            if not top_k or reply.ids.shape[1] > top_k:
                raise RemoteProtocolError(f"{self.peer} sent {reply.ids.shape[1]} top logits")
            return codec.full_logits(reply.y, reply.ids, reply.vocab)
        return reply.y

    def _check_signed(self, reply: codec.Output, positions: int) -> None:
        """A server that signs must sign every output, over exactly what it sent; a bad or
        missing signature fails the hop (:class:`RemoteProtocolError`)."""
        signs = bool(reply.sig)
        if self.signs is None:
            self.signs = signs
        if not signs:
            if self.signs:
                raise RemoteProtocolError(f"{self.peer} stopped signing its outputs")
            return
        if not self.signs:
            raise RemoteProtocolError(f"{self.peer} signed an output after sending unsigned")
        start = reply.at if reply.at is not None else self._start
        out = output_digest(reply.y, reply.ids, reply.vocab, reply.token)
        digest = reply_digest(reply.chain, start, start + positions, out)
        if not signature_ok(self._public_key(), digest, reply.sig):
            raise RemoteProtocolError(f"{self.peer}'s signature does not match its output")
        if not self.keep:
            return
        self.signed.append(Signed(start, start + positions, reply))
        self._kept += positions
        while self._kept > self.keep and len(self.signed) > 1:
            old = self.signed.popleft()
            self._kept -= old.end - old.start

    def _public_key(self) -> bytes:
        if self._public is None:
            try:
                self._public = ed25519_from_peer_id(self.peer)
            except ValueError as exc:
                raise RemoteProtocolError(f"{self.peer} signs but has no ed25519 id") from exc
        return self._public

    def signed_at(self, position: int) -> Signed | None:
        """The latest signed output covering ``position``, if still kept."""
        for entry in reversed(self.signed):
            if entry.start <= position < entry.end:
                return entry
        return None


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
