"""Where a pull gets bytes from: the registry and peers look the same to it.

A *chunk source* returns chunk ``index`` of blob ``digest`` cut at ``chunk_size`` (the
manifest's chunk size: bytes ``[index * chunk_size, (index + 1) * chunk_size)``, shorter at
the end of the blob). The puller never trusts what it gets: every chunk is hashed against
the signed manifest before it is kept. A source signals, by exception type:

* :class:`SourceMissing` - it does not hold that blob or manifest (ask someone else);
* :class:`~p2pedge.errors.Busy` - it is rate-limiting us (back off, others take the work);
  a source may also just be slow or silent: the puller's per-chunk deadline and hedged
  requests handle that, so a source need not time itself out;
* :class:`~p2pedge.errors.PeerUnavailable` / ``PeerTimeout`` /
  :class:`~p2pedge.errors.RemoteProtocolError` - a transient or protocol failure (retry
  elsewhere; repeated failures drop the source for this pull).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from p2pedge.errors import P2PEdgeError
from p2pedge.ids import ModelId


class SourceMissing(P2PEdgeError):
    """This source does not hold the requested blob or manifest."""


@runtime_checkable
class ChunkSource(Protocol):
    """Anything that can hand out verified-later chunks of content-addressed blobs."""

    name: str

    async def fetch_chunk(self, digest: str, index: int, chunk_size: int) -> bytes: ...


@runtime_checkable
class ManifestSource(Protocol):
    """A source that can also hand out signed manifests. It resolves ``@latest`` to the
    newest version it holds; the puller takes the highest across all its sources."""

    name: str

    async def fetch_manifest(self, model: ModelId) -> bytes: ...
