"""Glue between a Node and the pipeline: serve shards, and open sharded sessions.

Server side (called by the Node at start-up, once per process)::

    server = await start_pipeline_server(node, [(model_name, model_dir, layers_or_None)],
                                         shards_root=data_dir / "shards")

Client side::

    async with await open_sharded_session(node, "smollm2-135m-instruct") as session:
        tokens = await session.generate(prompt_ids, 32)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import trio

from p2pedge.errors import MemoryBudgetError, ModelLoadError
from p2pedge.ids import LayerRange
from p2pedge.planning.budget import Budget, ModelBytes, check_fits, choose_budgeted_from_options
from p2pedge.planning.latency import StepTimes
from p2pedge.planning.placement import choose_blocks_from_options
from p2pedge.planning.routes import NoRoute, ServerOption, options_from_cards
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.pipeline.client import ClientConfig, ShardedSession
from p2pedge.protocols.pipeline.codec import PROTOCOL_ID
from p2pedge.protocols.pipeline.handler import (
    DEFAULT_BUDGET_BYTES,
    PipelineServer,
    StreamHandler,
)
from p2pedge.protocols.pipeline.limits import PipelineLimits, kv_budget_bytes
from p2pedge.protocols.pipeline.push import Pusher
from p2pedge.records.facts import FACTS_FILE, read_facts
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.inline import DEFAULT_INLINE_STEP_S
from p2pedge.runtime.shard_session import ShardModel

log = logging.getLogger(__name__)

# Rough cost of one block for one token (2 x parameters); SmolLM2-135M has ~3.5 M per block.
DEFAULT_GFLOP_PER_BLOCK_TOKEN = 0.007
LANE_OPEN_TIMEOUT = 10.0
KV_RESERVE_MAX_LENGTH = 4096  # PipelineServer's default session length


class Lanes(Protocol):
    """The node's direct lanes (see ``p2pedge.node.lanes``): lean TCP with libp2p fallback."""

    async def serve(self, protocol_id: str, handler: StreamHandler) -> None: ...

    async def open(self, peer_id: str, protocol_id: str, *, timeout: float) -> FramedStream: ...


class Latency(Protocol):
    """Measured round trips to peers (see ``p2pedge.node.latency``)."""

    async def rtts(self, peers: Iterable[str]) -> dict[str, float]: ...


class PipelineNode(Protocol):
    """The Node methods the pipeline uses."""

    @property
    def lanes(self) -> Lanes: ...

    @property
    def step_times(self) -> StepTimes: ...

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None: ...

    async def open_stream(
        self, peer_id: str, protocol_id: str, *, timeout: float = 10.0
    ) -> FramedStream: ...

    async def find_peers(self, model: str | None = None, *, limit: int = 64) -> list[Any]: ...

    async def card_of(self, peer_id: str, *, refresh: bool = False) -> Any: ...

    def set_layers_served(self, layers: Sequence[Any]) -> None: ...

    @property
    def card(self) -> Any: ...

    @property
    def latency(self) -> Latency: ...

    @property
    def nursery(self) -> trio.Nursery: ...


def model_layers(model_dir: Path) -> int:
    """Blocks of the model in ``model_dir``; its facts file is checked whole (FactsError)."""
    return read_facts(model_dir / FACTS_FILE).n_layers


async def swarm_options(node: PipelineNode, model: str) -> list[ServerOption]:
    """What every known card (our own included) offers for ``model``, with the measured
    round trip to each offering peer (pinged when not measured in the last minute) and
    the decode-step time our earlier sessions saw there, if fresh."""
    options = options_from_cards(await node.find_peers(None), model)
    rtts = await node.latency.rtts(sorted({o.peer_id for o in options}))
    now = trio.current_time()
    return [
        dataclasses.replace(
            o,
            rtt_s=rtts.get(o.peer_id),
            step_s=node.step_times.fresh(o.peer_id, model, o.layers.start, o.layers.end, now),
        )
        for o in options
    ]


