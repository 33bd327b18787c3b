"""The node's side of the HTTP API: an :class:`~p2pedge.api.backend.ApiBackend` over a
running Node's public methods, and :func:`serve_node_api`, which the node starts when
``NodeConfig.api`` asks (the API package never imports the node).

Local models stream token by token from the node's runtime (``models.inference``),
models whose blocks the swarm covers through shard servers (``models.sharded_stream``),
and ``auto``, specialists and models a peer holds whole go through the orchestrator,
which answers whole.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from p2pedge.api.app import ApiApp
from p2pedge.api.backend import (
    BackendStats,
    Embedded,
    ModelEntry,
    NotAnEmbedder,
    Piece,
    Routed,
    Target,
    Usage,
)
from p2pedge.api.schema import (
    LOCAL_LOGPROBS,
    ApiLimits,
    EmbeddingRequest,
    GenerationRequest,
    bad,
)
from p2pedge.api.server import load_key, parse_api_listen, serve_api
from p2pedge.api.swarm import MAX_ITEMS, MAX_PEERS, card_json, coverage, text
from p2pedge.errors import (
    Busy,
    LocalProtocolError,
    ModelNotCached,
    P2PEdgeError,
    PeerTimeout,
    PeerUnavailable,
)
from p2pedge.ids import ModelId
from p2pedge.records.card import CapabilityCard, covers_model
from p2pedge.runtime.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    EmbeddingSpec,
    listed_embedding,
    read_manifest,
)

if TYPE_CHECKING:
    from p2pedge.node.announcer import Announcer
    from p2pedge.node.config import NodeConfig
    from p2pedge.node.models import NodeModels
    from p2pedge.node.peers import Peers
    from p2pedge.orchestrator.orchestrator import Answer, Orchestrator

log = logging.getLogger("p2pedge.api")
AUTO = "auto"
CARDS_TTL_S = 2.0
PEER_TRIES = 3  # peers holding a model that one request tries, least loaded first


class NodeParts(Protocol):
    """What the API reads of a running node: its parts, not the Node (which builds this
    module's server, so naming it here would close an import cycle)."""

    @property
    def config(self) -> NodeConfig: ...
    @property
    def peer_id(self) -> str: ...
    @property
    def models(self) -> NodeModels: ...
    @property
    def peers(self) -> Peers: ...
    @property
    def announcer(self) -> Announcer: ...


def api_for(node: NodeParts, *, cards_ttl_s: float = CARDS_TTL_S) -> NodeBackend:
    """The API's view of ``node`` (which must be running)."""
    return NodeBackend(node, cards_ttl_s)


def _pulls(partial: Path) -> list[dict[str, Any]]:
    """Unfinished pulls: the store's resume state, one folder of verified chunks per file."""
    out: list[dict[str, Any]] = []
    folders = sorted(partial.iterdir()) if partial.is_dir() else []
    for folder in folders[:MAX_ITEMS]:
        try:
            sizes = [p.stat().st_size for p in folder.iterdir()]
        except OSError:  # the pull finished (or was dropped) meanwhile
            continue
        digest, _, chunk_size = folder.name.partition("-")
        out.append(
            {
                "blob": digest[:16],
                "chunks": len(sizes),
                "chunk_size": int(chunk_size) if chunk_size.isdigit() else 0,
                "bytes": sum(sizes),
            }
        )
    return out


def _name(model_id: str) -> str | None:
    try:
        return ModelId.parse(model_id).name
    except ValueError:
        return None


class NodeBackend:
    def __init__(self, node: NodeParts, cards_ttl_s: float = CARDS_TTL_S) -> None:
        self._models = node.models
        self._peers = node.peers
        self._announcer = node.announcer
        self.peer_id = node.peer_id
        self.local_only = node.config.local_only
        self.cards_ttl_s = cards_ttl_s
        self._cached: list[CapabilityCard] = []
        self._cards_at = -math.inf
        self._cards_lock = trio.Lock()

    # -- names -------------------------------------------------------------------------

    async def _cards(self) -> list[CapabilityCard]:
        """Peers' verified cards, fetched at most once per ``cards_ttl_s``: every listing
        and every request for a model not held here reads them, and a client must not
        turn its requests into DHT traffic."""
        if self.local_only:
            return []
        async with self._cards_lock:
            if trio.current_time() - self._cards_at < self.cards_ttl_s:
                return self._cached
            try:
                found = await self._peers.find_peers()
            except (P2PEdgeError, LocalProtocolError) as exc:
                log.info("model listing without peers: %s", exc)
                found = []
            self._cached = [c for c in found if c.peer_id != self.peer_id]
            self._cards_at = trio.current_time()
            return self._cached

    def _orchestrator(self) -> Orchestrator:
        if self._models.orchestrator is None:
            raise LocalProtocolError("node is not running; use `async with Node(...)`")
        return self._models.orchestrator

    def _specialists(self) -> dict[str, Any]:
        orchestrator = self._models.orchestrator
        return dict(orchestrator.catalog.specialists) if orchestrator is not None else {}

    def _embedding(self, mid: ModelId) -> EmbeddingSpec | None:
        """What the local model's manifest says about embeddings (blocking: reads it); a
        broken manifest raises ModelLoadError rather than pass for a non-embedder."""
        try:
            return read_manifest(self._models.resolve(mid)).embedding
        except ModelNotCached:
            return None

    def _listed_embedding(self, mid: ModelId) -> EmbeddingSpec | None:
        """An embedder's facts for a listing: its manifest file read as it lies, from its
        directory or the store's blob, without materializing (hashing) a stored model."""
        models = self._models
        try:
            directory = models.dirs.get(mid.name)
            if directory is not None:
                path = directory / MANIFEST
            else:
                entry = models.store.get_manifest(mid).file(MANIFEST)
                path = models.store.blob_path(entry.sha256)
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                return None
            return listed_embedding(path.read_bytes())
        except (OSError, KeyError, ValueError, P2PEdgeError):
            return None  # no manifest file: a decoder; unreadable: its load will say why

    def _local_models(self) -> list[ModelEntry]:
        """Models stored here; an embedder says so, with its vectors' width."""
        out = []
        for cached in self._models.cached_models():
            mid = ModelId.parse(cached.id)
            detail: dict[str, Any] = {"version": cached.id}
            spec = self._listed_embedding(mid)
            if spec is not None:
                detail.update(kind="embedding", dimensions=spec.dimensions)
            out.append(ModelEntry(mid.name, "local", detail))
        return out

    async def models(self) -> list[ModelEntry]:
        out: dict[str, ModelEntry] = {AUTO: ModelEntry(AUTO, "auto", {"routed": "orchestrator"})}
        for entry in await trio.to_thread.run_sync(self._local_models):
            out.setdefault(entry.id, entry)
        cards = await self._cards()
        for card in cards:
            for offered in card.models:
                peer_model = _name(offered.id)
                if peer_model is None:
                    continue  # a peer's card named something that is not a model id
                entry = out.setdefault(peer_model, ModelEntry(peer_model, "peer", {"peers": []}))
                if entry.where == "peer":
                    entry.detail["peers"].append(card.peer_id)
        for name in sorted({s.model for c in cards for s in c.layers_served}):
            held = out.get(name)
            if covers_model(cards, name) and (held is None or held.where == "peer"):
                out[name] = ModelEntry(name, "sharded", held.detail if held else {})
        for name, spec in self._specialists().items():
            detail = {"category": spec.category, "model": spec.model}
            out.setdefault(name, ModelEntry(name, "specialist", detail))
        return list(out.values())

    async def target(self, model: str) -> Target | None:
        if model == AUTO:
            return Target(model, "auto")
        try:
            mid = ModelId.parse(model)
        except ValueError:
            return None

        def local() -> Target | None:
            try:
                path = self._models.resolve(mid)
            except ModelNotCached:
                return None
            warm = self._models.inference.cache.is_loaded(path)
            return Target(model, "local", warm=warm, path=path)

        found = await trio.to_thread.run_sync(local)
        if found is not None:
            return found
        spec = self._specialists().get(model)
        if spec is not None:
            return Target(model, "specialist", category=spec.category)
        cards = await self._cards()
        if covers_model(cards, mid.name):
            return Target(model, "sharded")
        if any(card.has_model(model) for card in cards):
            return Target(model, "peer")
        return None

    # -- generation --------------------------------------------------------------------

    async def stream(
        self, target: Target, request: GenerationRequest, usage: Usage | None = None
    ) -> AsyncGenerator[Piece, None]:
        p = request.params
        kwargs: dict[str, Any] = dict(
            messages=request.messages, prompt=request.prompt, max_tokens=p.max_tokens,
            temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
            stop=list(p.stop),
        )  # fmt: skip
        if target.where == "local":
            tokens = self._models.inference.stream(
                target.model, logprobs=p.logprobs, top_logprobs=p.top_logprobs,
                path=target.path, **kwargs,
            )  # fmt: skip
            async with aclosing(tokens):
                async for token in tokens:
                    yield Piece(token.text, token.id, token.logprob, token.top_logprobs)
            if usage is not None:
                usage.prompt_tokens = await self._prompt_tokens(target.model, request)
        elif p.logprobs:  # the app refuses this before calling; never compute without them
            raise ValueError(LOCAL_LOGPROBS)
        elif target.where == "sharded":
            info: dict[str, Any] = {}
            pairs = self._models.sharded_stream(target.model, info=info, **kwargs)
            async with aclosing(pairs):
                async for text, token_id in pairs:
                    yield Piece(text, token_id)
            if usage is not None:
                usage.prompt_tokens = int(info.get("prompt_tokens", 0))
        else:
            raise LocalProtocolError(f"{target.where} targets answer whole; use ask()")

    async def embed(self, target: Target, request: EmbeddingRequest) -> Embedded:
        if target.where != "local":
            raise NotAnEmbedder(
                f"{target.model} runs {target.where}; embeddings come from models this node holds"
            )
        spec = await trio.to_thread.run_sync(self._embedding, ModelId.parse(target.model))
        if spec is None:
            raise NotAnEmbedder(f"{target.model} is not an embedding model")
        if request.dimensions not in (None, spec.dimensions):
            raise bad(f"{target.model} makes {spec.dimensions}-dimensional vectors", "dimensions")
        made = await self._models.inference.embed(target.model, request.inputs)
        return Embedded(made.vectors, made.tokens)

    async def _prompt_tokens(self, model: str, request: GenerationRequest) -> int:
        """The prompt's length in tokens, by the loaded model's own tokenizer and template
        (the one the runtime used); 0 if the model was evicted meanwhile."""

        def count() -> int:
            path = self._models.resolve(ModelId.parse(model))
            lease = self._models.inference.cache.try_acquire(path)
            if lease is None:
                return 0
            try:
                encode = getattr(lease.model, "encode_prompt", None)
                if encode is None:
                    return 0
                return len(encode(prompt=request.prompt, messages=request.messages))
            finally:
                lease.release()

        return await trio.to_thread.run_sync(count)

    async def _on_peer(self, target: Target, request: GenerationRequest) -> Answer:
        """The whole request (every message, the sampling) on a peer holding the model
        whole, least loaded first; the next one (of ``PEER_TRIES``) when one is gone or full."""
        orchestrator = self._models.orchestrator
        if orchestrator is None:
            raise PeerUnavailable(f"no orchestrator to reach a peer with {target.model}")
        cards = sorted(
            (c for c in await self._cards() if c.has_model(target.model)), key=lambda c: c.load
        )
        p = request.params
        failed: P2PEdgeError = ModelNotCached(target.model)
        for card in cards[:PEER_TRIES]:
            try:
                answer: Answer = await orchestrator.chat_on_peer(
                    card.peer_id, target.model, messages=request.messages,
                    prompt=request.prompt, max_tokens=p.max_tokens, temperature=p.temperature,
                    top_p=p.top_p, top_k=p.top_k, seed=p.seed, stop=p.stop,
                )  # fmt: skip
                return answer
            except (PeerUnavailable, PeerTimeout, Busy) as exc:
                log.info("peer %s could not answer for %s: %s", card.peer_id, target.model, exc)
                failed = exc
        raise failed

    async def ask(self, target: Target, request: GenerationRequest) -> Routed:
        if target.where == "peer":
            answer = await self._on_peer(target, request)
        else:
            max_tokens = request.params.max_tokens
            answer = await self._orchestrator().ask(
                request.text, target.category, max_tokens=max_tokens
            )
        d = answer.decision
        return Routed(
            text=answer.text,
            where=d.where,
            peer_id=d.peer_id,
            specialist=d.specialist,
            model=d.model,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            finish_reason=answer.finish_reason,
        )

    # -- the swarm page ----------------------------------------------------------------

    async def swarm(self) -> dict[str, Any]:
        """This node, its peers' verified cards, model coverage, cache and pulls (bounded)."""
        card = self._announcer.card
        cards = await self._cards()
        now = time.time()
        return {
            "node": {**card_json(card, now), "local_only": self.local_only},
            "peers_total": len(cards),
            "peers": [card_json(c, now) for c in cards[:MAX_PEERS]],
            "models": [
                {"id": text(e.id), "where": e.where} for e in (await self.models())[:MAX_ITEMS]
            ],
            "coverage": coverage([card, *cards[:MAX_PEERS]]),
            "shard_sessions": self._shard_sessions(),
            "cache": {
                **self._models.inference.cache.stats(),
                "loaded": [
                    {
                        "name": text(m.name),
                        "kind": m.kind,
                        "provider": m.provider,
                        "size_bytes": m.size_bytes,
                        "uses": m.uses,
                        "in_use": m.in_use,
                    }
                    for m in self._models.inference.cache.loaded()[:MAX_ITEMS]
                ],
            },
            "pulls": await trio.to_thread.run_sync(_pulls, self._models.store.partial),
        }

    def stats(self) -> BackendStats:
        cache = self._models.inference.cache.stats()
        return BackendStats(
            cache_models=int(cache["models"]),
            cache_bytes=int(cache["used_bytes"]),
            cache_loads=int(cache["loads"]),
            cache_evictions=int(cache["evictions"]),
            load=self._models.inference.load(),
            peers=len(self._cached),  # verified cards at the last listing (<= cards_ttl_s old)
            shard_sessions=self._shard_sessions(),
            bytes_served=blobs.served_bytes if (blobs := self._models.blobs) else 0,
            bytes_pulled=self._models.distribution.pulled_bytes,
        )

    def _shard_sessions(self) -> int:
        pipeline = self._models.pipeline
        return pipeline.quotas.sessions.held() if pipeline is not None else 0


async def serve_node_api(
    node: NodeParts,
    listen: str,
    *,
    key_file: Path | None = None,
    cors_origins: Sequence[str] = (),
    limits: ApiLimits | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """The API of a running ``node`` on ``listen`` (``HOST:PORT``) until cancelled, for
    ``port = await node.nursery.start(serve_node_api, node, "127.0.0.1:8080")``."""
    host, port = parse_api_listen(listen)
    key = load_key(key_file) if key_file is not None else None
    app = ApiApp(api_for(node), key=key, cors_origins=cors_origins, limits=limits)
    await serve_api(app, host, port, task_status=task_status)
