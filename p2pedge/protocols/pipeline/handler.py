"""Trio glue for the pipeline server: streams in, machine decisions, onnxruntime steps out.

:class:`PipelineServer` owns the loaded shards and the KV budget shared by all streams.
Each stream gets its own :class:`ServerMachine`; a bad message is answered with a typed
error and the stream goes on, an oversized frame or a vanished peer ends only that
stream (its sessions are freed), never the server or other streams.

Steps run in worker threads so the node keeps serving while onnxruntime computes; they
wait for a thread fairly by source address, then peer, charged the positions they compute
(``fair.FairLimiter``). Long steps take their turns ``step_chunk`` positions at a time;
one-position (decode) steps have a lane of their own beside them, fair between peers too,
so a client's decode step never waits for another peer's prompt chunk (a chunk costs
several decode steps). The long steps of a peer (or source) that has spent over half its
compute burst lately run at a lowered CPU priority (``PipelineLimits.long_step_nice``),
so that on a machine whose cores other hops need too a flood of long steps takes only the
CPU nothing else wants, while a client's prompt within its share runs at full priority.
A decode step whose recent cost is within ``inline_step_s`` runs on the trio thread
instead when no other step is running or queued (``runtime.inline.StepCosts``).

Hostile peers meet :class:`~p2pedge.protocols.pipeline.limits.PipelineLimits`: sessions,
KV bytes and queued steps are charged to the peer id, its source address and the total,
and a refusal names the limit (a ``budget`` error, which clients read as ``Busy``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from p2pedge.errors import (
    Busy,
    FrameTooLarge,
    LocalProtocolError,
    PeerUnavailable,
    RemoteProtocolError,
    ShardFailed,
)
from p2pedge.ids import LayerRange
from p2pedge.protocols._stream import FramedStream, QuickLock
from p2pedge.protocols.host import Serves
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.actions import Action, Allocate, Release, Run, Send, onward
from p2pedge.protocols.pipeline.attest import (
    InputChain,
    Signer,
    chain_seed,
    output_digest,
    reply_digest,
)
from p2pedge.protocols.pipeline.fair import ComputePacer, FairLimiter, run_niced
from p2pedge.protocols.pipeline.limits import PipelineLimits, PipelineQuotas
from p2pedge.protocols.pipeline.machine import (
    DEFAULT_FIRST_STEP_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    KvBudget,
    ServerMachine,
    ShardSpec,
)
from p2pedge.protocols.pipeline.push import Pusher
from p2pedge.protocols.pipeline.sampling import pick
from p2pedge.runtime.inline import DEFAULT_INLINE_STEP_S, StepCosts
from p2pedge.runtime.shard_session import ShardModel, ShardSession

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 1 << 30
StreamHandler = Callable[[FramedStream, str], Awaitable[None]]
# a step's output (or top-k logits), top-k ids, and the token a ring's last shard picked
StepResult = tuple[Any, npt.NDArray[np.int64] | None, int | None]
SIGN_INLINE_BYTES = 1 << 16  # hash and sign bigger steps in a worker thread


NodeLike = Serves  # the old name; the host protocols live in p2pedge.protocols.host


def spec_of(model: ShardModel, max_length: int) -> ShardSpec:
    """The machine's view of a shard; sessions never outgrow the model's context."""
    info = model.info
    max_length = min(max_length, model.context_length or max_length)
    return ShardSpec(
        first=info.first,
        last=info.last,
        hidden=info.hidden,
        vocab=info.vocab or 0,
        kv_bytes_per_token=info.kv_bytes_per_token,
        max_length=max_length,
    )


class PipelineServer:
    """Serves loaded shards on ``/p2pedge/pipeline/1.0.0``.

    ``shards`` maps ``(model name, block range)`` to a loaded :class:`ShardModel`.
    ``offload=False`` runs onnxruntime on the trio thread (deterministic tests with a
    mock clock); otherwise steps run in worker threads, ``max_parallel`` at a time,
    except short decode steps on an idle server (``inline_step_s``, see the module
    docstring; 0 turns that off). ``limits`` caps what each peer and source may hold.
    ``signer`` (the node identity's Ed25519 ``sign``) signs every output (``attest.py``).
    """

    def __init__(
        self,
        shards: Mapping[tuple[str, LayerRange], ShardModel],
        *,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        max_length: int = 4096,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        first_step_timeout: float = DEFAULT_FIRST_STEP_TIMEOUT,
        max_parallel: int = 1,
        offload: bool = True,
        inline_step_s: float = DEFAULT_INLINE_STEP_S,
        limits: PipelineLimits | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.shards = dict(shards)
        self.signer = signer
        self.catalog = {key: spec_of(m, max_length) for key, m in self.shards.items()}
        self.budget = KvBudget(budget_bytes)
        self.limits = limits or PipelineLimits()
        self.quotas = PipelineQuotas(self.limits, budget_bytes)
        self.idle_timeout = idle_timeout
        self.first_step_timeout = first_step_timeout
        self.offload = offload
        self.fair = FairLimiter(max_parallel)  # long steps, a chunk at a time
        self.decode_lane = FairLimiter(max_parallel)  # one-position steps, beside them
        self.pacer = ComputePacer(
            self.limits.compute_rate_peer,
            self.limits.compute_rate_source,
            self.limits.compute_burst,
        )
        self.costs = StepCosts(inline_step_s)
        self.steps_served = 0
        self.steps_inline = 0
        self.steps_pushed_in = 0
        self.pushes_refused = 0  # late copies of steps the client relayed itself
        self.ring_steps_sent = 0  # tokens a last shard pushed to a ring's head
        # push key -> (the connection that owns the session, its session id)
        self.by_key: dict[bytes, tuple[_Connection, int]] = {}
        self.pusher: Pusher | None = None  # set where the server can reach other servers

    def layers_served(self) -> list[dict[str, Any]]:
        """Entries for the capability card's ``layers_served``."""
        return [{"model": m, "start": r.start, "end": r.end} for m, r in sorted(self.shards)]

    def register(self, node: NodeLike) -> None:
        node.set_stream_handler(codec.PROTOCOL_ID, self.handle)

    async def handle(self, stream: FramedStream, peer_id: str) -> None:
        """Serve one stream until the peer leaves; frees every session it opened."""
        machine = ServerMachine(
            self.catalog,
            self.budget,
            idle_timeout=self.idle_timeout,
            first_step_timeout=self.first_step_timeout,
            max_step_tokens=self.limits.max_step_tokens,
            quotas=self.quotas,
            peer=peer_id,
            source=stream.source,
        )
        conn = _Connection(self, machine, stream, peer_id)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.expire_idle)
                await conn.serve()
                nursery.cancel_scope.cancel()
        finally:
            conn.closed = True
            conn.apply_releases(machine.stream_ended())
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await stream.close()
                except PeerUnavailable:
                    pass  # already gone; its sessions were freed above

    async def run_step(self, session: ShardSession, action: Run) -> StepResult:
        """Output (or top-k logits), top-k ids and, in a ring's last shard, the token it
        picks; computed off the trio thread unless the step is a short decode step on an
        idle server. A long step takes its turns for the thread ``step_chunk`` positions
        at a time, so other peers' long steps run between its chunks; a one-position step
        takes the decode lane, beside them."""
        positions = int(action.x.shape[1])
        parts: list[Any] = []
        wait = self.pacer.charge(action.peer, action.source, positions, trio.current_time())
        if wait > 0:
            await trio.sleep(wait)  # pacing a peer past its compute share, not a hand-off

        def compute(a: int, b: int) -> Any:
            began = time.perf_counter()
            y = session.step(action.x[:, a:b], action.start + a, last_only=action.last_only)
            self.costs.record(session.model, b - a, time.perf_counter() - began)
            return y

        def work(a: int = 0, b: int = positions) -> StepResult:
            parts.append(compute(a, b))
            y = parts[-1] if action.last_only else np.concatenate(parts, axis=1)
            if not action.top_k:
                return y, None, None
            ring, token = action.ring, None
            if ring is not None and not ring.sampling.greedy:  # from all the logits
                token = pick(y, ring.sampling, action.start + positions)
            values, ids = codec.top_k_of(y, action.top_k)
            if ring is not None and token is None:
                token = int(ids[0, 0])  # greedy: the top-1, ties to the lower id as in pick
            return values, ids, token

        if not self.offload:
            return work()
        busy = self.fair.busy or self.decode_lane.busy
        if self.costs.may_inline(session.model, positions, busy=busy):
            self.steps_inline += 1
            return work()
        if positions == 1:
            async with self.decode_lane.slot(action.peer, action.source):
                return await trio.to_thread.run_sync(work)
        chunk, nice = self.limits.step_chunk or positions, self.limits.long_step_nice
        if not self.pacer.heavy(action.peer, action.source, trio.current_time()):
            nice = 0  # within its share: a client's prompt runs at full priority
        for a in range(0, positions - chunk, chunk):  # every chunk but the last
            async with self.fair.slot(action.peer, action.source, chunk):
                parts.append(await run_niced(functools.partial(compute, a, a + chunk), nice))
        last = (positions - 1) // chunk * chunk
        async with self.fair.slot(action.peer, action.source, positions - last):
            return await run_niced(functools.partial(work, last, positions), nice)


