"""direct/2.0.0 codec and TLS channel: frames survive any chunking, every tampering is
caught, and a client talks only to the certificate pinned in its ticket."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pedge.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from p2pedge.protocols.direct import codec
from p2pedge.protocols.direct.tls import LaneIdentity, TlsChannel, client_context, pair_in_memory

SERVER = LaneIdentity()
IMPOSTOR = LaneIdentity()


def handshake(
    client: TlsChannel, server: TlsChannel, *, cut: int = 1 << 20
) -> tuple[TlsChannel, TlsChannel]:
    """Run both handshakes, passing bytes in pieces of ``cut`` until both are done."""
    to_server, client_done = client.handshake()
    server_done = False
    for _ in range(100):
        to_client = b""
        while to_server and not server_done:
            out, server_done = server.handshake(to_server[:cut])
            to_server, to_client = to_server[cut:], to_client + out
        if server_done and to_server:  # what followed the handshake (none in these tests)
            server.feed(to_server)
        to_server = b""
        while to_client and not client_done:
            out, client_done = client.handshake(to_client[:cut])
            to_client, to_server = to_client[cut:], to_server + out
        if client_done and server_done and not to_server:
            return client, server
    raise AssertionError("handshake did not finish")


def pair(max_frame: int = 1 << 16, *, cut: int = 1 << 20) -> tuple[TlsChannel, TlsChannel]:
    client = TlsChannel(client_context(), server=False, pin=SERVER.fingerprint)
    server = TlsChannel(SERVER.context, server=True, max_frame=max_frame)
    return handshake(client, server, cut=cut)


@settings(max_examples=40, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=97), max_size=40),
)
def test_frames_round_trip_under_any_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    client, server = pair()
    wire = b"".join(client.seal(p) for p in payloads)
    got: list[bytes] = []
    pos = 0
    for cut in cuts:
        got += server.feed(wire[pos : pos + cut])
        pos += cut
    got += server.feed(wire[pos:])
    assert got == payloads
    assert server.buffered == 0


def test_the_handshake_survives_byte_by_byte_delivery_and_both_ways_work() -> None:
    client, server = pair(1 << 20, cut=1)
    assert server.feed(client.seal(b"ping")) == [b"ping"]
    assert client.feed(server.seal(b"pong")) == [b"pong"]
    big = bytes(range(256)) * 2304  # 255-token-sized: many TLS records
    assert client.feed(server.seal(big)) == [big]


def test_a_certificate_other_than_the_pinned_one_is_refused() -> None:
    """A man in the middle (or a stranger on the port) with its own certificate: the
    client stops at the handshake, before it would send the ticket's secret."""
    client = TlsChannel(client_context(), server=False, pin=SERVER.fingerprint)
    impostor = TlsChannel(IMPOSTOR.context, server=True)
    with pytest.raises(RemoteProtocolError, match="pinned"):
        handshake(client, impostor)
    assert not client.established
    with pytest.raises(LocalProtocolError):
        client.seal(b"secret")


@pytest.mark.parametrize("position", [0, 5, 10, -1])  # 3-4: the record length
def test_a_flipped_byte_fails_authentication(position: int) -> None:
    client, server = pair()
    record = bytearray(client.seal(b"hidden states"))
    record[position] ^= 0x01
    with pytest.raises(RemoteProtocolError):
        server.feed(bytes(record))


def test_replayed_or_reordered_records_are_refused() -> None:
    client, server = pair()
    first, second = client.seal(b"one"), client.seal(b"two")
    assert server.feed(first) == [b"one"]
    with pytest.raises(RemoteProtocolError):
        server.feed(first)
    client2, server2 = pair()
    first, second = client2.seal(b"one"), client2.seal(b"two")
    with pytest.raises(RemoteProtocolError):
        server2.feed(second)


