"""Multiaddr parsing with one-line errors (ConfigError) instead of library tracebacks."""

from __future__ import annotations

from typing import Any

from p2pedge.errors import ConfigError


def check_multiaddr(text: str) -> None:
    parse_multiaddr(text)


def parse_multiaddr(text: str) -> Any:
    from multiaddr import Multiaddr

    if not isinstance(text, str) or not text.startswith("/"):
        raise ConfigError(f"not a multiaddr: {text!r}")
    try:
        return Multiaddr(text)
    except Exception as exc:  # multiaddr raises many unrelated types for bad input
        raise ConfigError(f"not a multiaddr: {text!r} ({exc})") from exc


def peer_of(text: str) -> Any:
    """Parse ``/ip4/../tcp/../p2p/<id>`` into a libp2p PeerInfo."""
    from libp2p.peer.peerinfo import info_from_p2p_addr

    addr = parse_multiaddr(text)
    try:
        return info_from_p2p_addr(addr)
    except Exception as exc:  # the library raises InvalidAddrError, ValueError, KeyError...
        raise ConfigError(f"bootstrap address needs /p2p/<peer-id>: {text!r} ({exc})") from exc