class _Connection:
    def __init__(
        self, server: PipelineServer, machine: ServerMachine, stream: FramedStream, peer: str
    ) -> None:
        self.server = server
        self.machine = machine
        self.stream = stream
        self.peer = peer
        self.sessions: dict[int, ShardSession] = {}
        self.chains: dict[int, InputChain] = {}  # what each session's signatures bind
        self.keys: dict[int, bytes] = {}
        self.closed = False  # the stream ended; a pushed step may still be running here
        self.parked: trio.Event | None = None  # set while expiry waits for an idle session
        self.send_lock = QuickLock()  # a pushed step's reply may race this stream's own

    async def serve(self) -> None:
        while True:
            try:
                raw = await self.stream.receive()
            except PeerUnavailable:
                return
            except FrameTooLarge as exc:
                log.info("pipeline peer %s sent an oversized frame: %s", self.peer, exc)
                await self._send(codec.Error(0, codec.E_BAD_REQUEST, str(exc)))
                return
            except RemoteProtocolError as exc:
                await self._send(codec.Error(0, codec.E_BAD_REQUEST, str(exc)))
                continue
            try:
                msg = codec.from_map(raw)
            except RemoteProtocolError as exc:
                rid = raw.get("rid")
                rid = rid if type(rid) is int and 0 <= rid <= codec.MAX_ID else 0
                await self._send(codec.Error(rid, codec.E_BAD_REQUEST, str(exc)))
                continue
            if isinstance(msg, codec.Step) and msg.key:
                await self._pushed(msg)
                continue
            await self.receive(msg)

    async def receive(self, msg: codec.Message) -> None:
        await self.perform(self.machine.receive(msg, trio.current_time()))
        if self.parked is not None:
            self.parked.set()

    async def _pushed(self, msg: codec.Step) -> None:
        """A step another server pushed into a session a client opened (maybe on another
        stream): run it there; its output goes to that session's owner with rid 0."""
        owner = self.server.by_key.get(msg.key)
        if owner is None or owner[1] != msg.session:
            await self._send(codec.Error(msg.rid, codec.E_UNKNOWN_SESSION, "unknown push key"))
            return
        conn, session = owner
        refusal = conn.machine.refuse_push(session, msg.start, msg.rid, msg.epoch)
        if refusal is not None:
            self.server.pushes_refused += 1
            await self._send(refusal)
            return
        self.server.steps_pushed_in += 1
        await conn.receive(dataclasses.replace(msg, rid=0, session=session, key=b""))

    async def _send(self, reply: codec.Message) -> None:
        try:
            async with self.send_lock:
                await self.stream.send(codec.to_map(reply))
        except PeerUnavailable:
            log.debug("pipeline peer %s left before a reply", self.peer)

    async def perform(self, actions: list[Action]) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            now = trio.current_time
            if isinstance(action, Send):
                await self._send(action.reply)
            elif isinstance(action, Release):
                self._release(action.session)
            elif isinstance(action, Allocate):
                model = self.server.shards[(action.model, action.layers)]
                self.sessions[action.session] = model.new_session(action.max_length)
                if self.server.signer is not None:
                    seed = chain_seed(action.model, action.layers, action.session)
                    self.chains[action.session] = InputChain(seed)
                key = b""
                if self.server.pusher is not None:  # a key says: this server pushes too
                    key = secrets.token_bytes(codec.PUSH_KEY_BYTES)
                    self.keys[action.session] = key
                    self.server.by_key[key] = (self, action.session)
                    if action.warm:
                        self.server.pusher.warm(action.warm)
                pending[:0] = self.machine.ready(action.session, now(), key)
            elif isinstance(action, Run):
                pending[:0] = await self._run(action)

    async def _run(self, action: Run) -> list[Action]:
        session = self.sessions[action.session]
        queued = self.server.quotas.queued_steps
        try:
            grant = queued.acquire(self.peer, self.stream.source)
        except Busy as busy:
            return self.machine.refused(action.session, busy, trio.current_time())
        try:
            y, ids, token = await self.server.run_step(session, action)
        except (ShardFailed, LocalProtocolError, MemoryError) as exc:
            log.warning("pipeline step failed for %s: %s", self.peer, exc)
            return self.machine.failed(action.session, f"step failed: {exc}", trio.current_time())
        finally:
            queued.release(grant)
        self.server.steps_served += 1
        if self.closed:  # the owner left while a pushed step ran: nobody to answer
            return []
        pusher = self.server.pusher
        if action.fwd and pusher is not None:
            y = codec.as_wire(y, self.machine.sessions[action.session].dtype)
        signed = await self._sign(action, y, ids, token)
        if self.closed:  # the owner left while a big step's output was being signed
            return []
        # the session is idle again before anything is pushed: in a ring of two, the next
        # step may come back while this push is still being sent
        now = trio.current_time()
        replies = self.machine.step_done(action.session, y, now, ids, token, signed)
        push = onward(action, y, token)  # the machine says where the output goes on
        if pusher is not None and push is not None:  # the next server first, then the owner
            self.server.ring_steps_sent += push.ring_token
            await pusher.push(push.fwd, push.start, push.x, ring=push.ring, epoch=push.epoch)
        return replies

    async def _sign(
        self, action: Run, y: Any, ids: npt.NDArray[np.int64] | None, token: int | None
    ) -> tuple[bytes, bytes]:
        """The signature over a step's output as sent and the input chain it binds (the
        hashing in a worker thread when the step is big); empty when the server does not
        sign. The output is signed as computed, corrupted or not: whoever sends it owns it."""
        chain, signer = self.chains.get(action.session), self.server.signer
        if chain is None or signer is None:
            return b"", b""
        out = self.machine.wire_output(action.session, y) if ids is None else y
        vocab = self.machine.sessions[action.session].spec.vocab if ids is not None else 0
        end = action.start + int(action.x.shape[1])

        def attest() -> tuple[bytes, bytes]:
            value = chain.extend(action.start, action.x)
            digest = output_digest(out, ids, vocab, token)
            return signer(reply_digest(value, action.start, end, digest)), value

        if action.x.nbytes + out.nbytes <= SIGN_INLINE_BYTES:
            return attest()
        return await trio.to_thread.run_sync(attest)

    def _release(self, session: int) -> None:
        self.sessions.pop(session, None)
        self.chains.pop(session, None)
        key = self.keys.pop(session, None)
        if key is not None:
            self.server.by_key.pop(key, None)

    def apply_releases(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Release):
                self._release(action.session)

    async def expire_idle(self) -> None:
        """Expire sessions idle past the timeout. This sleeps until the earliest deadline
        and looks again, instead of waking on every message; only with no idle session
        does it wait for the next message. A deadline moves earlier only when a session's
        first step ends (from ``first_step_timeout`` after its open to ``idle_timeout``
        after that step), so a sleep never outlasts ``idle_timeout``."""
        while True:
            deadline = self.machine.next_deadline()
            if deadline is None:
                self.parked = trio.Event()
                await self.parked.wait()
                self.parked = None
                continue
            await trio.sleep_until(min(deadline, trio.current_time() + self.machine.idle_timeout))
            self.apply_releases(self.machine.tick(trio.current_time()))
