"""Settings py-libp2p 0.8.1 does not expose, applied to our hosts.

Logging: every normal end of a DHT request logs "Failed to read DHT message", thousands of
times per bootstrap; we raise the library's loggers to CRITICAL unless the user asks for
debug output (P2PEDGE_LIBP2P_LOG=debug).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

_done = False


def quiet_libp2p() -> None:
    global _done
    if _done:
        return
    level = os.environ.get("P2PEDGE_LIBP2P_LOG", "critical").upper()
    for name in ("libp2p", "multiaddr", "async_service", "anyio_service"):
        logging.getLogger(name).setLevel(getattr(logging, level, logging.CRITICAL))
    warnings.filterwarnings("ignore", module=r"libp2p(\..*)?")
    _done = True


async def _no_auto_connect() -> None:
    return None


def disable_auto_connect(host: Any) -> None:
    """Dial only what the DHT and our protocols need.

    py-libp2p 0.8.1's auto-connector dials every known peer while a node has fewer than
    its low watermark (100) connections; in a 20-node simnet that meant a full mesh of
    380 Noise + identify handshakes on one event loop. There is no setting for it.
    """
    host.get_network().auto_connector.maybe_connect = _no_auto_connect
