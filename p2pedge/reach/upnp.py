"""UPnP: ask the home router (an Internet Gateway Device) to forward a port to this node.

A node behind a router that speaks UPnP IGD gets its listen port forwarded from the
router's public address, and announces that address: peers then dial it directly, with
no relay and no hole punch. miniupnpc (a py-libp2p dependency) does the discovery (SSDP
on the LAN) and the SOAP calls; they block, so they run in ``trio.to_thread``. What the
gateway answers is checked before it is announced: a gateway on the LAN is as hostile as
any peer, and an address it made up would only send peers elsewhere.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from p2pedge.errors import PeerUnavailable, RemoteProtocolError

log = logging.getLogger("p2pedge.reach")
DISCOVER_MS = 1000  # how long SSDP discovery waits for gateways to answer


@dataclass(frozen=True)
class Mapping:
    """A port the gateway forwards: ``external_ip:external_port`` -> our ``internal_port``."""

    external_ip: str
    external_port: int
    internal_port: int
    protocol: str  # "TCP" or "UDP"

    def multiaddr(self, peer_id: str) -> str:
        transport = "tcp" if self.protocol == "TCP" else "udp"
        suffix = "" if self.protocol == "TCP" else "/quic-v1"
        return f"/ip4/{self.external_ip}/{transport}/{self.external_port}{suffix}/p2p/{peer_id}"


def lan_tcp_port(addrs: Sequence[str]) -> int | None:
    """The port of our first TCP listen address on a LAN (not loopback): the one to map."""
    for addr in addrs:
        parts = addr.split("/")
        if (
            len(parts) > 4
            and parts[1] == "ip4"
            and parts[3] == "tcp"
            and "p2p-circuit" not in parts
        ):
            if not ipaddress.IPv4Address(parts[2]).is_loopback:
                return int(parts[4])
    return None


def _check_external(address: object) -> str:
    """The gateway's public address, if it is one an outside peer could dial."""
    try:
        ip = ipaddress.IPv4Address(str(address))
    except ValueError as exc:
        raise RemoteProtocolError(f"gateway gave no usable external address: {address!r}") from exc
    if ip.is_private or ip.is_loopback or ip.is_unspecified or ip.is_multicast:
        # a router behind another NAT (carrier-grade, or a second router): not reachable
        raise PeerUnavailable(f"gateway's external address {ip} is not public")
    return str(ip)


def _gateway() -> Any:
    """A miniupnpc client (the module ships no type information)."""
    gateway = importlib.import_module("miniupnpc").UPnP()
    gateway.discoverdelay = DISCOVER_MS
    return gateway


def map_port(port: int, protocol: str = "TCP", lease_s: int = 3600) -> Mapping:
    """Discover the gateway and forward ``port`` (the same number outside); blocking."""
    if protocol not in ("TCP", "UDP") or not 0 < port < 65536:
        raise ValueError(f"cannot map {protocol} port {port}")
    gateway = _gateway()
    try:
        if gateway.discover() == 0:
            raise PeerUnavailable("no UPnP gateway answered on the LAN")
        gateway.selectigd()
        external = _check_external(gateway.externalipaddress())
        gateway.addportmapping(port, protocol, gateway.lanaddr, port, "p2pedge", "", lease_s)
        # what the gateway now says it forwards, not what we asked for
        held = gateway.getspecificportmapping(port, protocol)
    except Exception as exc:  # miniupnpc raises bare Exception("...") for every SOAP error
        if isinstance(exc, (PeerUnavailable, RemoteProtocolError)):
            raise
        raise PeerUnavailable(f"UPnP gateway refused {protocol} {port}: {exc}") from exc
    # the gateway's answer is the router's to shape: anything but (our address, port, ...)
    # is its fault, never an IndexError out of the mapping task
    if not (isinstance(held, tuple) and len(held) >= 2 and held[:2] == (gateway.lanaddr, port)):
        raise RemoteProtocolError(f"gateway reports another mapping for {port}: {held!r}")
    return Mapping(external, port, port, protocol)


def unmap(mapping: Mapping) -> None:
    """Remove a mapping (blocking); a gateway that went away keeps it until its lease ends."""
    gateway = _gateway()
    try:
        if gateway.discover():
            gateway.selectigd()
            gateway.deleteportmapping(mapping.external_port, mapping.protocol)
    except Exception as exc:  # miniupnpc's bare Exception: the lease ends it anyway
        log.info("UPnP mapping %s left to expire: %s", mapping, exc)


async def keep_mapped(
    port: int,
    on_change: Callable[[Mapping | None], None],
    *,
    protocol: str = "TCP",
    lease_s: int = 3600,
    retry_s: float = 300.0,
) -> None:
    """Hold a mapping for ``port`` until cancelled: renew it at half its lease, report it
    (or None when it is lost) through ``on_change``, and remove it on the way out."""
    to_thread: Any = trio.to_thread.run_sync  # (its typing refuses keyword arguments)
    held: Mapping | None = None
    try:
        while True:
            try:
                mapping = await trio.to_thread.run_sync(map_port, port, protocol, lease_s)
            except (PeerUnavailable, RemoteProtocolError):
                mapping = None
            if mapping != held:
                held = mapping
                on_change(held)
            await trio.sleep(lease_s / 2 if held is not None else retry_s)
    finally:
        if held is not None:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await to_thread(unmap, held, abandon_on_cancel=True)  # a gateway may hang