def model_bytes(model_dir: Path) -> ModelBytes:
    """A model's weight bytes per block and per end, from its graph's initializers (the
    external data files need not be here: their lengths are in the graph)."""
    import onnx
    from onnx import numpy_helper

    from p2pedge.models.convert.layout import MODEL_FILE, weight_part

    n_layers = model_layers(model_dir)
    try:
        graph = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{model_dir}: cannot read {MODEL_FILE}: {exc}") from exc
    parts: dict[str, int] = {}
    for t in graph.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            size = int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            size = len(t.raw_data) or numpy_helper.to_array(t).nbytes
        parts[weight_part(t.name)] = parts.get(weight_part(t.name), 0) + size
    blocks = tuple(parts.get(f"block-{i:03d}", 0) for i in range(n_layers))
    last = sum(parts.get(p, 0) for p in ("final", "lm_head", "head"))
    # a shard's graph is a part of the model's: the whole graph's size bounds it
    common = parts.get("common", 0) + (model_dir / MODEL_FILE).stat().st_size
    return ModelBytes(blocks, parts.get("embed", 0), last, "lm_head" not in parts, common)


def kv_reservation(model_dir: Path, max_length: int = KV_RESERVE_MAX_LENGTH) -> int:
    """KV bytes one session of the model's full context (at most ``max_length``) needs
    per block: the least a budgeted server reserves for every block it serves."""
    facts = read_facts(model_dir / FACTS_FILE)  # a FactsError (ModelLoadError) if bad
    per_token = facts.n_kv_heads * facts.head_dim * 2 * 4  # K and V, fp32
    return per_token * min(facts.context_length, max_length)


async def fresh_cards(node: PipelineNode) -> list[Any]:
    """Every known peer's card fetched anew (a cached card predates the ranges its peer
    placed since, and placing against it would duplicate them)."""
    cards = await node.find_peers(None)
    fresh: dict[str, Any] = {}

    async def refetch(card: Any) -> None:
        fresh[card.peer_id] = await node.card_of(card.peer_id, refresh=True) or card

    async with trio.open_nursery() as nursery:
        for card in cards:
            nursery.start_soon(refetch, card)
    return [fresh[c.peer_id] for c in cards]


async def place(
    node: PipelineNode,
    model: str,
    n_layers: int,
    n_blocks: int,
    *,
    model_dir: Path | None = None,
    memory_budget: int | None = None,
) -> LayerRange:
    """Blocks for this node: ``n_blocks`` of them, or with ``memory_budget`` (and the
    model's ``model_dir``, whose graph and facts suffice) as many as the budget holds."""
    # placement weighs compute only: no pings at start-up
    cards = await fresh_cards(node)
    options = [o for o in options_from_cards(cards, model) if o.peer_id != node.card.peer_id]
    gflops = float(node.card.compute_gflops)
    if memory_budget is not None:
        if model_dir is None:
            raise ValueError("budgeted placement needs the model's directory")
        sizes = await trio.to_thread.run_sync(model_bytes, model_dir)
        kv = await trio.to_thread.run_sync(kv_reservation, model_dir)
        placement = choose_budgeted_from_options(
            sizes, Budget(memory_budget, kv), options, gflops, DEFAULT_GFLOP_PER_BLOCK_TOKEN, model
        )
    else:
        placement = choose_blocks_from_options(
            n_layers, n_blocks, options, gflops, DEFAULT_GFLOP_PER_BLOCK_TOKEN
        )
    log.info("placement for %s: %s", model, placement.reason)
    return placement.layers


def dir_bytes(path: Path) -> int:
    """Bytes of a shard directory's graph and weight files (what a session loads)."""
    return sum(f.stat().st_size for f in path.glob("model.onnx*") if f.is_file())


def check_built(built: int, n_blocks: int, budget: Budget, what: str) -> None:
    need = built + budget.kv_bytes_per_block * n_blocks
    if need > budget.budget:
        raise MemoryBudgetError(
            f"memory budget {budget.budget / 1e6:.1f} MB cannot hold {what}: its files are "
            f"{built / 1e6:.1f} MB + {need / 1e6 - built / 1e6:.1f} MB KV reservation"
        )


def ensure_shard_dir(model_dir: Path, layers: LayerRange, shards_root: Path) -> Path:
    """The shard directory for ``layers``, written from the imported model if missing.

    Keyed by the model's facts file too, so a re-imported model (new graph format or
    variant) gets fresh shards instead of stale ones.
    """
    import hashlib

    from p2pedge.models.convert.shards import SHARD_FILE, write_shard_dir

    try:
        facts = (model_dir / FACTS_FILE).read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{model_dir}: cannot read {FACTS_FILE}: {exc}") from exc
    stamp = hashlib.sha256(facts).hexdigest()[:12]
    out = shards_root / f"{model_dir.name}-{stamp}" / str(layers)
    if not (out / SHARD_FILE).is_file():
        write_shard_dir(model_dir, layers, out)
    return out


