"""The one host protocol: what protocol code and services need of a node's network.

``p2pedge.node.network.Network`` fits, and so does ``p2pedge.node.Node``; code that serves or
dials a protocol takes the smallest of :class:`Serves` < :class:`StreamHost` <
:class:`PeerFinder` that it needs, never the Node itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from p2pedge.protocols._stream import FramedStream

StreamHandler = Callable[[FramedStream, str], Awaitable[None]]


class Serves(Protocol):
    """Serve protocols: a handler gets each new stream and the remote peer id."""

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None: ...


class StreamHost(Serves, Protocol):
    """Serve protocols and open streams to peers by peer id."""

    @property
    def peer_id(self) -> str: ...

    async def open_stream(
        self, peer_id: str, protocol_id: str, *, timeout: float = 10.0
    ) -> FramedStream: ...


class PeerFinder(StreamHost, Protocol):
    """A :class:`StreamHost` that also finds peers' verified cards."""

    async def find_peers(self, model: str | None = None) -> Sequence[Any]: ...
