"""Move py-libp2p's Kademlia onto our own protocol id.

py-libp2p 0.8.1 accepts ``protocol_prefix`` but every module hard-codes
``/ipfs/kad/1.0.0`` when it opens or serves streams. We rebind that constant in each
module that imported it, once per process, so p2pedge nodes never mix into the public
IPFS DHT. Every p2pedge node in a process shares this setting by design.
"""

from __future__ import annotations

import importlib

P2PEDGE_KAD_PROTOCOL = "/p2pedge/kad/1.0.0"
_MODULES = (
    "libp2p.kad_dht.common",
    "libp2p.kad_dht.kad_dht",
    "libp2p.kad_dht.peer_routing",
    "libp2p.kad_dht.provider_store",
    "libp2p.kad_dht.value_store",
)
_applied = False


def use_p2pedge_kad_protocol() -> None:
    global _applied
    if _applied:
        return
    from libp2p.custom_types import TProtocol

    for name in _MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "PROTOCOL_ID"):
            setattr(module, "PROTOCOL_ID", TProtocol(P2PEDGE_KAD_PROTOCOL))  # noqa: B010
    _applied = True
