"""Hypothesis drives the pipeline client machine (``client_machine.py``) through relayed,
pushed and ring steps, hostile replies and hop failures, against shards that compute a
known function: positions never go backwards on a healthy hop, a replacement replays
exactly the positions it lost (the shard refuses a gap), one request at a time per
session, bad replies are the server's fault, and the logits and ring tokens always equal
those of a chain that never failed. Every server signs its outputs (``attest.py``); a
signature by another key, or a server that stops signing, fails that hop."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from p2pedge.errors import (
    Busy,
    LocalProtocolError,
    PeerUnavailable,
    RemoteProtocolError,
    ShardFailed,
)
from p2pedge.ids import LayerRange
from p2pedge.planning.verification import VerifyPolicy
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.attest import InputChain, chain_seed, output_digest, reply_digest
from p2pedge.protocols.pipeline.chain import ClientConfig, HopFailed, HopState
from p2pedge.protocols.pipeline.client_machine import RING_TOP_K, ClientMachine
from p2pedge.protocols.pipeline.hop_machine import KEPT_POSITIONS, HopMachine
from p2pedge.protocols.pipeline.sampling import greedy
from p2pedge.records.peer_ids import peer_id_from_ed25519

V, H, HOPS, MAX_LENGTH = 7, 2, 3, 40


def shard_outputs(k: int, xs: np.ndarray) -> np.ndarray:
    """Hop ``k``'s output for every position of its whole input ``xs`` (causal: position p
    depends on inputs 0..p only); the last hop's are logits."""
    if k == 0:
        c = np.cumsum(xs.astype(np.float32))
        hidden = np.stack([c, np.arange(len(xs), dtype=np.float32)], axis=1)
    else:
        hidden = np.cumsum(xs, axis=0, dtype=np.float32) * 0.5 + k
    if k < HOPS - 1:
        return hidden.astype(np.float32)
    picks = np.floor(hidden.sum(axis=1)).astype(np.int64) % V
    return -np.abs(np.arange(V, dtype=np.float32)[None, :] - picks[:, None]).astype(np.float32)


def reference_logits(tokens: list[int]) -> np.ndarray:
    x: np.ndarray = np.asarray(tokens, dtype=np.int64)
    for k in range(HOPS):
        x = shard_outputs(k, x)
    return x[-1]


def assert_logits(actual: np.ndarray | None, tokens: list[int]) -> None:
    """``actual`` are the logits after ``tokens`` (where sent: a top-k reply leaves -inf)."""
    want = reference_logits(tokens)
    assert actual is not None and int(np.argmax(actual)) == int(np.argmax(want))
    sent = np.isfinite(actual)
    np.testing.assert_array_equal(actual[sent], want[sent])


class CumsumShard:
    """A server's KV cache for hop ``k``: the inputs it has consumed. A step may start at
    most where the cache ends (rewinding it), as a real server requires."""

    def __init__(self, k: int, session: int) -> None:
        self.k = k
        self.cache: list[np.ndarray] = []
        self.key = Ed25519PrivateKey.generate()
        public = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.peer = peer_id_from_ed25519(public)
        self.chain = InputChain(chain_seed("m", LayerRange(k, k + 1), session))
        self.signed = (0, 0, b"")  # the last step's start, end and input chain

    def sign(self, out: codec.Output, key: Ed25519PrivateKey | None = None) -> codec.Output:
        """``out`` signed as a server signs the output of its last step."""
        start, end, chain = self.signed
        digest = output_digest(out.y, out.ids, out.vocab, out.token)
        sig = (key or self.key).sign(reply_digest(chain, start, end, digest))
        return dataclasses.replace(out, sig=sig, chain=chain)

    def step(self, start: int, x: np.ndarray) -> np.ndarray:
        assert start <= len(self.cache), f"hop {self.k}: step at {start}, cache {len(self.cache)}"
        rows = list(x[0])
        self.cache = self.cache[:start] + rows
        self.signed = (start, start + len(rows), self.chain.extend(start, x))
        out = shard_outputs(self.k, np.asarray(self.cache))
        end = start + len(rows)
        return out[end - 1 : end] if self.k == HOPS - 1 else out[None, start:end]


class Link:
    """What a hop's connection is to the machine: its :class:`HopMachine`."""

    def __init__(self, machine: HopMachine) -> None:
        self.machine = machine
        self.peer = machine.peer


