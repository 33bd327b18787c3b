"""Where to run a specialist: a pure decision with a human-readable reason.

Order of preference: the model is warm here (no load, no network); it is stored here
and cheap to load; a peer lists it in its card (the best capacity after load wins); it
is stored here even if slow to load; the sharded path; otherwise nobody can run it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from p2pedge.errors import P2PEdgeError
from p2pedge.orchestrator.catalog import Specialist, model_matches, offered_models
from p2pedge.orchestrator.classifier import Classification
from p2pedge.orchestrator.federated import capacity
from p2pedge.orchestrator.interfaces import CardLike

Where = Literal["local", "peer", "sharded"]
LOCAL = "local"


class NoPlacement(P2PEdgeError, LookupError):
    """Nobody, here or among known peers, can run the specialist's model."""


@dataclass(frozen=True)
class Decision:
    """What was chosen and why; returned with every answer."""

    category: str
    specialist: str
    model: str
    where: Where
    peer_id: str | None
    reason: str
    classification: Classification | None = None

    def explain(self) -> str:
        head = f"category {self.category}"
        if self.classification is not None:
            head += f" [{self.classification.explain()}]"
        target = self.peer_id if self.where == "peer" else self.where
        return f"{head}; specialist {self.specialist} ({self.model}) on {target}: {self.reason}"


@dataclass(frozen=True)
class LocalView:
    """What this node knows about the model locally."""

    warm: bool
    stored: bool
    load_s: float | None = None


@dataclass(frozen=True)
class Placement:
    where: Where
    peer_id: str | None
    reason: str


@dataclass
class RoutingPolicy:
    """Thresholds; ``max_local_load_s`` is what we accept to load instead of going remote."""

    max_local_load_s: float = 2.0
    assume_load_s: float = 1.0
    busy_penalty: Mapping[str, int] = field(default_factory=dict)


def peers_with(spec: Specialist, cards: Sequence[CardLike]) -> list[CardLike]:
    return [c for c in cards if any(model_matches(spec.model, m) for m in offered_models(c))]


def rank_peers(
    spec: Specialist, cards: Sequence[CardLike], assigned: Mapping[str, int]
) -> list[CardLike]:
    """Peers offering the model, fewest already-assigned requests first, then most capacity."""
    return sorted(
        peers_with(spec, cards), key=lambda c: (assigned.get(c.peer_id, 0), -capacity(c), c.peer_id)
    )


def place(
    spec: Specialist,
    local: LocalView,
    cards: Sequence[CardLike],
    *,
    policy: RoutingPolicy | None = None,
    sharded: bool = False,
    assigned: Mapping[str, int] | None = None,
) -> Placement:
    """Choose where ``spec`` runs. ``assigned`` counts requests already sent per place
    (``"local"`` or a peer id) in the same fan-out, to spread concurrent work."""
    policy = policy or RoutingPolicy()
    assigned = assigned or {}
    ranked = rank_peers(spec, cards, assigned)
    local_busy = assigned.get(LOCAL, 0)
    best = ranked[0] if ranked else None
    if best is not None and local_busy > assigned.get(best.peer_id, 0):
        return Placement(
            "peer",
            best.peer_id,
            f"local already runs {local_busy} request(s) of this fan-out; "
            f"peer has {spec.model} (capacity {capacity(best):.1f})",
        )
    if local.warm:
        return Placement("local", None, f"{spec.model} is warm in the local cache")
    load_s = local.load_s if local.load_s is not None else policy.assume_load_s
    if local.stored and (best is None or load_s <= policy.max_local_load_s):
        return Placement("local", None, f"{spec.model} is stored here; load ≈ {load_s:.2f} s")
    if best is not None:
        why = "not stored here" if not local.stored else f"local load ≈ {load_s:.2f} s is slow"
        return Placement(
            "peer",
            best.peer_id,
            f"{why}; peer offers {spec.model} "
            f"(capacity {capacity(best):.1f}, load {best.load:.0%})",
        )
    if sharded:
        return Placement("sharded", None, f"no single node offers {spec.model}; run it sharded")
    raise NoPlacement(f"no node offers {spec.model} and no sharded path is available")
