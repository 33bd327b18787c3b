"""Sans-IO client side of one pipeline session on one server (:class:`HopMachine`).

It holds the request in flight and the reply it expects, and types what comes back: a
reply that does not match the pending request, names another session or has the wrong
shape is the server's fault (:class:`~p2pedge.errors.RemoteProtocolError`); a request
made while one is pending, or a push without a key, is ours
(:class:`~p2pedge.errors.LocalProtocolError`). Signed outputs are checked against the
server's peer id and kept, bounded, as evidence. :mod:`.client_machine` drives one
sequence across a chain of these; nothing here awaits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from p2pedge.errors import Busy, LocalProtocolError, RemoteProtocolError, ShardFailed
from p2pedge.ids import LayerRange
from p2pedge.planning.slowdown import StepWindow
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.attest import output_digest, reply_digest, signature_ok
from p2pedge.records.peer_ids import ed25519_from_peer_id

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