def test_empty_frames_and_a_close_notify() -> None:
    client, server = pair()
    assert server.feed(client.seal(b"") + client.seal(b"x")) == [b"", b"x"]
    with pytest.raises(ssl.SSLWantReadError):  # unwrap waits for the answer
        client._tls.unwrap()
    with pytest.raises(RemoteProtocolError, match="closed"):
        server.feed(client._outgoing.read())


def test_a_record_from_another_session_is_refused() -> None:
    client, _ = pair()
    _, server = pair()
    with pytest.raises(RemoteProtocolError):
        server.feed(client.seal(b"x"))


def test_oversized_length_is_refused_before_buffering() -> None:
    """The prefix arrives in the first TLS record (at most 16 KiB): the rest of a huge
    frame is refused unread."""
    client, server = pair(max_frame=1 << 16)
    server.reframe(1024)
    with pytest.raises(FrameTooLarge):
        server.feed(client.seal(bytes(1 << 20))[: 17 << 10])
    client, server = pair(max_frame=1 << 16)
    server.feed(client.seal(bytes(1 << 15))[: 17 << 10])
    with pytest.raises(LocalProtocolError):
        server.reframe(1024)  # part of a frame is buffered


def test_misuse_is_a_local_error() -> None:
    client, server = pair(max_frame=8)
    with pytest.raises(LocalProtocolError):
        server.seal(b"123456789")
    with pytest.raises(LocalProtocolError):
        TlsChannel(client_context(), server=False, pin=b"short")
    with pytest.raises(LocalProtocolError):
        client.handshake(b"")
    fresh = TlsChannel(SERVER.context, server=True)
    with pytest.raises(LocalProtocolError):
        fresh.feed(b"x")


def test_a_client_that_is_not_tls_fails_the_handshake() -> None:
    server = TlsChannel(SERVER.context, server=True)
    with pytest.raises(RemoteProtocolError):
        server.handshake(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")


TICKET = codec.Ticket(4001, bytes(16), bytes(range(32)), SERVER.fingerprint)


def test_ticket_messages_round_trip_and_are_checked() -> None:
    req = codec.TicketRequest("/p2pedge/pipeline/1.0.0")
    assert codec.decode_request(codec.encode_request(req)) == req
    assert codec.decode_ticket(codec.encode_ticket(TICKET)) == TICKET
    refusal = codec.decode_ticket(codec.encode_ticket(codec.refusal("busy")))
    assert refusal.port == 0 and refusal.reason == "busy"
    for bad in ({"secret": bytes(31)}, {"cert": bytes(33)}, {"ticket": b""}, {"port": 70000}):
        with pytest.raises(RemoteProtocolError):
            codec.decode_ticket(codec.encode_ticket(TICKET) | bad)
    with pytest.raises(RemoteProtocolError):
        codec.decode_ticket({k: v for k, v in codec.encode_ticket(TICKET).items() if k != "cert"})
    with pytest.raises(RemoteProtocolError):
        codec.decode_request({"t": "ticket?", "protocol": "x" * 500})
    with pytest.raises(RemoteProtocolError):
        codec.decode_request({"t": "other"})
    with pytest.raises(LocalProtocolError):
        codec.encode_request(codec.TicketRequest(""))


def test_hello_prefix_names_the_ticket() -> None:
    hello = codec.hello_prefix(b"T" * 16)
    assert len(hello) == codec.HELLO_PREFIX
    assert codec.hello_ticket(hello) == b"T" * 16
    with pytest.raises(RemoteProtocolError):
        codec.hello_ticket(b"GET / HTTP/1.1\r\n" + b"x" * 17)
    with pytest.raises(LocalProtocolError):
        codec.hello_prefix(b"short")
    with pytest.raises(RemoteProtocolError):
        codec.check_greeting(b"goodbye")


def test_an_in_memory_pair_is_connected() -> None:
    client, server = pair_in_memory(max_frame=64)
    assert server.feed(client.seal(b"step")) == [b"step"]
    assert client.feed(server.seal(b"reply")) == [b"reply"]
    with pytest.raises(FrameTooLarge):
        server.feed(client.seal(bytes(65)))