async def start_pipeline_server(
    node: PipelineNode,
    serve: Sequence[tuple[str, Path, LayerRange | None]],
    *,
    shards_root: Path,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    runtime: RuntimeConfig | None = None,
    n_blocks: int | None = None,
    served_layers_factory: Callable[[str, int, int], Any] | None = None,
    inline_step_s: float = DEFAULT_INLINE_STEP_S,
    limits: PipelineLimits | None = None,
    memory_budget: int | None = None,
) -> PipelineServer:
    """Load (building if needed) each shard, register the protocol, update the card.

    ``serve`` holds ``(model name, imported model dir, block range or None)``; None lets
    placement pick ``n_blocks`` blocks (default: half the model) from the swarm's cards.
    ``limits`` caps what each peer and source address may hold (safe defaults).

    ``memory_budget`` (bytes) bounds weights and KV together: placement picks as many
    blocks as it holds beside a KV reservation, no shard whose files exceed what is left
    is loaded (:class:`~p2pedge.errors.MemoryBudgetError`), and what the weights leave is
    the KV budget (replacing ``budget_bytes``).
    """
    if served_layers_factory is None:
        from p2pedge.records.card import ServedLayers

        served_layers_factory = ServedLayers
    shards: dict[tuple[str, LayerRange], ShardModel] = {}
    left = memory_budget
    for model, model_dir, layers in serve:
        n_layers = model_layers(model_dir)
        if layers is None:
            layers = await place(
                node,
                model,
                n_layers,
                n_blocks or max(n_layers // 2, 1),
                model_dir=model_dir,
                memory_budget=left,
            )
        if left is not None:
            budget = Budget(left, await trio.to_thread.run_sync(kv_reservation, model_dir))
            check_fits(await trio.to_thread.run_sync(model_bytes, model_dir), layers, budget, model)
        shard_dir = await trio.to_thread.run_sync(ensure_shard_dir, model_dir, layers, shards_root)
        if left is not None:
            # the built files, not the estimate, are what the budget must hold
            built = await trio.to_thread.run_sync(dir_bytes, shard_dir)
            check_built(built, len(layers), budget, f"{model} blocks {layers}")
            left -= built
        shards[(model, layers)] = await trio.to_thread.run_sync(
            ShardModel.from_dir, shard_dir, runtime
        )
    if left is not None:
        budget_bytes = kv_budget_bytes(left)
    identity = getattr(node, "identity", None)  # a Node signs its outputs (attest.py)
    server = PipelineServer(
        shards,
        budget_bytes=budget_bytes,
        inline_step_s=inline_step_s,
        limits=limits,
        signer=identity.private_key.sign if identity is not None else None,
    )

    def push_opener(peer: str, protocol: str) -> Awaitable[FramedStream]:
        return node.lanes.open(peer, protocol, timeout=LANE_OPEN_TIMEOUT)

    server.pusher = Pusher(
        push_opener,
        node.nursery,
        max_streams=server.limits.max_push_streams,
        max_warming=server.limits.max_warming,
    )
    server.register(node)
    await node.lanes.serve(PROTOCOL_ID, server.handle)
    node.set_layers_served([served_layers_factory(m, r.start, r.end) for m, r in sorted(shards)])
    return server


async def open_sharded_session(
    node: PipelineNode,
    model: str,
    *,
    n_layers: int | None = None,
    config: ClientConfig | None = None,
    bans: dict[str, tuple[float, int]] | None = None,
) -> ShardedSession:
    """A started :class:`ShardedSession` over the best chain the swarm's cards offer."""

    async def find() -> list[ServerOption]:
        return await swarm_options(node, model)

    if n_layers is None:
        offered = await find()
        if not offered:
            raise NoRoute(f"no peer serves blocks of {model}")
        n_layers = max(o.layers.end for o in offered)

    def opener(peer: str, protocol: str) -> Awaitable[FramedStream]:
        return node.lanes.open(peer, protocol, timeout=LANE_OPEN_TIMEOUT)

    def observe(peer: str, layers: LayerRange, seconds: float) -> None:
        now = trio.current_time()
        node.step_times.record(peer, model, layers.start, layers.end, seconds, now)

    session = ShardedSession(opener, find, model, n_layers, config, bans=bans, observe=observe)
    await session.start()
    return session
