"""ask / ask_many / map with real tiny models, peers reached over the real infer protocol
through in-process stream pairs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio

from p2pedge.node.inference import LocalInference
from p2pedge.orchestrator.catalog import Catalog, UnknownCategory
from p2pedge.orchestrator.federated import MapStats
from p2pedge.orchestrator.orchestrator import Orchestrator, join_merge
from p2pedge.orchestrator.remote import LocalBackend
from p2pedge.protocols._stream import FramedStream, memory_stream_pair
from p2pedge.protocols.infer.codec import InferRequest, InferResult
from p2pedge.protocols.infer.handler import InferServer, request_completion
from p2pedge.records.card import CachedModel

MakeLocal = Callable[..., LocalInference]


@dataclass
class Card:
    peer_id: str
    models: tuple[CachedModel, ...]
    compute_gflops: float = 10.0
    load: float = 0.0


@dataclass
class InProcessPeers:
    """Peers that are real LocalInference instances behind real InferServers."""

    servers: dict[str, InferServer] = field(default_factory=dict)
    cards: dict[str, Card] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)

    def add(self, peer_id: str, local: LocalInference, models: list[str]) -> None:
        self.servers[peer_id] = InferServer(LocalBackend(local, peer_id))
        self.cards[peer_id] = Card(
            peer_id, tuple(CachedModel(f"{m}@latest", "0" * 64) for m in models)
        )

    async def find_peers(self, model: str | None = None) -> list[Card]:
        return [c for c in self.cards.values() if model is None or (c.models and any(
            m.id.split("@")[0] == model for m in c.models))]  # fmt: skip

    async def run_remote(
        self, peer_id: str, request: InferRequest, *, timeout_s: float
    ) -> InferResult:
        a, b = memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.servers[peer_id].handle, FramedStream(b), "caller")
            result = await request_completion(FramedStream(a), request, timeout_s=timeout_s)
        self.served[peer_id] = self.served.get(peer_id, 0) + 1
        return result


async def test_ask_classifies_routes_and_explains(local: LocalInference, catalog: Catalog) -> None:
    orch = Orchestrator(local, None, catalog=catalog, preload=False)
    answer = await orch.ask("Translate 'good morning' into French.")
    d = answer.decision
    assert (d.category, d.specialist, d.model, d.where) == (
        "translate",
        "translate",
        "tiny-b",
        "local",
    )
    assert d.classification is not None and d.classification.top_features
    assert "stored here" in d.reason and "translate" in d.explain()
    assert answer.completion_tokens >= 1 and answer.finish_reason in ("stop", "length")
    again = await orch.ask("Translate 'thank you' into German.")
    assert again.was_warm and "warm" in again.decision.reason


async def test_explicit_category_and_unknown_category(
    local: LocalInference, catalog: Catalog
) -> None:
    orch = Orchestrator(local, None, catalog=catalog, preload=False)
    answer = await orch.ask("anything", category="math")
    assert answer.decision.model == "tiny-c" and answer.decision.classification is None
    with pytest.raises(UnknownCategory, match=r"chat.*explain-code.*math"):
        await orch.ask("anything", category="poetry")


async def test_fan_out_three_specialists(local: LocalInference, catalog: Catalog) -> None:
    orch = Orchestrator(local, None, catalog=catalog, preload=False)
    fan = await orch.ask_many(
        "Some text about trains.", ["summarize", "translate", "chat"], merge=join_merge
    )
    assert [a.decision.specialist for a in fan.answers] == ["summarize", "translate", "chat"]
    assert not fan.failures and all(a.elapsed_s > 0 for a in fan.answers)
    assert fan.merged is not None and "[translate]" in fan.merged
    assert fan.elapsed_s >= max(a.elapsed_s for a in fan.answers)


async def test_fan_out_spreads_to_peers_and_routes_missing_models_there(
    make_local: MakeLocal, catalog: Catalog
) -> None:
    here, there = make_local(("tiny-a",)), make_local(max_models=3)
    peers = InProcessPeers()
    peers.add("peer-1", there, ["tiny-a", "tiny-b", "tiny-c"])
    orch = Orchestrator(here, peers, catalog=catalog, preload=False)
    answer = await orch.ask("x", category="math")
    assert answer.decision.where == "peer" and answer.decision.peer_id == "peer-1"
    assert "not stored here" in answer.decision.reason
    fan = await orch.ask_many("text", ["chat", "summarize"])
    assert {a.decision.where for a in fan.answers} == {"local", "peer"}
    assert peers.served["peer-1"] == 2


async def test_map_over_local_and_peer_keeps_order(make_local: MakeLocal, catalog: Catalog) -> None:
    here, there = make_local(), make_local()
    peers = InProcessPeers()
    peers.add("peer-1", there, ["tiny-a"])
    orch = Orchestrator(here, peers, catalog=catalog, preload=False)
    stats = MapStats()
    prompts = [f"prompt number {i}" for i in range(8)]
    out = await orch.map("tiny-a", prompts, max_tokens=3, stats=stats)
    assert len(out) == 8 and sum(stats.per_peer.values()) == 8
    assert set(stats.per_peer) <= {"local", "peer-1"}
    assert all(a.decision.model == "tiny-a" for a in out)
    assert await orch.map("chat", []) == []
    with pytest.raises(UnknownCategory):
        await orch.map("no-such-specialist", ["x"])
