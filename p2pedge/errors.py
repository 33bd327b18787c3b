"""Typed errors: each says who is to blame.

``LocalProtocolError`` means this process misused an API; ``RemoteProtocolError``
means a peer sent something that breaks the protocol. Both derive from
``ProtocolError`` so callers can catch either. Stdlib only.
"""

from __future__ import annotations

import argparse
from typing import Any


class P2PEdgeError(Exception):
    """Base of every error p2pedge raises on purpose."""


class ProtocolError(P2PEdgeError):
    """A protocol rule was broken; subclasses say by whom."""


class LocalProtocolError(ProtocolError):
    """We misused a protocol or API (a bug or bad argument on this side)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent bytes that break the protocol (size, dtype, shape, state)."""


class FrameTooLarge(RemoteProtocolError):
    """A length prefix announced more bytes than the limit allows."""


class InvalidRecord(RemoteProtocolError):
    """A signed record failed validation (signature, expiry, size or shape)."""


class PeerUnavailable(P2PEdgeError):
    """A peer could not be reached, or dropped the connection."""


class PeerTimeout(PeerUnavailable):
    """A peer did not answer within our deadline (frozen or overloaded)."""


class PrivateSwarmRejected(PeerUnavailable):
    """The remote end is not in our private swarm (wrong pre-shared key or not allowed)."""


class ModelNotCached(P2PEdgeError, KeyError):
    """The named model is not in the local store or cache."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model

    def __str__(self) -> str:
        return f"model not cached: {self.model!r}"


class ModelLoadError(P2PEdgeError):
    """A model directory exists but could not be loaded."""


class IntegrityError(P2PEdgeError):
    """Bytes did not match their digest, or a signature did not verify."""


class Busy(P2PEdgeError):
    """A queue or quota is full; retry later or elsewhere.

    ``limit`` names the limit that refused (e.g. ``"blob.bytes_in_flight"``) and ``scope``
    whose share was exhausted: ``"peer"``, ``"source"`` (one network address, whatever
    peer ids it uses) or ``"total"``. Both are empty for an unnamed queue.
    """

    def __init__(self, message: str = "", *, limit: str = "", scope: str = "") -> None:
        super().__init__(message)
        self.limit = limit
        self.scope = scope


class ShardFailed(P2PEdgeError):
    """A shard server failed mid-session; the client may recover elsewhere."""


class ConfigError(P2PEdgeError, ValueError):
    """A configuration value is invalid (bad multiaddr, unreadable key file...)."""


class MemoryBudgetError(ConfigError):
    """A node's memory budget cannot hold what it was asked to serve (the message gives
    the bytes needed and the budget)."""


EXIT_USAGE = 2  # a command line the user got wrong


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line on stderr (no usage dump) and exit code 2: the user is
    to blame, and one line says for what."""

    def error(self, message: str) -> Any:  # argparse types it NoReturn
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")
