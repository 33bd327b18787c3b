"""Keep py-libp2p's chatter out of our output.

Every normal end of a DHT request logs "Failed to read DHT message", thousands of
times per bootstrap; we raise the library's loggers to ERROR unless the user asks for
debug output (P2PEDGE_LIBP2P_LOG=debug).
"""

from __future__ import annotations

import logging
import os
import warnings

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
