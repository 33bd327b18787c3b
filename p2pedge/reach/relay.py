"""The relay role (circuit v2 hop) with bounded reservations and relayed bytes.

py-libp2p 0.8's ``CircuitV2Protocol`` does the relaying; we bound it and close one hole:
its RESERVE handler takes the peer id from the message's optional ``peer`` field when
present, so any connected peer could hold or refresh a reservation in another peer's
name. Our subclass always reserves for the peer on the other end of the connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from p2pedge.errors import ConfigError


@dataclass(frozen=True)
class RelayPolicy:
    """What a public relay lends: few slots, short circuits, few bytes per circuit.

    Relayed circuits exist to coordinate a hole punch or carry small messages; bulk
    traffic belongs on direct connections, so the defaults are tight (as in go-libp2p).
    """

    max_reservations: int = 128
    max_circuits_per_peer: int = 4  # open circuits towards one reserved peer
    circuit_seconds: int = 120  # a circuit is reset after this long
    circuit_bytes: int = 1 << 20  # both directions together; the circuit resets past it
    reservation_seconds: int = 3600

    def __post_init__(self) -> None:
        for name in (
            "max_reservations",
            "max_circuits_per_peer",
            "circuit_seconds",
            "circuit_bytes",
            "reservation_seconds",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"relay {name} must be a positive integer, got {value!r}")

    def limits(self) -> Any:
        from libp2p.relay.circuit_v2.resources import RelayLimits

        return RelayLimits(
            duration=self.circuit_seconds,
            data=self.circuit_bytes,
            max_circuit_conns=self.max_circuits_per_peer,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_seconds,
        )


def _protocol_class() -> type[Any]:
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol

    class OwnPeerCircuitV2(CircuitV2Protocol):  # type: ignore[misc]
        """Reservations are only ever for the connection's own peer."""

        async def _handle_reserve(self, stream: Any, msg: Any) -> None:
            msg.ClearField("peer")  # the handler falls back to the connection's peer
            await super()._handle_reserve(stream, msg)

    return OwnPeerCircuitV2


@asynccontextmanager
async def relay_service(host: Any, policy: RelayPolicy | None = None) -> AsyncIterator[Any]:
    """Serve circuit v2 hop (and stop) on ``host`` while the context is open."""
    from libp2p.tools.anyio_service import background_trio_service

    protocol = _protocol_class()(host, limits=(policy or RelayPolicy()).limits(), allow_hop=True)
    async with background_trio_service(protocol):
        await protocol.event_started.wait()
        yield protocol


@asynccontextmanager
async def accept_relayed(host: Any) -> AsyncIterator[Any]:
    """Accept connections peers open to us through a relay (circuit v2 stop).

    Every node that holds a reservation needs it; it relays nothing for others.
    """
    from libp2p.tools.anyio_service import background_trio_service

    protocol = _protocol_class()(host, allow_hop=False)
    async with background_trio_service(protocol):
        await protocol.event_started.wait()
        yield protocol
