"""QUIC next to TCP: the bounded transport settings a host gets when it listens on QUIC.

py-libp2p 0.8.1 builds a QUIC transport (aioquic) for every ``/udp/PORT/quic-v1`` listen
address, next to TCP, and its swarm dials a peer's QUIC address first when it has one.
Its defaults are not safe against a hostile peer, so :func:`host_options` bounds them and
:func:`harden` patches aioquic:

- aioquic grants stream credit by doubling it whenever the peer has sent half, whether
  or not the application read anything, and allocates the gap before an out-of-order
  frame: while nothing is read, what a peer may make us buffer keeps doubling, and
  py-libp2p silently drops stream data past its receive buffer (the stream is then
  corrupt, not reset). We grant credit from what the application has read:
  a peer may have at most ``stream_window`` unread bytes per stream, which is real
  backpressure (nothing is dropped) and a memory bound.
- aioquic lets a peer hold 128 bidirectional and 128 unidirectional streams; libp2p uses
  no unidirectional ones, so a peer gets ``max_streams`` bidirectional and none else.
- py-libp2p's stream reads time out after 30 s; our protocols keep their own deadlines.
- The pre-shared key of a private swarm does not cover QUIC: such a node refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from p2pedge.errors import ConfigError
from p2pedge.protocols._stream import known_addrs

MiB = 1024 * 1024


@dataclass(frozen=True)
class QuicLimits:
    """What one QUIC peer may make a node hold (memory: ``max_streams * stream_window``
    per connection in aioquic plus as much in py-libp2p's stream buffers). How many
    connections there are is the swarm's limit, for TCP and QUIC together."""

    stream_window: int = 4 * MiB  # unread bytes in flight per stream: one blob chunk
    max_streams: int = 32  # streams a peer may hold open on one connection at once
    idle_timeout_s: float = 300.0  # a silent connection is closed after this
    handshake_timeout_s: float = 10.0
    read_timeout_s: float = 3600.0  # py-libp2p's own read deadline; protocols set theirs

    def __post_init__(self) -> None:
        if self.stream_window < 64 * 1024 or self.max_streams < 1:
            raise ConfigError(f"QUIC limits too small: {self}")


LIMITS = QuicLimits()


def is_quic(addr: str) -> bool:
    """Whether a multiaddr (text) names a QUIC transport."""
    parts = addr.split("/")
    return "quic-v1" in parts or "quic" in parts


def host_options(
    listen: Sequence[str], *, private: bool = False, limits: QuicLimits = LIMITS
) -> dict[str, Any]:
    """Extra ``libp2p.new_host`` arguments: bounded QUIC settings when ``listen`` names a
    QUIC address, none otherwise (a TCP-only host neither listens on nor dials QUIC).

    A private swarm's pre-shared key guards only TCP connections (py-libp2p's pnet wraps
    the raw TCP stream), so a ``private`` node may not listen on QUIC at all."""
    quic = [addr for addr in listen if is_quic(addr)]
    if not quic:
        return {}
    if private:
        raise ConfigError(f"a private swarm (psk_file) cannot listen on QUIC: {quic[0]}")
    harden(limits)
    return {"enable_quic": True, "quic_transport_opt": transport_config(limits)}


def prefer_tcp(host: Any) -> None:
    """Dial a peer's TCP addresses before its QUIC ones (py-libp2p ranks QUIC first).

    On a node that listens on both, py-libp2p's swarm picks a peer's QUIC address whenever
    there is one; ``benchmarks/quic.py`` measures QUIC (pure-Python aioquic) far behind
    TCP for bulk traffic, so a peer with a TCP address is dialed there, and QUIC serves
    only peers that offer nothing else.
    """
    swarm = host.get_network()
    dial_any = swarm.dial_peer

    async def dial_peer(peer_id: Any) -> list[Any]:
        from libp2p.network.exceptions import SwarmException

        live = [c for c in swarm.get_connections(peer_id) if not c.is_closed]
        if live:
            return live
        addrs = known_addrs(host, peer_id)
        tcp = [a for a in addrs if "/tcp/" in str(a) and "/p2p-circuit" not in str(a)]
        if tcp and any(is_quic(str(a)) for a in addrs):
            for addr in tcp:
                try:
                    return [await swarm.dial_addr(addr, peer_id)]
                except SwarmException:
                    continue  # then the swarm's own order, QUIC included
        result: list[Any] = await dial_any(peer_id)
        return result

    swarm.dial_peer = dial_peer


def transport_config(limits: QuicLimits = LIMITS) -> Any:
    """py-libp2p's QUIC configuration within ``limits``."""
    from libp2p.transport.quic.config import QUICTransportConfig

    window = limits.stream_window
    return QUICTransportConfig(
        idle_timeout=limits.idle_timeout_s,
        max_concurrent_streams=limits.max_streams,
        MAX_CONCURRENT_STREAMS=limits.max_streams,
        MAX_INCOMING_STREAMS=limits.max_streams,
        MAX_OUTGOING_STREAMS=limits.max_streams,
        CONNECTION_HANDSHAKE_TIMEOUT=limits.handshake_timeout_s,
        STREAM_READ_TIMEOUT=limits.read_timeout_s,
        STREAM_FLOW_CONTROL_WINDOW=window,
        CONNECTION_FLOW_CONTROL_WINDOW=window * 2,
        # credit follows reads (harden), so a stream's buffer never holds more than this
        MAX_STREAM_RECEIVE_BUFFER=window,
        STREAM_SEND_BUFFER_HIGH_WATERMARK=window,
        STREAM_SEND_BUFFER_LOW_WATERMARK=window // 4,
        STREAM_MEMORY_LIMIT_PER_STREAM=window,
        STREAM_MEMORY_LIMIT_PER_CONNECTION=window * limits.max_streams,
    )


_max_streams = LIMITS.max_streams


def harden(limits: QuicLimits = LIMITS) -> None:
    """Patch aioquic and py-libp2p's QUIC stream once per process (see the module doc);
    the stream cap is the last ``limits`` given, for every QUIC host in the process."""
    global _max_streams
    _max_streams = limits.max_streams
    from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
    from aioquic.quic.packet import QuicFrameType
    from libp2p.transport.quic.stream import QUICStream

    if getattr(QuicConnection, "_p2pedge_hardened", False):
        return
    original_init = QuicConnection.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        for limit, value in (
            (self._local_max_streams_bidi, _max_streams),
            (self._local_max_streams_uni, 0),
        ):
            limit.value = limit.sent = value  # ``sent``: what the transport parameters say

    def write_stream_limits(self: Any, builder: Any, space: Any, stream: Any) -> None:
        """aioquic's, with credit from what the application read (``_p2pedge_read``)."""
        if stream.max_stream_data_local:
            window = self._configuration.max_stream_data
            credit = getattr(stream, "_p2pedge_read", 0) + window
            if credit - stream.max_stream_data_local >= window // 2:  # batch updates
                stream.max_stream_data_local = credit
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    original_extract = QUICStream._extract_data_from_buffer
    original_read = QUICStream.read

    def extract(self: Any, n: int) -> bytes:
        data: bytes = original_extract(self, n)
        stream = self._connection._quic._streams.get(self._stream_id)
        if stream is not None and data:
            stream._p2pedge_read = getattr(stream, "_p2pedge_read", 0) + len(data)
        return data

    async def read_and_credit(self: Any, n: int | None = None) -> bytes:
        data: bytes = await original_read(self, n)
        quic = self._connection._quic
        stream = quic._streams.get(self._stream_id)
        if stream is not None and stream.max_stream_data_local:
            window = quic._configuration.max_stream_data
            credit = getattr(stream, "_p2pedge_read", 0) + window
            if credit - stream.max_stream_data_local >= window // 2:
                await self._connection._transmit()  # the peer may be waiting on credit
        return data

    QuicConnection.__init__ = init  # type: ignore[method-assign]
    QuicConnection._write_stream_limits = write_stream_limits  # type: ignore[method-assign]
    QUICStream._extract_data_from_buffer = extract
    QUICStream.read = read_and_credit
    QuicConnection._p2pedge_hardened = True  # type: ignore[attr-defined]
