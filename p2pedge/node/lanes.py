"""The node's direct lanes: serve hot protocols over TLS 1.3 on TCP, dial them with fallback.

libp2p still finds, authenticates and admits the peer (private swarm and allow-list
included): the lane's ticket, secret and certificate fingerprint travel over a libp2p
stream, which is what binds the lane to the peer id. Only the bytes of
protocols that opt in (the pipeline's hops, the blob protocol's chunks) then take the lean
path. A peer without a lane, or a lane that cannot be dialled (no IP address: a relayed
connection; a firewalled port; an older peer not serving that protocol there), costs one
failed attempt and the libp2p stream is used; the failure is remembered per peer and
protocol for a while so the next stream does not pay it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from p2pedge.errors import ConfigError, PeerUnavailable, RemoteProtocolError
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.direct import codec
from p2pedge.protocols.direct.handler import DirectLane, StreamHandler, open_direct
from p2pedge.protocols.direct.machine import LaneLimits
from p2pedge.protocols.host import StreamHost

log = logging.getLogger(__name__)

NO_LANE_MEMORY_S = 60.0


def lane_host(listen: tuple[str, ...]) -> str:
    """The IP of the first ip4/ip6 listen address (where peers already reach us)."""
    for addr in listen:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            return parts[2]
    return "127.0.0.1"


class Lanes:
    """Lanes over ``host`` (which carries the tickets, and the fallback), listening in the
    nursery ``nursery()`` returns on ``listen_host:port``. ``limits`` bound what strangers
    on the lane port and ticket askers may hold; set them before the listener starts: at
    the first :meth:`serve`, or at the first ticket a peer asks for a protocol only
    :meth:`offer`-ed (a node's blobs: no port is opened until someone pulls)."""

    def __init__(
        self,
        host: StreamHost,
        nursery: Callable[[], trio.Nursery],
        *,
        enabled: bool = True,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        limits: LaneLimits | None = None,
    ) -> None:
        self.host = host
        self.nursery = nursery
        self.enabled = enabled
        self.listen_host = listen_host
        self.port = port
        self.limits = limits or LaneLimits()
        self.server: DirectLane | None = None
        self.opened = 0
        self.fallbacks = 0
        self._no_lane_until: dict[tuple[str, str], float] = {}
        self._offered: dict[str, StreamHandler] = {}
        self._starting = trio.Lock()
        self._start_failed = False

    async def serve(self, protocol_id: str, handler: StreamHandler) -> None:
        """Also serve ``protocol_id`` on the lane; the listener starts now if it has not
        (``ConfigError`` when it cannot listen)."""
        if not self.enabled:
            return
        self._offered[protocol_id] = handler
        server = await self._start()
        server.enable(protocol_id, handler)

    async def offer(self, protocol_id: str, handler: StreamHandler) -> None:
        """Serve ``protocol_id`` on the lane once it listens, starting it when a peer first
        asks for a ticket; a lane that cannot listen then leaves that peer on libp2p."""
        if not self.enabled:
            return
        self._offered[protocol_id] = handler
        if self.server is not None:
            self.server.enable(protocol_id, handler)
        else:
            self.host.set_stream_handler(codec.PROTOCOL_ID, self._first_ticket)

    async def _first_ticket(self, framed: FramedStream, peer_id: str) -> None:
        """The ticket handler until the listener runs: start it, then answer as it does."""
        if self._start_failed:
            return  # the stream closes unanswered: the asker falls back to libp2p
        try:
            server = await self._start()
        except ConfigError as exc:
            self._start_failed = True
            log.warning("direct lane unavailable, peers use libp2p streams: %s", exc)
            return
        await server.handle_ticket(framed, peer_id)

    async def _start(self) -> DirectLane:
        async with self._starting:
            if self.server is not None:
                return self.server
            server = DirectLane(host=self.listen_host, port=self.port, limits=self.limits)
            try:
                await server.start(self.nursery())
            except OSError as exc:
                where = f"{server.host}:{server.port}"
                raise ConfigError(f"cannot listen for the direct lane on {where}: {exc}") from exc
            for protocol_id, handler in self._offered.items():
                server.enable(protocol_id, handler)
            self.server = server
            self.host.set_stream_handler(codec.PROTOCOL_ID, server.handle_ticket)
            log.info("direct lane listening on %s:%d", server.host, server.port)
            return server

    async def open(self, peer_id: str, protocol_id: str, *, timeout: float) -> FramedStream:
        """A lane stream to ``peer_id`` if it offers one, else a libp2p stream."""
        now = trio.current_time()
        if self.enabled and self._no_lane_until.get((peer_id, protocol_id), 0.0) <= now:
            try:
                stream = await self._open_lane(peer_id, protocol_id, timeout)
                self.opened += 1
                return stream
            except (PeerUnavailable, RemoteProtocolError) as exc:
                log.debug("no direct lane to %s (%s); using libp2p", peer_id, exc)
                self._remember_miss((peer_id, protocol_id), now)
                self.fallbacks += 1
        return await self.host.open_stream(peer_id, protocol_id, timeout=timeout)

    def _remember_miss(self, key: tuple[str, str], now: float) -> None:
        """Skip the lane for ``(peer, protocol)`` for a while; forgets misses that have run
        out (a peer may serve the pipeline on its lane but not, being older, blobs)."""
        for stale in [k for k, until in self._no_lane_until.items() if until <= now]:
            del self._no_lane_until[stale]
        self._no_lane_until[key] = now + NO_LANE_MEMORY_S

    async def _open_lane(self, peer_id: str, protocol_id: str, timeout: float) -> FramedStream:
        ticket_stream = await self.host.open_stream(peer_id, codec.PROTOCOL_ID, timeout=timeout)
        try:
            return await open_direct(ticket_stream, protocol_id, timeout=timeout)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await ticket_stream.close()
                except PeerUnavailable:
                    log.debug("ticket stream to %s was already gone", peer_id)
