"""Whether peers can dial us: AutoNAT v1, with a dial-back that really dials.

py-libp2p 0.8's ``AutoNATService`` answers a dial-back request with
``host.connect(...)``, which returns at once when a connection to the peer exists; the
requester is always connected (it asked over that connection), so every node looked
publicly reachable. Our server opens a fresh connection to each candidate address
(``dial_addr``), closes it again, and reports what happened.

The client offers its listen addresses and, as DCUtR predicts them, the public IP a peer
observed with our listen port: a server dials only addresses on the IP it sees us from,
so behind a NAT only that prediction is ever tried, and a NAT drops it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio

log = logging.getLogger("p2pedge.reach")

PUBLIC = "public"
PRIVATE = "private"
UNKNOWN = "unknown"


def _service_class() -> type[Any]:
    from libp2p.host.autonat.autonat import AutoNATService
    from multiaddr import Multiaddr

    class FreshDialAutoNAT(AutoNATService):  # type: ignore[misc]
        dial_timeout = 5.0

        async def _try_dial(self, peer_id: Any, addrs: list[bytes]) -> bytes | None:
            network = self.host.get_network()
            for raw in addrs[:4]:  # a requester may list many; a few suffice
                try:
                    with trio.fail_after(self.dial_timeout):
                        conn = await network.dial_addr(Multiaddr(raw), peer_id)
                except trio.TooSlowError:
                    continue
                except Exception as exc:  # py-libp2p's dial errors have no common base
                    log.debug("autonat dial-back to %s failed: %r", peer_id, exc)
                    continue
                with trio.move_on_after(2) as scope:
                    scope.shield = True
                    await conn.close()
                return bytes(raw)
            return None

    return FreshDialAutoNAT


def autonat(host: Any, *, serve: bool = True, confirmations: int = 1) -> Any:
    """An AutoNAT service on ``host``; ``serve`` answers other peers' dial-back requests."""
    return _service_class()(host, serve=serve, confirmations=confirmations)


def candidate_addrs(host: Any) -> list[bytes]:
    """Our listen addresses, plus each observed public IP with our TCP listen ports."""
    from multiaddr import Multiaddr

    listen = [a for a in host.get_addrs() if "/p2p-circuit" not in str(a)]
    ports = set()
    for addr in listen:
        try:
            ports.add(addr.value_for_protocol("tcp"))
        except Exception:  # multiaddr raises for a missing protocol
            continue
    out = []
    for addr in listen:
        text = str(addr).split("/p2p/")[0]
        out.append(Multiaddr(text).to_bytes())
    manager = getattr(host, "_observed_addr_manager", None)
    observed = manager.addrs(min_observers=1) if manager is not None else []
    for addr in observed[:8]:
        try:
            ip = addr.value_for_protocol("ip4")
        except Exception:  # not an IPv4 observation
            continue
        for port in sorted(ports):
            candidate = Multiaddr(f"/ip4/{ip}/tcp/{port}").to_bytes()
            if candidate not in out:
                out.append(candidate)
    return out


async def check_reachability(service: Any, servers: Sequence[str], *, timeout: float = 15) -> str:
    """Ask each server to dial us back; PUBLIC, PRIVATE or UNKNOWN (not enough verdicts)."""
    from libp2p.host.autonat.autonat import AutoNATStatus
    from libp2p.peer.id import ID

    for server in servers:
        server_id = ID.from_base58(server)
        try:
            await service.query_server(server_id, candidate_addrs(service.host), timeout=timeout)
        except trio.TooSlowError:
            service.dial_results[server_id] = False
        except Exception as exc:  # the server's stream failed: no verdict from it
            log.info("autonat server %s gave no verdict: %r", server, exc)
    service.update_status()
    status = service.get_status()
    return {AutoNATStatus.PUBLIC: PUBLIC, AutoNATStatus.PRIVATE: PRIVATE}.get(status, UNKNOWN)
