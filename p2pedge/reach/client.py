"""A node behind NAT: a reservation on a relay, its circuit addresses, relayed dials.

We speak the client half of circuit v2 ourselves rather than through py-libp2p's
``CircuitV2Transport``: its dial makes a fresh reservation on every call, retries relay
selection with sleeps, and the swarm never dials ``/p2p-circuit`` addresses anyway.
Replies are bounded (4 KiB) and every field we use is checked before it is trusted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from p2pedge.errors import PeerUnavailable, RemoteProtocolError
from p2pedge.protocols._stream import known_addrs

log = logging.getLogger("p2pedge.reach")

MAX_REPLY = 4096  # a STATUS with a reservation and a few addresses fits easily
MAX_RELAY_ADDRS = 8  # of the relay's own addresses we copy into our card
CIRCUIT = "/p2p-circuit"


@dataclass(frozen=True)
class Reservation:
    relay: str  # the relay's peer id
    expires_at: float  # unix time
    addrs: tuple[str, ...]  # our own addresses through this relay (.../p2p-circuit/p2p/us)


def is_circuit(addr: str) -> bool:
    return CIRCUIT in addr


def _relay_peer(relay_addr: str) -> tuple[Any, Any]:
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    try:
        info = info_from_p2p_addr(Multiaddr(relay_addr))
    except Exception as exc:  # multiaddr and peer-id parse errors have no common base
        raise PeerUnavailable(f"not a relay address with a peer id: {relay_addr!r}") from exc
    return info, info.peer_id


async def _read_hop(stream: Any, timeout: float) -> Any:
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
    from libp2p.utils.varint import read_varint_prefixed_bytes_limited

    try:
        with trio.fail_after(timeout):
            data = await read_varint_prefixed_bytes_limited(stream, MAX_REPLY)
    except trio.TooSlowError as exc:
        raise PeerUnavailable(f"relay did not answer within {timeout:g} s") from exc
    except Exception as exc:  # py-libp2p's stream and varint errors have no common base
        raise RemoteProtocolError(f"bad relay reply: {exc!r}") from exc
    message = HopMessage()
    try:
        message.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise RemoteProtocolError(f"relay reply is not a HopMessage: {exc}") from exc
    if message.type != HopMessage.STATUS:
        raise RemoteProtocolError(f"relay replied with message type {message.type}")
    return message


def _status_name(code: int) -> str:
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import Status

    try:
        return str(Status.Name(code))  # type: ignore[arg-type]
    except ValueError:
        return f"status {code}"


async def reserve(
    host: Any, relay_addr: str, *, timeout: float = 10.0, now: Callable[[], float] = time.time
) -> Reservation:
    """Connect to the relay at ``relay_addr`` (``.../p2p/<relay>``) and reserve a slot.

    Returns our circuit addresses built from the relay address we dialed (the relay's
    own list may hold addresses only reachable inside its network) plus the relay's
    advertised ones, bounded.
    """
    from libp2p.custom_types import TProtocol
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Status
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID
    from multiaddr import Multiaddr

    info, relay_id = _relay_peer(relay_addr)
    try:
        with trio.fail_after(timeout):
            await host.connect(info)
            stream = await host.new_stream(relay_id, [TProtocol(PROTOCOL_ID)])
    except trio.TooSlowError as exc:
        raise PeerUnavailable(f"relay {relay_id} unreachable within {timeout:g} s") from exc
    except Exception as exc:  # py-libp2p's dial and negotiation errors
        raise PeerUnavailable(f"relay {relay_id} unreachable: {exc!r}") from exc
    try:
        from libp2p.utils.varint import encode_varint_prefixed

        await stream.write(
            encode_varint_prefixed(HopMessage(type=HopMessage.RESERVE).SerializeToString())
        )
        reply = await _read_hop(stream, timeout)
    finally:
        with trio.move_on_after(1):
            await stream.close()
    if reply.status != Status.OK:
        raise PeerUnavailable(
            f"relay {relay_id} refused a reservation: {_status_name(reply.status)}"
        )
    if not reply.HasField("reservation"):
        raise RemoteProtocolError("relay accepted without a reservation")
    expires = float(reply.reservation.expire)
    if expires <= now():
        raise RemoteProtocolError("relay granted a reservation that has already expired")
    me = host.get_id().to_base58()
    base = relay_addr if "/p2p/" in relay_addr else f"{relay_addr}/p2p/{relay_id}"
    addrs = [f"{base}{CIRCUIT}/p2p/{me}"]
    for raw in list(reply.reservation.addrs)[:MAX_RELAY_ADDRS]:
        try:
            text = str(Multiaddr(raw))
        except Exception:  # multiaddr's decode errors have no common base
            log.debug("relay %s sent an undecodable address", relay_id)
            continue
        if is_circuit(text) or f"/p2p/{relay_id}" not in text:
            continue  # only the relay's own direct addresses can carry our circuit
        candidate = f"{text}{CIRCUIT}/p2p/{me}"
        if candidate not in addrs:
            addrs.append(candidate)
    return Reservation(relay=relay_id.to_base58(), expires_at=expires, addrs=tuple(addrs))


async def dial_relayed(host: Any, circuit_addr: str, *, timeout: float = 10.0) -> str:
    """Open a connection to the peer at ``circuit_addr`` through its relay.

    The connection joins the swarm like a direct one, so ``host.new_stream`` (and every
    p2pedge protocol) uses it. Returns the peer id.
    """
    from libp2p.connection_types import ConnectionType
    from libp2p.custom_types import TProtocol
    from libp2p.network.connection.raw_connection import RawConnection
    from libp2p.peer.id import ID
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId, Status
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID
    from libp2p.utils.varint import encode_varint_prefixed
    from multiaddr import Multiaddr

    relay_part, sep, target_part = circuit_addr.partition(CIRCUIT)
    if not sep or not target_part.startswith("/p2p/"):
        raise PeerUnavailable(f"not a circuit address: {circuit_addr}")
    try:
        target = ID.from_base58(target_part[len("/p2p/") :])
    except Exception as exc:  # base58 / multihash errors
        raise PeerUnavailable(f"bad peer id in {circuit_addr}") from exc
    info, relay_id = _relay_peer(relay_part)
    try:
        with trio.fail_after(timeout):
            await host.connect(info)
            stream = await host.new_stream(relay_id, [TProtocol(PROTOCOL_ID)])
            connect = HopMessage(type=HopMessage.CONNECT, peer=PeerId(id=target.to_bytes()))
            await stream.write(encode_varint_prefixed(connect.SerializeToString()))
    except trio.TooSlowError as exc:
        raise PeerUnavailable(f"relay {relay_id} unreachable within {timeout:g} s") from exc
    except Exception as exc:  # py-libp2p's dial and negotiation errors
        raise PeerUnavailable(f"relay {relay_id} unreachable: {exc!r}") from exc
    try:
        reply = await _read_hop(stream, timeout)
        if reply.status != Status.OK:
            raise PeerUnavailable(
                f"relay {relay_id} could not connect us to {target}: {_status_name(reply.status)}"
            )
        raw = RawConnection(
            stream=stream,
            initiator=True,
            connection_type=ConnectionType.RELAYED,
            addresses=[Multiaddr(f"/p2p/{relay_id}{CIRCUIT}/p2p/{target}")],
        )
        with trio.fail_after(timeout):
            await host.upgrade_outbound_connection(raw, target)
    except trio.TooSlowError as exc:
        await stream.reset()
        raise PeerUnavailable(f"handshake through relay {relay_id} timed out") from exc
    except (PeerUnavailable, RemoteProtocolError):
        await stream.reset()
        raise
    except Exception as exc:  # security/muxer upgrade errors
        await stream.reset()
        raise PeerUnavailable(
            f"handshake with {target} through {relay_id} failed: {exc!r}"
        ) from exc
    return str(target.to_base58())


async def dial_any(host: Any, addrs: Sequence[str], *, timeout: float = 10.0) -> str:
    """Try a peer's circuit addresses in order; the first that connects wins."""
    errors = []
    for addr in addrs:
        if not is_circuit(addr):
            continue
        try:
            return await dial_relayed(host, addr, timeout=timeout)
        except (PeerUnavailable, RemoteProtocolError) as exc:
            errors.append(str(exc))
    raise PeerUnavailable("no relay path: " + ("; ".join(errors) or "no circuit address"))


