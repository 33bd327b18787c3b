"""``/p2pedge/direct/1.0.0``: a sealed TCP lane for hot protocols (pure, no IO).

Why: py-libp2p 0.8's Python yamux and Noise cost about 2 ms of round trip and 1 ms of CPU
per message pair on loopback (``benchmarks/transport.py``), about a third of what a
pipeline hop added on top of its compute.
libp2p stays in charge of who is who; the lane only carries the bytes:

1. over an authenticated libp2p stream the client asks for a :class:`Ticket` for one
   protocol; the server answers with a TCP port, a random ticket and a random key;
2. the client dials that port at the libp2p connection's IP and sends :func:`client_hello`:
   ``MAGIC``, the ticket in clear, then a sealed greeting;
3. the server answers with a sealed greeting; after that every frame, both ways, is
   ``length || ChaCha20-Poly1305(key, nonce = direction || counter, payload, ad = length)``.

A ticket is used once and expires; the key never leaves the Noise-encrypted libp2p stream,
so a stranger on the TCP port can neither read nor forge frames, and a replayed, dropped
or reordered frame fails authentication (the counter is implicit).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from p2pedge.errors import LocalProtocolError, RemoteProtocolError
from p2pedge.wire.framing import DEFAULT_MAX_FRAME, PREFIX, FrameDecoder
from p2pedge.wire.messages import require

PROTOCOL_ID = "/p2pedge/direct/1.0.0"
MAGIC = b"p2pedge-direct/1\n"
TICKET_BYTES = 16
KEY_BYTES = 32
TAG_BYTES = 16
GREETING = b"hello"
MAX_PROTOCOL_CHARS = 128
MAX_TICKET_FRAME = 1024  # a ticket request or answer is ~100 bytes; refuse more unread
_NONCE = struct.Struct(">IQ")
CLIENT_TO_SERVER = 0
SERVER_TO_CLIENT = 1


@dataclass(frozen=True)
class TicketRequest:
    protocol: str


@dataclass(frozen=True)
class Ticket:
    """Where and how to reach the lane; ``port == 0`` means the server refused."""

    port: int
    ticket: bytes
    key: bytes
    reason: str = ""


def encode_request(req: TicketRequest) -> dict[str, Any]:
    if not 0 < len(req.protocol) <= MAX_PROTOCOL_CHARS:
        raise LocalProtocolError(f"protocol id must be 1..{MAX_PROTOCOL_CHARS} chars")
    return {"t": "ticket?", "protocol": req.protocol}


def decode_request(msg: dict[str, Any]) -> TicketRequest:
    if msg.get("t") != "ticket?":
        raise RemoteProtocolError(f"expected a ticket request, got {msg.get('t')!r}")
    protocol = require(msg, "protocol", str)
    if not 0 < len(protocol) <= MAX_PROTOCOL_CHARS:
        raise RemoteProtocolError(f"protocol id must be 1..{MAX_PROTOCOL_CHARS} chars")
    return TicketRequest(protocol)


def encode_ticket(t: Ticket) -> dict[str, Any]:
    return {"t": "ticket", "port": t.port, "ticket": t.ticket, "key": t.key, "reason": t.reason}


def decode_ticket(msg: dict[str, Any]) -> Ticket:
    if msg.get("t") != "ticket":
        raise RemoteProtocolError(f"expected a ticket, got {msg.get('t')!r}")
    port = require(msg, "port", int)
    reason = require(msg, "reason", str)[:200]
    if port == 0:
        return Ticket(0, b"", b"", reason or "refused")
    ticket, key = require(msg, "ticket", bytes), require(msg, "key", bytes)
    if not 0 < port < 65536 or len(ticket) != TICKET_BYTES or len(key) != KEY_BYTES:
        raise RemoteProtocolError("malformed ticket (port, ticket or key size)")
    return Ticket(port, ticket, key, reason)


class SealedChannel:
    """Seals outgoing frames and opens incoming ones for one lane end.

    Sans-IO: :meth:`seal` gives bytes to write, :meth:`feed` takes received bytes and
    returns whole payloads. Framing is the shared :class:`FrameDecoder` (a length above
    ``max_frame`` plus the tag is refused when its prefix arrives, before anything is
    buffered for it); the length prefix is the associated data.
    """

    def __init__(self, key: bytes, *, client: bool, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if len(key) != KEY_BYTES:
            raise LocalProtocolError(f"key must be {KEY_BYTES} bytes")
        self._aead = ChaCha20Poly1305(key)
        self._send_dir = CLIENT_TO_SERVER if client else SERVER_TO_CLIENT
        self._recv_dir = SERVER_TO_CLIENT if client else CLIENT_TO_SERVER
        self._sent = 0
        self._received = 0
        self.max_frame = max_frame
        self._frames = FrameDecoder(max_frame + TAG_BYTES, min_frame=TAG_BYTES)

    @property
    def buffered(self) -> int:
        return self._frames.buffered

    def seal(self, payload: bytes) -> bytes:
        if len(payload) > self.max_frame:
            raise LocalProtocolError(f"frame of {len(payload)} bytes exceeds {self.max_frame}")
        prefix = PREFIX.pack(len(payload) + TAG_BYTES)
        nonce = _NONCE.pack(self._send_dir, self._sent)
        self._sent += 1
        return prefix + self._aead.encrypt(nonce, payload, prefix)

    def feed(self, data: bytes) -> list[bytes]:
        frames: list[bytes] = []
        for body in self._frames.feed(data):
            nonce = _NONCE.pack(self._recv_dir, self._received)
            try:
                frames.append(self._aead.decrypt(nonce, body, PREFIX.pack(len(body))))
            except InvalidTag as exc:
                raise RemoteProtocolError("sealed frame failed authentication") from exc
            self._received += 1
        return frames


def client_hello(ticket: bytes, channel: SealedChannel) -> bytes:
    """The client's first bytes on the lane (the channel's first sealed frame)."""
    if len(ticket) != TICKET_BYTES:
        raise LocalProtocolError("ticket has the wrong size")
    return MAGIC + ticket + channel.seal(GREETING)


HELLO_PREFIX = len(MAGIC) + TICKET_BYTES


def hello_ticket(prefix: bytes) -> bytes:
    """The ticket named by the first ``HELLO_PREFIX`` bytes a lane client sent."""
    if len(prefix) != HELLO_PREFIX or not prefix.startswith(MAGIC):
        raise RemoteProtocolError("not a p2pedge direct-lane hello")
    return prefix[len(MAGIC) :]


def check_greeting(frame: bytes) -> None:
    if frame != GREETING:
        raise RemoteProtocolError("direct-lane greeting is wrong")
