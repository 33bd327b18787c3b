"""``/p2pedge/direct/2.0.0``: a TLS 1.3 TCP lane for hot protocols (pure, no IO).

Why: py-libp2p 0.8's Python yamux and Noise cost about 2 ms of round trip and 1 ms of CPU
per message pair on loopback (``benchmarks/transport.py``), about a third of what a
pipeline hop added on top of its compute.
libp2p stays in charge of who is who; the lane only carries the bytes:

1. over an authenticated libp2p stream the client asks for a :class:`Ticket` for one
   protocol; the server answers with a TCP port, a random ticket id, a random secret and
   the SHA-256 fingerprint of its lane certificate (:mod:`~p2pedge.protocols.direct.tls`);
2. the client dials that port at the libp2p connection's IP and sends :func:`hello_prefix`
   (``MAGIC`` and the ticket id, in clear, so a stranger is refused before any TLS work),
   then a TLS 1.3 handshake in which it accepts only the pinned certificate;
3. inside TLS the client's first frame is the secret, and the server answers
   ``GREETING``; after that both sides exchange length-prefixed frames.

A ticket is used once and expires. The secret and the fingerprint never leave the
Noise-encrypted libp2p stream except inside TLS to the pinned server, so seeing the
ticket id on the wire gives an attacker nothing but a way to spend it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pedge.errors import LocalProtocolError, RemoteProtocolError
from p2pedge.protocols.direct.tls import FINGERPRINT_BYTES
from p2pedge.wire.messages import require

PROTOCOL_ID = "/p2pedge/direct/2.0.0"
MAGIC = b"p2pedge-direct/2\n"
TICKET_BYTES = 16
SECRET_BYTES = 32
GREETING = b"hello"
MAX_PROTOCOL_CHARS = 128
MAX_TICKET_FRAME = 1024  # a ticket request or answer is ~150 bytes; refuse more unread


@dataclass(frozen=True)
class TicketRequest:
    protocol: str


@dataclass(frozen=True)
class Ticket:
    """Where and how to reach the lane; ``port == 0`` means the server refused."""

    port: int
    ticket: bytes
    secret: bytes
    fingerprint: bytes
    reason: str = ""


def refusal(reason: str) -> Ticket:
    return Ticket(0, b"", b"", b"", reason)


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
    return {
        "t": "ticket",
        "port": t.port,
        "ticket": t.ticket,
        "secret": t.secret,
        "cert": t.fingerprint,
        "reason": t.reason,
    }


def decode_ticket(msg: dict[str, Any]) -> Ticket:
    if msg.get("t") != "ticket":
        raise RemoteProtocolError(f"expected a ticket, got {msg.get('t')!r}")
    port = require(msg, "port", int)
    reason = require(msg, "reason", str)[:200]
    if port == 0:
        return refusal(reason or "refused")
    ticket, secret = require(msg, "ticket", bytes), require(msg, "secret", bytes)
    cert = require(msg, "cert", bytes)
    if not 0 < port < 65536:
        raise RemoteProtocolError(f"malformed ticket: port {port}")
    sizes = (len(ticket), len(secret), len(cert))
    if sizes != (TICKET_BYTES, SECRET_BYTES, FINGERPRINT_BYTES):
        raise RemoteProtocolError(f"malformed ticket: ticket, secret, cert sizes {sizes}")
    return Ticket(port, ticket, secret, cert, reason)


HELLO_PREFIX = len(MAGIC) + TICKET_BYTES


def hello_prefix(ticket: bytes) -> bytes:
    """The client's first bytes on the lane, before its TLS ClientHello."""
    if len(ticket) != TICKET_BYTES:
        raise LocalProtocolError("ticket has the wrong size")
    return MAGIC + ticket


def hello_ticket(prefix: bytes) -> bytes:
    """The ticket named by the first ``HELLO_PREFIX`` bytes a lane client sent."""
    if len(prefix) != HELLO_PREFIX or not prefix.startswith(MAGIC):
        raise RemoteProtocolError("not a p2pedge direct-lane hello")
    return prefix[len(MAGIC) :]


def check_greeting(frame: bytes) -> None:
    if frame != GREETING:
        raise RemoteProtocolError("direct-lane greeting is wrong")
