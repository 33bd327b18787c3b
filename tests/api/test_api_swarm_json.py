"""What the swarm page's JSON takes from cards: bounded, and the coverage with its gaps."""

from __future__ import annotations

from p2pedge.api.swarm import MAX_ITEMS, MAX_TEXT, card_json, coverage
from p2pedge.records.card import CachedModel, CapabilityCard, ServedLayers


def card(peer: str, *layers: tuple[int, int], os: str = "linux", n: int = 1) -> CapabilityCard:
    return CapabilityCard(
        peer_id=peer, public_key=b"k" * 32, addrs=tuple(f"/ip4/10.0.0.{i}" for i in range(n)),
        software_version="0.1.0", os=os, arch="x86_64", cpu_cores=2, ram_total=1, ram_available=1,
        accelerators=(), execution_providers=(), compute_gflops=1.0,
        models=tuple(CachedModel(f"m{i}@1", "0" * 64) for i in range(n)),
        layers_served=tuple(ServedLayers("m", a, b) for a, b in layers), load=0.0,
        issued_at=100.0, expires_at=200.0,
    )  # fmt: skip


def test_a_card_is_cut_to_the_bounds() -> None:
    shown = card_json(card("p", os="x" * 100_000, n=10_000), now=150.0)
    assert len(shown["os"]) == MAX_TEXT
    assert len(shown["addrs"]) == MAX_ITEMS and len(shown["models"]) == MAX_ITEMS
    assert shown["age_s"] == 50.0


def test_coverage_names_each_peers_blocks_and_the_gaps() -> None:
    whole = coverage([card("a", (0, 2)), card("b", (2, 4))])
    assert whole == [
        {
            "model": "m", "blocks": 4, "covered": True, "gaps": [],
            "spans": [
                {"peer_id": "a", "start": 0, "end": 2}, {"peer_id": "b", "start": 2, "end": 4},
            ],
        }
    ]  # fmt: skip
    holed = coverage([card("a", (0, 1)), card("b", (2, 4)), card("c", (3, 4))])[0]
    assert not holed["covered"] and holed["gaps"] == [{"start": 1, "end": 2}]
