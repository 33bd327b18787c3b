"""direct/1.0.0 codec: sealed frames survive any chunking, and every tampering is caught."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pedge.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from p2pedge.protocols.direct import codec
from p2pedge.protocols.direct.codec import SealedChannel

KEY = bytes(range(32))


def pair(max_frame: int = 1 << 16) -> tuple[SealedChannel, SealedChannel]:
    return (
        SealedChannel(KEY, client=True, max_frame=max_frame),
        SealedChannel(KEY, client=False, max_frame=max_frame),
    )


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


def test_both_directions_use_their_own_nonces() -> None:
    client, server = pair()
    assert server.feed(client.seal(b"ping")) == [b"ping"]
    assert client.feed(server.seal(b"pong")) == [b"pong"]
    echo = SealedChannel(KEY, client=True)
    with pytest.raises(RemoteProtocolError):  # a client's own frame reflected back
        echo.feed(SealedChannel(KEY, client=True).seal(b"mirror"))


@pytest.mark.parametrize("position", [0, 3, 4, 10, -1])
def test_a_flipped_byte_fails_authentication(position: int) -> None:
    client, server = pair()
    frame = bytearray(client.seal(b"hidden states"))
    frame[position] ^= 0x01
    with pytest.raises(RemoteProtocolError):
        server.feed(bytes(frame))


def test_replayed_or_reordered_frames_are_refused() -> None:
    client, server = pair()
    first, second = client.seal(b"one"), client.seal(b"two")
    assert server.feed(first) == [b"one"]
    with pytest.raises(RemoteProtocolError):
        server.feed(first)
    client2, server2 = pair()
    first, second = client2.seal(b"one"), client2.seal(b"two")
    with pytest.raises(RemoteProtocolError):
        server2.feed(second)


def test_wrong_key_is_refused() -> None:
    sender = SealedChannel(bytes(32), client=True)
    with pytest.raises(RemoteProtocolError):
        SealedChannel(KEY, client=False).feed(sender.seal(b"x"))


def test_oversized_length_is_refused_before_buffering() -> None:
    _, server = pair(max_frame=1024)
    with pytest.raises(FrameTooLarge):
        server.feed((1024 + codec.TAG_BYTES + 1).to_bytes(4, "big"))
    _, server = pair()
    with pytest.raises(RemoteProtocolError):
        server.feed((codec.TAG_BYTES - 1).to_bytes(4, "big"))


def test_we_refuse_to_seal_what_the_peer_would_refuse() -> None:
    client, _ = pair(max_frame=8)
    with pytest.raises(LocalProtocolError):
        client.seal(b"123456789")
    with pytest.raises(LocalProtocolError):
        SealedChannel(b"short", client=True)


def test_ticket_messages_round_trip_and_are_checked() -> None:
    req = codec.TicketRequest("/p2pedge/pipeline/1.0.0")
    assert codec.decode_request(codec.encode_request(req)) == req
    ticket = codec.Ticket(4001, bytes(16), bytes(32))
    assert codec.decode_ticket(codec.encode_ticket(ticket)) == ticket
    refusal = codec.decode_ticket(codec.encode_ticket(codec.Ticket(0, b"", b"", "busy")))
    assert refusal.port == 0 and refusal.reason == "busy"
    bad = codec.encode_ticket(ticket) | {"key": bytes(31)}
    with pytest.raises(RemoteProtocolError):
        codec.decode_ticket(bad)
    with pytest.raises(RemoteProtocolError):
        codec.decode_ticket(codec.encode_ticket(ticket) | {"port": 70000})
    with pytest.raises(RemoteProtocolError):
        codec.decode_request({"t": "ticket?", "protocol": "x" * 500})
    with pytest.raises(RemoteProtocolError):
        codec.decode_request({"t": "other"})


def test_hello_carries_the_ticket_then_a_sealed_greeting() -> None:
    client, server = pair()
    hello = codec.client_hello(b"T" * 16, client)
    assert codec.hello_ticket(hello[: codec.HELLO_PREFIX]) == b"T" * 16
    frames = server.feed(hello[codec.HELLO_PREFIX :])
    codec.check_greeting(frames[0])
    with pytest.raises(RemoteProtocolError):
        codec.hello_ticket(b"GET / HTTP/1.1\r\n" + b"x" * 17)
    with pytest.raises(RemoteProtocolError):
        codec.check_greeting(b"goodbye")