class ClientMachineTest(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # verify set: the hops keep their signed outputs as evidence
        config = ClientConfig(
            max_length=MAX_LENGTH, chunk=3, max_recoveries=10_000, verify=VerifyPolicy()
        )
        self.m = ClientMachine(config)
        self.now = 0.0
        self.serial = 0
        self.servers: dict[str, CumsumShard] = {}  # by peer
        self.inflight: dict[int, codec.Step] = {}  # by hop index
        self.fed: list[int] = []
        self.high: dict[str, int] = {}  # each hop machine's highest position consumed
        self.m.started([self._open(k) for k in range(HOPS)])

    # --- helpers ---------------------------------------------------------------------

    def _open(self, k: int) -> HopState:
        self.serial += 1
        server = CumsumShard(k, self.serial)
        hm = HopMachine(server.peer, LayerRange(k, k + 1))
        req = hm.open("m", MAX_LENGTH)
        assert hm.receive(codec.Opened(req.rid, self.serial, 0, b"key")) is not None
        assert (hm.session, hm.key, hm.pending) == (self.serial, b"key", None)
        self.servers[hm.peer] = server
        return HopState(Link(hm))  # type: ignore[arg-type]

    def _hm(self, k: int) -> HopMachine:
        return self.m.hops[k].conn.machine

    @property
    def target(self) -> int:
        return self.m.boundaries[0].length

    def _settled(self) -> bool:
        return not self.inflight and self.m.settled(self.target)

    def _replace(self, first: int, last: int, cause: BaseException) -> None:
        self.m.failed(HopFailed(first, self._hm(first).peer, cause), self.now)
        start, ends = self.m.replaceable(first)
        assert start == first and ends == list(range(first + 1, HOPS + 1))
        kept = [h.done for h in self.m.hops[last + 1 :]]
        new = [self._open(k) for k in range(first, last + 1)]
        old = self.m.replaced(first, last, new)
        assert len(old) == last - first + 1
        for k in range(first, last + 1):
            self.inflight.pop(k, None)
            assert self.m.replay(k) == (0, self.m.boundaries[k].length)
            assert self.m.boundaries[k].length == 0 or k == first  # inner ones start empty
        assert [h.done for h in self.m.hops[last + 1 :]] == kept  # downstream keeps its KV
        assert self.m.ring_ok

    # --- feeding ---------------------------------------------------------------------

    @precondition(lambda self: self._settled())
    @rule(tokens=st.lists(st.integers(0, V - 1), min_size=1, max_size=7))
    def feed(self, tokens: list[int]) -> None:
        if self.target + len(tokens) > MAX_LENGTH:
            with pytest.raises(ValueError):
                self.m.feed(tokens)
            return
        assert self.m.feed(tokens) == self.target
        self.fed += tokens

    # --- relayed steps ---------------------------------------------------------------

    @rule(k=st.integers(0, HOPS - 1))
    def send_relayed(self, k: int) -> None:
        hop, hm = self.m.hops[k], self._hm(k)
        if hop.done >= self.target:
            if self.target:
                with pytest.raises(LocalProtocolError):
                    self.m.relay_next(k, self.target)
            return
        span = self.m.relay_next(k, self.target)
        if span is None:
            assert self.m.boundaries[k].length <= hop.done
            return
        start, end = span
        assert start == hop.done and 0 < end - start <= self.m.config.chunk
        x = self.m.step_input(k, start, end)
        if k in self.inflight:  # one request at a time: our misuse, caught
            with pytest.raises(LocalProtocolError):
                hm.step(x, start, top_k=self.m.top_k(k), epoch=self.m.epoch)
            event("a second step while one was pending was refused")
            return
        self.inflight[k] = hm.step(x, start, top_k=self.m.top_k(k), epoch=self.m.epoch)

    @precondition(lambda self: bool(self.inflight))
    @rule(
        data=st.data(),
        fault=st.sampled_from(
            ["none", "none", "none", "stale_first", "unknown_rid", "other_session",
             "wrong_type", "bad_shape", "nan", "internal_error", "bad_request", "bad_sig",
             "unsigned"]
        ),
    )  # fmt: skip
    def answer(self, data: st.DataObject, fault: str) -> None:
        k = data.draw(st.sampled_from(sorted(self.inflight)))
        msg, hm = self.inflight[k], self._hm(k)
        y = self.servers[hm.peer].step(msg.start, msg.x)
        n, last = int(msg.x.shape[1]), k == HOPS - 1
        event(f"reply: {fault}")
        if fault == "nan" and last:
            fault = "bad_shape"
        if fault == "bad_shape":
            y = np.zeros((2, V) if last else (1, n + 1, H), np.float32)
        if fault == "nan":
            y = y.copy()
            y[0, -1, 0] = np.nan
        reply: codec.Message = {
            "unknown_rid": codec.Output(msg.rid + 1, hm.session, y),
            "other_session": codec.Output(msg.rid, hm.session + 1, y),
            "wrong_type": codec.Closed(msg.rid, hm.session),
            "internal_error": codec.Error(msg.rid, codec.E_INTERNAL, "oom"),
            "bad_request": codec.Error(msg.rid, codec.E_BAD_REQUEST, "no"),
        }.get(fault, codec.Output(msg.rid, hm.session, y))
        server = self.servers[hm.peer]
        if isinstance(reply, codec.Output) and fault != "unsigned":
            reply = server.sign(reply, Ed25519PrivateKey.generate() if fault == "bad_sig" else None)
        if fault == "stale_first" and msg.rid > 1:
            assert hm.receive(codec.Output(msg.rid - 1, hm.session, y)) is None
        if fault in ("unknown_rid", "other_session", "wrong_type"):
            with pytest.raises(RemoteProtocolError) as caught:
                hm.receive(reply)
            self._replace(k, k, caught.value)
            return
        if fault in ("internal_error", "bad_request"):
            # the server failed (ShardFailed) or says we misused it (LocalProtocolError)
            want = ShardFailed if fault == "internal_error" else LocalProtocolError
            with pytest.raises(want) as failed:
                hm.receive(reply)
            self._replace(k, k, failed.value)
            return
        out = hm.receive(reply)
        assert out is not None and hm.pending is None
        del self.inflight[k]
        if fault in ("bad_sig", "unsigned") and (fault == "bad_sig" or hm.signs):
            with pytest.raises(RemoteProtocolError, match="sign"):
                hm.output(out, self.m.top_k(k), 0.001, n)
            event(f"a reply {fault}: the hop failed")
            self._replace(k, k, RemoteProtocolError(fault))
            return
        if fault == "unsigned":  # a server that never signed: its first output says so
            hm.signs = True
            out = server.sign(out)  # type: ignore[arg-type]
        logits = hm.output(out, self.m.top_k(k), 0.001, n)
        end = msg.start + n
        if fault in ("bad_shape", "nan"):
            with pytest.raises(HopFailed) as bad:
                self.m.accept(k, logits, msg.start, end, self.target)
            assert isinstance(bad.value.cause, RemoteProtocolError) and bad.value.index == k
            self._replace(k, k, bad.value)
            return
        self.m.accept(k, logits, msg.start, end, self.target)

    @precondition(lambda self: not self.inflight)
    @rule()
    def settle(self) -> None:
        """Relay every hop through what is fed, as the driver does (replays included)."""
        while not self.m.settled(self.target):
            for k in range(HOPS):
                span = (
                    None
                    if self.m.hops[k].done >= self.target
                    else self.m.relay_next(k, self.target)
                )
                if span is None:
                    continue
                start, end = span
                hm = self._hm(k)
                msg = hm.step(self.m.step_input(k, start, end), start, top_k=self.m.top_k(k))
                y = self.servers[hm.peer].step(start, msg.x)
                signed = self.servers[hm.peer].sign(codec.Output(msg.rid, hm.session, y))
                out = hm.receive(signed)
                assert out is not None
                logits = hm.output(out, self.m.top_k(k), 0.001, end - start)
                self.m.accept(k, logits, start, end, self.target)

    @rule(data=st.data(), roll=st.integers(0, 3))
    def hops_fail(self, data: st.DataObject, roll: int) -> None:
        """A stream ends (now and then): hops ``first..last`` are replaced by a fresh chain."""
        if roll:
            return
        first = data.draw(st.integers(0, HOPS - 1))
        last = data.draw(st.integers(first, HOPS - 1))
        self._replace(first, last, PeerUnavailable("stream ended"))
        event(f"replaced {last - first + 1} hops")

    # --- pushed steps and the ring ---------------------------------------------------

    def _pushed(self, k: int, start: int, end: int, top_k: int) -> None:
        """Hop ``k`` runs a pushed step; its output comes to us with ``rid`` 0."""
        hm = self._hm(k)
        x = self.m.step_input(k, start, end)
        y = self.servers[hm.peer].step(start, x)
        ids = None
        token = None
        if k == HOPS - 1 and top_k:
            ids = np.argsort(-y, axis=1)[:, :top_k].astype(np.int64)
            token = int(ids[0, 0])
            y = np.take_along_axis(y, ids, axis=1)
        stale = codec.Output(0, hm.session, y, ids, V, token, at=start + 1)
        assert hm.receive_pushed(stale, start) is None  # another position: skipped
        pushed = codec.Output(0, hm.session, y, ids, V, token, at=start)
        out = hm.receive_pushed(self.servers[hm.peer].sign(pushed), start)
        assert out is not None
        self.m.accept(k, hm.output(out, top_k, None, end - start), start, end, end)

    @precondition(lambda self: not self.inflight)
    @rule(late=st.booleans())
    def push(self, late: bool) -> None:
        if not self.m.can_push(self.target):
            return
        top_k = self.m.config.logits_top_k
        fwd = self.m.forwards(top_k)[1:]
        assert [f.session for f in fwd] == [self._hm(k).session for k in range(1, HOPS)]
        for a, b in self.m.chunks(self.target):
            for k in range(HOPS):
                if late and k == HOPS - 1:
                    self.m.pushed_late()  # relaying finishes what did not come
                    assert not self.m.can_push(self.target)
                    event("a pushed output came late")
                    return
                self._pushed(k, a, b, top_k)
        assert self.m.settled(self.target)
        event("pushed")

    @precondition(lambda self: self._settled() and self.target > 0)
    @rule(n=st.integers(1, 4), lie=st.booleans())
    def ring(self, n: int, lie: bool) -> None:
        if not self.m.can_ring() or self.target + n > MAX_LENGTH:
            return
        assert self.m.last_logits is not None
        token = int(np.argmax(self.m.last_logits))
        start, epoch = self.target, self.m.epoch
        ring = self.m.ring_begin(token, n, None, greedy.spec)
        self.fed.append(token)
        assert ring.chain == self.m.forwards(RING_TOP_K) and ring.left == n
        for i in range(n):
            at = start + i
            for k in range(HOPS):
                self._pushed(k, at, at + 1, RING_TOP_K)
            assert_logits(self.m.last_logits, self.fed)
            if lie:
                self._hm(HOPS - 1).last_token = (int(np.argmax(self.m.last_logits)) + 1) % V
                with pytest.raises(HopFailed) as caught:
                    self.m.ring_token(greedy=True)
                self._replace(HOPS - 1, HOPS - 1, caught.value)
                event("a ring's last server named a token that is not its top-1")
                break
            token = self.m.ring_token(greedy=True)
            assert token == int(np.argmax(reference_logits(self.fed)))
            if i < n - 1:
                self.m.ring_feed(at + 1, token)
                self.fed.append(token)
        self.m.ring_end()
        assert self.m.epoch == epoch + 1  # whatever still goes round is stale now
        event("rang")

    # --- invariants ------------------------------------------------------------------

    @invariant()
    def positions_never_go_backwards_on_a_healthy_hop(self) -> None:
        for k, hop in enumerate(self.m.hops):
            key = self._hm(k).peer
            assert hop.done >= self.high.get(key, 0)
            self.high[key] = hop.done
            assert hop.done <= self.m.boundaries[k].length
            assert self.m.boundaries[k + 1].length >= hop.done

    @invariant()
    def signed_outputs_kept_are_bounded(self) -> None:
        for k in range(HOPS):
            hm = self._hm(k)
            kept = sum(e.end - e.start for e in hm.signed)
            assert kept <= KEPT_POSITIONS or len(hm.signed) == 1
            assert hm.signs is not False and bool(hm.signed) == bool(hm.signs)
            for entry in hm.signed:  # the latest output kept for a position is its own
                assert hm.signed_at(entry.start) is not None

    @invariant()
    def one_request_pending_per_session(self) -> None:
        for k in range(HOPS):
            assert (self._hm(k).pending is not None) == (k in self.inflight)

    @invariant()
    def settled_logits_are_those_of_a_chain_that_never_failed(self) -> None:
        assert self.m.boundaries[0].length == len(self.fed)
        if self.fed and self._settled():
            assert_logits(self.m.last_logits, self.fed)


TestClientMachine = ClientMachineTest.TestCase
TestClientMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_hop_machine_types_what_comes_back() -> None:
    """Our misuse is Local; a reply to a request never made or a push from nowhere is
    Remote; a budget refusal is Busy."""
    hm = HopMachine("p", LayerRange(0, 1))
    with pytest.raises(LocalProtocolError):
        hm.step(np.zeros((1, 1), np.int64), 0)  # no session yet
    req = hm.open("m", 8)
    with pytest.raises(LocalProtocolError):
        hm.close()  # the open is pending
    with pytest.raises(RemoteProtocolError):
        hm.receive(codec.Output(req.rid, 0, np.zeros((1, 2), np.float32)))  # not Opened
    hm.open("m", 8)
    hm.receive(codec.Opened(2, 5, 0))
    with pytest.raises(LocalProtocolError):
        hm.push(np.zeros((1, 1), np.int64), 0, (), 0)  # the server gave no key
    with pytest.raises(LocalProtocolError):
        hm.receive(codec.Closed(3, 5))  # nothing pending
    with pytest.raises(RemoteProtocolError):
        hm.receive_pushed(codec.Output(9, 5, np.zeros((1, 2), np.float32)), 0)
    with pytest.raises(RemoteProtocolError):
        hm.receive_pushed(codec.Output(0, 6, np.zeros((1, 2), np.float32), at=0), 0)
    with pytest.raises(RemoteProtocolError):  # more top logits than asked for
        hm.output(
            codec.Output(0, 5, np.zeros((1, 2), np.float32), np.zeros((1, 2), np.int64), 4),
            1,
            0.0,
            1,
        )
    hm.step(np.zeros((1, 1), np.int64), 0)
    with pytest.raises(Busy):
        hm.receive(codec.Error(3, codec.E_BUDGET, "full", "pipeline.sessions", "peer"))


def test_the_client_machine_is_sans_io() -> None:
    """Importing it loads no trio, libp2p or onnxruntime (a fresh interpreter)."""
    code = (
        "import sys, p2pedge.protocols.pipeline.client_machine; "
        "print([m for m in ('trio', 'libp2p', 'onnxruntime') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_replay_steps_where_the_replaced_hop_stepped() -> None:
    """A replacement recomputes the positions it lost with the original step boundaries
    (the prompt's chunks, then one position at a time), not in chunk-sized batches: with
    8-bit activations a batch rounds differently from single steps, and the replayed
    outputs (so the tokens) must be the ones the lost hop gave."""
    from types import SimpleNamespace

    def hop(peer: str) -> HopState:
        conn = SimpleNamespace(machine=HopMachine(peer, LayerRange(0, 1)), peer=peer)
        return HopState(conn)  # type: ignore[arg-type]

    def out(k: int, n: int) -> np.ndarray:  # hidden states, or the last position's logits
        return np.zeros((1, n, H) if k == 0 else (1, V), np.float32)

    m = ClientMachine(ClientConfig(max_length=MAX_LENGTH, chunk=8))
    m.started([hop("a"), hop("b")])
    m.feed(list(range(1, 13)))  # a 12-token prompt: chunks 0-8, 8-12
    for k in (0, 1):
        for start, end in ((0, 8), (8, 12)):
            assert m.relay_next(k, 12) == (start, end)
            m.accept(k, out(k, end - start), start, end, 12)
    for at in (12, 13, 14):  # three decode steps of one position each
        m.feed([at])
        for k in (0, 1):
            assert m.relay_next(k, at + 1) == (at, at + 1)
            m.accept(k, out(k, 1), at, at + 1, at + 1)
    m.replaced(1, 1, [hop("c")])
    replayed = []
    while m.hops[1].done < 15:
        span = m.relay_next(1, 15)
        assert span is not None
        replayed.append(span)
        start, end = span
        m.accept(1, out(1, end - start), start, end, 15)
    assert replayed == [(0, 8), (8, 12), (12, 13), (13, 14), (14, 15)]
