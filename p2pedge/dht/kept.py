"""GET_VALUE and FIND_NODE over one kept Kademlia stream per peer.

py-libp2p opens a fresh stream for every request: a yamux stream, a multistream-select
negotiation and then the exchange, all in pure Python. The Kademlia spec lets a stream
carry many requests, and the library's server loop reads them one after another, so a
stream kept per peer leaves only the exchange (the frame and CPU counts are in
``docs/swarm.md``).

A kept stream carries one request at a time (a second concurrent request to the same peer
opens a stream of its own, closed after use). It is dropped on any failure, on a
cancellation in mid-request (its reply may still be on the way) and when it has been idle
close to the server's read deadline (``DhtLimits.stream_idle_s``); a request that fails on
a kept stream is retried once on a fresh one, since the server may have ended it first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import trio
import varint  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from p2pedge.dht._protocol import P2PEDGE_KAD_PROTOCOL
from p2pedge.errors import RemoteProtocolError
from p2pedge.protocols._stream import libp2p_errors, reset_quietly

log = logging.getLogger("p2pedge.dht")
T = TypeVar("T")
MAX_CLOSER = 20  # closer peers read from one FIND_NODE reply (Kademlia's k)
MAX_ADDRS = 8  # addresses read per closer peer
MAX_PEER_ID = 64  # bytes: an identity-hashed Ed25519 or a SHA-256 multihash fits
MAX_ADDR_BYTES = 512  # a longer address (a relay circuit included) is not parsed


class KeptStreams:
    """Our own GET_VALUE requests, each peer's on a stream kept between requests."""

    def __init__(
        self,
        host: Any,
        *,
        reuse_s: float,
        timeout: float = 10.0,
        max_kept: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.reuse_s = reuse_s
        self.timeout = timeout
        self.max_kept = max_kept
        self.clock = clock
        self._kept: dict[Any, tuple[Any, float]] = {}  # peer id -> (idle stream, last use)
        self.opened = 0  # streams opened, for tests and diagnostics

    async def get_value(self, peer: Any, key: bytes) -> bytes | None:
        """The value ``peer`` holds under ``key``, or None (it has none, or it failed)."""
        request = Message()
        request.type = Message.MessageType.GET_VALUE
        request.key = key
        return await self._request(peer, request, partial(_value_of, key=key))

    async def find_node(self, peer: Any, target: bytes) -> list[tuple[Any, list[Any]]] | None:
        """The peers ``peer`` knows closest to ``target`` (a peer id's bytes), each with
        the addresses it gave (at most ``MAX_CLOSER`` peers of ``MAX_ADDRS`` addresses;
        unparsable addresses are left out), or None when it failed or answered wrongly."""
        request = Message()
        request.type = Message.MessageType.FIND_NODE
        request.key = target
        return await self._request(peer, request, _closer_of)

    async def _request(self, peer: Any, request: Message, parse: Callable[[bytes], T]) -> T | None:
        payload = request.SerializeToString()
        kept = await self._take(peer)
        if kept is not None:
            answered, value = await self._exchange(peer, kept, payload, parse, fresh=False)
            if answered:
                return value
        try:
            stream = await self.host.new_stream(peer, [TProtocol(P2PEDGE_KAD_PROTOCOL)])
        except Exception as exc:  # dial and negotiation errors come in many library types
            log.debug("Kademlia request to %s: no stream: %r", peer, exc)
            return None
        self.opened += 1
        return (await self._exchange(peer, stream, payload, parse, fresh=True))[1]

    async def _take(self, peer: Any) -> Any:
        held = self._kept.pop(peer, None)
        if held is None:
            return None
        stream, last = held
        if self.clock() - last < self.reuse_s:
            return stream
        await reset_quietly(stream)  # the server is about to end it: do not race its deadline
        return None

    async def _keep(self, peer: Any, stream: Any) -> None:
        if peer in self._kept or len(self._kept) >= self.max_kept:
            await reset_quietly(stream)  # another request kept one meanwhile, or we keep enough
            return
        self._kept[peer] = (stream, self.clock())

    async def _exchange(
        self, peer: Any, stream: Any, payload: bytes, parse: Callable[[bytes], T], *, fresh: bool
    ) -> tuple[bool, T | None]:
        """One request and its reply: (whether the peer answered, the parsed reply). A
        stream that failed is dropped and answers (False, None)."""
        failed: tuple[type[BaseException], ...] = (*libp2p_errors(), trio.TooSlowError)
        done = False
        try:
            with trio.fail_after(self.timeout):
                await stream.write(varint.encode(len(payload)) + payload)
                raw = await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE)
            value = parse(raw)
            done = True
        except RemoteProtocolError as exc:
            log.info("peer %s answered a Kademlia request wrongly: %s", peer, exc)
            return True, None  # not retried: the peer is at fault, not a stale stream
        except failed as exc:
            age = "fresh" if fresh else "kept"
            log.debug("Kademlia request to %s on a %s stream failed: %r", peer, age, exc)
            return False, None
        finally:
            if done:
                await self._keep(peer, stream)
            else:
                await reset_quietly(stream)  # failed, refused or cancelled mid-request
        return True, value


def _parsed(raw: bytes) -> Message:
    reply = Message()
    try:
        reply.ParseFromString(raw)
    except DecodeError as exc:
        raise RemoteProtocolError(f"undecodable reply: {exc!r}") from None
    return reply


def _closer_of(raw: bytes) -> list[tuple[Any, list[Any]]]:
    """A FIND_NODE reply's closer peers, bounded; a reply of another kind is the peer's
    error. Addresses are hints only: a dial authenticates the peer id."""
    from libp2p.peer.id import ID
    from multiaddr import Multiaddr

    reply = _parsed(raw)
    if reply.type != Message.MessageType.FIND_NODE:
        raise RemoteProtocolError(f"a reply of type {reply.type} to FIND_NODE")
    closer: list[tuple[Any, list[Any]]] = []
    for peer in reply.closerPeers[:MAX_CLOSER]:
        if not peer.id or len(peer.id) > MAX_PEER_ID:
            raise RemoteProtocolError("a closer peer without a usable id")
        addrs = []
        for raw_addr in peer.addrs[:MAX_ADDRS]:
            if not raw_addr or len(raw_addr) > MAX_ADDR_BYTES:
                continue
            try:  # decoded here: Multiaddr(bytes) defers it, and a bad one raises later
                addrs.append(Multiaddr(str(Multiaddr(raw_addr))))
            except ValueError:  # multiaddr's parse errors derive from it
                log.debug("skipping an unparsable address in a FIND_NODE reply")
        closer.append((ID(peer.id), addrs))
    return closer


def _value_of(raw: bytes, key: bytes) -> bytes | None:
    """A GET_VALUE reply's value for ``key``; a reply of another kind or key is the
    peer's error."""
    reply = _parsed(raw)
    if reply.type != Message.MessageType.GET_VALUE or reply.key != key:
        raise RemoteProtocolError(f"a reply of type {reply.type} for another key")
    if not reply.HasField("record"):
        return None
    if reply.record.key and reply.record.key != key:
        raise RemoteProtocolError("a record for another key")
    return bytes(reply.record.value) or None
