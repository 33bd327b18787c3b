"""The node's share of model distribution: pulls (verified, from peers and a registry),
publishing into the swarm, and fetching only the files a served shard reads.

Kept apart from :mod:`p2pedge.node.models` (runtime and generation); the wiring of peers as
chunk sources to :func:`p2pedge.models.pull.pull` happens here, so ``models/`` never
imports the protocols. Peers are reached over their direct lanes where they offer one
(bulk bytes in TLS done by OpenSSL, not in py-libp2p's Python Noise and yamux), else over
libp2p streams. Store calls run in worker threads: hashing, reading manifests
and materializing all touch the disk, some in proportion to a model's size.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pedge.errors import IntegrityError, ModelNotCached
from p2pedge.ids import LayerRange, ModelId
from p2pedge.models.manifest import Manifest, ManifestError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from p2pedge.models.keys import TrustStore
    from p2pedge.models.pull import PullResult
    from p2pedge.models.store import Store
    from p2pedge.node.context import NodeContext
    from p2pedge.protocols.blob.handler import BlobService

log = logging.getLogger("p2pedge.node")


class Distribution:
    """Pulls into ``store`` trusting ``trust``; ``resolve`` finds a model held in full
    (blocking), ``refresh_card`` puts what the store holds now into the card."""

    def __init__(
        self,
        ctx: NodeContext,
        store: Store,
        trust: TrustStore,
        resolve: Callable[[ModelId], Path],
        refresh_card: Callable[[], Awaitable[None]],
    ) -> None:
        self.ctx = ctx
        self.store = store
        self.trust = trust
        self.resolve = resolve
        self.refresh_card = refresh_card
        self.pulled_bytes = 0  # verified bytes committed by pulls, from any source

    def _pulled(self, nbytes: int) -> None:
        self.pulled_bytes += nbytes

    async def serve_blobs(self, service: BlobService) -> None:
        """Answer blob requests with ``service`` over libp2p and on the direct lane (the
        same gate and quotas on both; the lane starts listening when a peer first asks)."""
        from p2pedge.protocols.blob.codec import PROTOCOL_ID

        self.ctx.set_stream_handler(PROTOCOL_ID, service.handle)
        await self.ctx.lanes.offer(PROTOCOL_ID, service.handle)

    async def pull(
        self, model: ModelId, registry: str | None, files: Sequence[str] | None = None
    ) -> Path:
        """``files`` of ``model`` (all by default) fetched and verified; the directory."""
        result = await self._fetch(model, registry, files)
        return await trio.to_thread.run_sync(self.store.materialize, result.manifest.model, files)

    async def publish(
        self,
        directory: Path,
        model: ModelId,
        key: Ed25519PrivateKey | Path,
        *,
        category: str = "llm",
        tags: Sequence[str] = (),
    ) -> Manifest:
        """Sign ``directory`` as ``model`` into the store and announce it: from then on peers
        (shard servers among them) can pull it, or any of its files, from this node."""
        from p2pedge.protocols.blob.handler import announce_store

        manifest = await trio.to_thread.run_sync(
            lambda: self.store.add_model_dir(
                directory, model.name, model.version, category, key, tags=tags
            )
        )
        await self.refresh_card()
        if not self.ctx.local_only:
            await announce_store(self.ctx, self.store, [manifest.model])
        return manifest

    async def shard_source(
        self, model: ModelId, layers: LayerRange | None
    ) -> tuple[Path, LayerRange | None]:
        """Where to build a served shard from: the model's directory when it is here in
        full, else only the files that shard reads, pulled from peers (and the configured
        registry) and verified chunk by chunk: its graph and facts first, then, once the
        range is known (placement may choose it), its blocks' weights."""
        try:
            return await trio.to_thread.run_sync(self.resolve, model), layers
        except ModelNotCached:
            pass
        from p2pedge.models.convert.layout import MODEL_FILE
        from p2pedge.models.convert.shards import shard_files
        from p2pedge.protocols.pipeline.serving import model_layers, place
        from p2pedge.records.facts import FACTS_FILE

        registry = self.ctx.config.registry
        head, _ = await self._pull_held(model, registry, [FACTS_FILE, MODEL_FILE])
        if layers is None:
            n_layers = await trio.to_thread.run_sync(model_layers, head)
            layers = await place(
                self.ctx,
                model.name,
                n_layers,
                max(n_layers // 2, 1),
                model_dir=head,
                memory_budget=self.ctx.config.memory_budget,
            )
        files = await trio.to_thread.run_sync(shard_files, head, layers)
        path, manifest = await self._pull_held(model, registry, files)
        wanted = manifest.select(files)
        log.info(
            "pulled %s blocks %s: %d files, %.1f of %.1f MB",
            manifest.model,
            layers,
            len(wanted),
            sum(f.size for f in wanted) / 1e6,
            sum(f.size for f in manifest.files) / 1e6,
        )
        return path, layers

    async def _pull_held(
        self, model: ModelId, registry: str | None, files: Sequence[str]
    ) -> tuple[Path, Manifest]:
        """``files`` of ``model`` fetched, and its manifest; the directory holds every file
        held so far (a node may hold a shard's files and a client's tokenizer files of one
        model)."""
        result = await self._fetch(model, registry, files)
        pulled = result.manifest.model
        path = await trio.to_thread.run_sync(
            lambda: self.store.materialize(pulled, self.store.held_paths(pulled))
        )
        return path, result.manifest

    async def _fetch(
        self, model: ModelId, registry: str | None, files: Sequence[str] | None
    ) -> PullResult:
        from p2pedge.models.pull import pull
        from p2pedge.protocols.blob.handler import announce_store, swarm_sources
        from p2pedge.registry.client import RegistryClient

        # with a manifest here, peers holding some of its files count as sources too
        known = await trio.to_thread.run_sync(self._stored_manifest, model)
        blobs = [f.sha256 for f in known.select(files)] if known is not None else []
        sources: list[Any] = []
        if not self.ctx.local_only:
            lanes = self.ctx.lanes
            sources.extend(await swarm_sources(self.ctx, model, blobs=blobs, lanes=lanes))
        client = RegistryClient(registry) if registry else None
        if client is not None:
            sources.append(client)
        try:
            result = await pull(
                model, self.store, sources, self.trust, files=files, on_bytes=self._pulled
            )
        finally:
            for source in sources:
                await source.aclose()
        await self.refresh_card()
        if not self.ctx.local_only:
            await announce_store(self.ctx, self.store, [result.manifest.model])
        return result

    def _stored_manifest(self, model: ModelId) -> Manifest | None:
        try:
            return self.store.get_manifest(self.store.resolve(model), self.trust)
        except (ModelNotCached, IntegrityError, ManifestError, KeyError):
            return None