async def connect(host: Any, peer_id: str, *, timeout: float = 10.0) -> str:
    """Connect to ``peer_id`` from its peerstore addresses: directly where one answers,
    else through a relay (py-libp2p's swarm skips ``/p2p-circuit`` addresses). Returns
    "connected" (already), "direct" or "relayed"; PeerUnavailable when neither works."""
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    target = ID.from_base58(peer_id)
    if host.get_network().get_connections(target):
        return "connected"
    known = known_addrs(host, target)
    direct = [a for a in known if not is_circuit(str(a))]
    circuits = [str(a) for a in known if is_circuit(str(a))]
    if direct:
        try:
            with trio.fail_after(timeout / 2 if circuits else timeout):
                await host.connect(PeerInfo(target, direct))
            return "direct"
        except trio.TooSlowError:
            log.debug("no direct answer from %s; trying its relays", peer_id)
        except Exception as exc:  # py-libp2p's dial errors have no common base
            log.debug("direct dial to %s failed (%r); trying its relays", peer_id, exc)
    if not circuits:
        raise PeerUnavailable(f"no address of {peer_id} answers, and it names no relay")
    await dial_any(host, circuits, timeout=timeout / 2 if direct else timeout)
    return "relayed"


class ReservationKeeper:
    """Holds a reservation on each relay and renews it before it expires.

    ``on_change`` gets every current circuit address whenever the set changes, so the
    node can re-announce its card (``changed`` fires then too, for waiters). A relay that
    refuses or vanishes is retried with backoff; its addresses leave the card until it
    grants a slot again.
    """

    def __init__(
        self,
        host: Any,
        relays: Sequence[str],
        on_change: Callable[[tuple[str, ...]], None],
        *,
        timeout: float = 10.0,
        retry_s: float = 5.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.relays = tuple(relays)
        self.on_change = on_change
        self.timeout = timeout
        self.retry_s = retry_s
        self.now = now
        self.current: dict[str, Reservation] = {}
        self.changed = trio.Event()

    @property
    def addrs(self) -> tuple[str, ...]:
        return tuple(a for r in self.current.values() for a in r.addrs)

    def _publish(self) -> None:
        self.on_change(self.addrs)
        self.changed.set()
        self.changed = trio.Event()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for relay in self.relays:
                nursery.start_soon(self._keep, relay)

    async def _keep(self, relay_addr: str) -> None:
        backoff = self.retry_s
        while True:
            try:
                granted = await reserve(self.host, relay_addr, timeout=self.timeout, now=self.now)
            except (PeerUnavailable, RemoteProtocolError) as exc:
                log.info("no reservation on %s: %s", relay_addr, exc)
                if self.current.pop(relay_addr, None) is not None:
                    self._publish()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 300.0)
                continue
            backoff = self.retry_s
            previous = self.current.get(relay_addr)
            self.current[relay_addr] = granted
            if previous is None or previous.addrs != granted.addrs:
                self._publish()
            # renew at two thirds of the remaining time, never busier than every retry_s
            await trio.sleep(max(self.retry_s, (granted.expires_at - self.now()) * 2 / 3))
