"""TLS 1.3 for the direct lane, sans-IO: OpenSSL through the standard library's ``ssl``.

Why TLS and not our own sealing: the handshake (ephemeral ECDHE, transcript signed by the
server's certificate key), the record layer (AEAD with implicit sequence numbers, so a
replayed, dropped or reordered record fails) and their review are OpenSSL's, not ours.

There is no certificate authority. Each lane server makes a throw-away Ed25519 key and a
self-signed certificate (:class:`LaneIdentity`); its SHA-256 fingerprint reaches the
client inside the ticket, over a libp2p stream that Noise has bound to the server's peer
id. The client accepts the handshake only if the certificate the server proved it holds
has that fingerprint (as WebRTC pins DTLS certificates from its signalling channel).

:class:`TlsChannel` wraps an ``ssl.SSLObject`` over two memory BIOs: bytes in, bytes out,
no sockets, so the trio glue and the tests drive it alike. Inside TLS the lane keeps the
shared length-prefixed framing, refused above ``max_frame`` as soon as a prefix arrives.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterator, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from p2pedge.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from p2pedge.wire.framing import DEFAULT_MAX_FRAME, PREFIX

FINGERPRINT_BYTES = 32
READ_RECORD = 1 << 14  # plaintext read per call: a TLS record holds at most 16 KiB
CERT_VALIDITY = datetime.timedelta(days=365)  # not checked (pinned); the key dies with us


def fingerprint(certificate_der: bytes) -> bytes:
    return hashlib.sha256(certificate_der).digest()


class LaneIdentity:
    """A lane server's ephemeral key and self-signed certificate, and its TLS context.

    The key lives only in this process (``ssl`` loads certificates only from files, so
    the PEM passes through a private temporary directory that is removed at once).
    """

    def __init__(self) -> None:
        key = ed25519.Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pedge direct lane")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CERT_VALIDITY)
            .sign(key, None)
        )
        self.certificate = cert.public_bytes(serialization.Encoding.DER)
        self.fingerprint = fingerprint(self.certificate)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ) + cert.public_bytes(serialization.Encoding.PEM)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.num_tickets = 0  # no resumption: every lane is a fresh handshake
        with tempfile.TemporaryDirectory(prefix="p2pedge-lane-") as private:
            path = os.path.join(private, "lane.pem")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(pem)
            context.load_cert_chain(path)
        self.context = context


@functools.cache
def client_context() -> ssl.SSLContext:
    """TLS 1.3 only; the chain is not checked against any CA because the certificate is
    pinned by fingerprint instead (:meth:`TlsChannel.handshake`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class TlsChannel:
    """One end of a lane's TLS connection: :meth:`handshake` until done, then
    :meth:`seal` payloads into bytes to send and :meth:`feed` received bytes for whole
    payloads. ``pin`` (client side) is the server certificate's expected fingerprint."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server: bool,
        pin: bytes = b"",
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        if not server and len(pin) != FINGERPRINT_BYTES:
            raise LocalProtocolError("a lane client must pin the server's certificate")
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server)
        self._pin = pin
        self.server = server
        self.max_frame = max_frame
        self.established = False
        # reassembly: the prefix so far, then the frame's pieces (joined once, at the end)
        self._head = b""
        self._expected: int | None = None
        self._parts: list[bytes] = []
        self._have = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame (ciphertext included)."""
        return len(self._head) + self._have + self._incoming.pending

    def handshake(self, data: bytes = b"") -> tuple[bytes, bool]:
        """Feed handshake bytes; returns (bytes to send, whether the handshake is done).

        Bytes after the handshake stay buffered for :meth:`feed`."""
        if self.established:
            raise LocalProtocolError("the lane's handshake is already done")
        self._incoming.write(data)
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return self._outgoing.read(), False
        except ssl.SSLError as exc:
            raise RemoteProtocolError(f"lane TLS handshake failed: {exc}") from exc
        if not self.server:
            der = self._tls.getpeercert(binary_form=True)
            if der is None or fingerprint(der) != self._pin:
                raise RemoteProtocolError("lane certificate is not the one pinned over libp2p")
        self.established = True
        return self._outgoing.read(), True

    def version(self) -> str | None:
        """The negotiated protocol ("TLSv1.3"), once the handshake is done."""
        return self._tls.version()

    def reframe(self, max_frame: int) -> None:
        """Change the frame limit between frames (the server admits only a secret-sized
        frame until the client has proved it holds the ticket's secret)."""
        if self._head or self._expected is not None:
            raise LocalProtocolError("cannot change the frame limit inside a frame")
        self.max_frame = max_frame

    def seal(self, payload: bytes, max_frame: int | None = None) -> bytes:
        """``payload`` framed and encrypted; ``max_frame`` (default: the channel's) is the
        limit the other side reads it under."""
        return self.seal_parts((payload,), max_frame)

    def seal_parts(self, parts: Sequence[bytes], max_frame: int | None = None) -> bytes:
        """One frame whose payload is ``parts`` joined, framed and encrypted without first
        copying a big part (a 4 MiB blob chunk) into one buffer: small leading parts ride
        in the prefix's record, each big one goes to OpenSSL as it is."""
        return b"".join(self.seal_pieces(parts, max_frame, piece=None))

    def seal_pieces(
        self, parts: Sequence[bytes], max_frame: int | None = None, *, piece: int | None
    ) -> Iterator[bytes]:
        """:meth:`seal_parts` as ciphertext pieces of about ``piece`` plaintext bytes each
        (None: one), so a sender can write the first while OpenSSL encrypts the next. The
        frame is checked before anything is encrypted; a consumer that stops midway has
        left the channel inside a frame, so its stream must end (as any failed write)."""
        if not self.established:
            raise LocalProtocolError("the lane's handshake is not done")
        limit = self.max_frame if max_frame is None else max_frame
        size = sum(len(part) for part in parts)
        if size > limit:
            raise LocalProtocolError(f"frame of {size} bytes exceeds limit {limit}")
        pieces = list(parts)
        first = [PREFIX.pack(size)]
        while pieces and len(pieces[0]) < READ_RECORD:
            first.append(pieces.pop(0))
        self._tls.write(b"".join(first))
        for part in pieces:
            view = memoryview(part)
            step = piece or len(view)
            for start in range(0, len(view), step):
                self._tls.write(view[start : start + step])
                yield self._outgoing.read()
        tail = self._outgoing.read()
        if tail:
            yield tail

    def feed(self, data: bytes, max_frame: int | None = None) -> list[bytes]:
        """Whole payloads from received bytes. A frame's length is checked when its prefix
        is decrypted, against ``max_frame`` (default: the channel's; a reader that expects
        only small frames passes its own); its body is then read in pieces of at most one
        record, so what a peer makes us hold is what it has sent, and a frame costs one
        copy to join."""
        if not self.established:
            raise LocalProtocolError("the lane's handshake is not done")
        if data:
            self._incoming.write(data)
        limit = self.max_frame if max_frame is None else max_frame
        frames: list[bytes] = []
        while self._step(frames, limit):
            pass
        return frames

    def _step(self, frames: list[bytes], max_frame: int) -> bool:
        """Progress on the current frame (appended to ``frames`` when whole); False when
        TLS needs more bytes first."""
        if self._expected is None:
            piece = self._read(PREFIX.size - len(self._head))
            if piece is None:
                return False
            self._head += piece
            if len(self._head) < PREFIX.size:
                return True
            (length,) = PREFIX.unpack(self._head)
            if length > max_frame:
                raise FrameTooLarge(f"peer announced a {length}-byte frame (limit {max_frame})")
            self._head, self._expected = b"", length
        if self._have < self._expected:
            piece = self._read(min(READ_RECORD, self._expected - self._have))
            if piece is None:
                return False
            self._parts.append(piece)
            self._have += len(piece)
        if self._have == self._expected:
            frames.append(self._parts[0] if len(self._parts) == 1 else b"".join(self._parts))
            self._parts, self._have, self._expected = [], 0, None
        return True

    def _read(self, n: int) -> bytes | None:
        if not self._incoming.pending and not self._tls.pending():
            return None  # nothing to decrypt: skip the costly SSLWantReadError
        try:
            piece = self._tls.read(n)
            if not piece:  # ssl answers the peer's close_notify with b""
                raise RemoteProtocolError("the peer closed the lane's TLS session")
            return piece
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError as exc:
            raise RemoteProtocolError("the peer closed the lane's TLS session") from exc
        except ssl.SSLError as exc:
            raise RemoteProtocolError(f"lane TLS record refused: {exc}") from exc


def pair_in_memory(max_frame: int = DEFAULT_MAX_FRAME) -> tuple[TlsChannel, TlsChannel]:
    """A connected (client, server) pair in one process, for benchmarks of the hop path."""
    identity = LaneIdentity()
    client = TlsChannel(client_context(), server=False, pin=identity.fingerprint)
    server = TlsChannel(identity.context, server=True, max_frame=max_frame)
    to_server, client_done = client.handshake()
    server_done = False
    while not (client_done and server_done):
        to_client, server_done = server.handshake(to_server)
        to_server, client_done = client.handshake(to_client) if not client_done else (b"", True)
    if to_server:
        server.feed(to_server)
    return client, server
