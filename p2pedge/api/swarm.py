"""The live swarm page at ``/`` and the JSON it reads, ``GET /v1/swarm``.

The page is one static HTML file with a little plain JavaScript (no CDN, works offline)
that fetches ``/v1/swarm`` every few seconds and builds the DOM with ``textContent`` only:
whatever a peer put in its card is shown as text and can never become markup or script.
The JSON is bounded too (:data:`MAX_PEERS`, :data:`MAX_ITEMS`, :data:`MAX_TEXT`), since a
peer's card is hostile input and the page polls it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from p2pedge.records.card import CapabilityCard, ServedLayers

MAX_PEERS = 64  # peers listed; the JSON says how many there were in all
MAX_ITEMS = 32  # models, spans, addresses, sessions... of any one list
MAX_TEXT = 160  # characters of any string taken from a card
REFRESH_S = 3


# path -> (file next to this module, content type)
STATIC = {
    "/": ("swarm.html", "text/html; charset=utf-8"),
    "/swarm.js": ("swarm.js", "text/javascript; charset=utf-8"),
}
# the page runs only its own script file (no inline script, so markup that slipped in
# could not run either) and talks only to this server
PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; "
    "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


def asset(path: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one of the page's :data:`STATIC` files."""
    name, kind = STATIC[path]
    data = resources.files(__package__).joinpath(name).read_bytes()
    return data, {"content-type": kind, **PAGE_HEADERS}


def text(value: object) -> str:
    """A card's string, cut to :data:`MAX_TEXT` characters."""
    s = str(value)
    return s if len(s) <= MAX_TEXT else s[: MAX_TEXT - 1] + "…"


def texts(values: Iterable[object]) -> list[str]:
    return [text(v) for _, v in zip(range(MAX_ITEMS), values, strict=False)]


@dataclass
class Live:
    """One generation streaming through the API now."""

    model: str
    where: str
    started: float = field(default_factory=time.perf_counter)
    first: float | None = None
    tokens: int = 0

    def token(self) -> None:
        self.tokens += 1
        if self.first is None:
            self.first = time.perf_counter()


class LiveStreams:
    """The API's generations in flight, for the page's sessions table."""

    def __init__(self) -> None:
        self._rows: dict[int, Live] = {}

    def open(self, model: str, where: str) -> Live:
        live = Live(text(model), where)
        self._rows[id(live)] = live
        return live

    def close(self, live: Live) -> None:
        self._rows.pop(id(live), None)

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self) -> list[dict[str, Any]]:
        now = time.perf_counter()
        out = []
        for live in list(self._rows.values())[:MAX_ITEMS]:
            decoding = now - live.first if live.first is not None else 0.0
            rate = (live.tokens - 1) / decoding if decoding > 0 and live.tokens > 1 else 0.0
            out.append(
                {
                    "model": live.model,
                    "where": live.where,
                    "tokens": live.tokens,
                    "tok_per_s": round(rate, 1),
                    "age_s": round(now - live.started, 1),
                }
            )
        return out


def card_json(card: CapabilityCard, now: float) -> dict[str, Any]:
    """What the page shows of a card (bounded); ``age_s`` since the peer signed it."""
    return {
        "peer_id": text(card.peer_id),
        "addrs": texts(card.addrs),
        "software_version": text(card.software_version),
        "os": text(card.os),
        "arch": text(card.arch),
        "cpu_cores": int(card.cpu_cores),
        "ram_total": int(card.ram_total),
        "ram_available": int(card.ram_available),
        "accelerators": texts(card.accelerators),
        "execution_providers": texts(card.execution_providers),
        "compute_gflops": round(float(card.compute_gflops), 1),
        "load": round(float(card.load), 2),
        "models": texts(m.id for m in card.models),
        "layers": [_span(s) for s in card.layers_served[:MAX_ITEMS]],
        "age_s": round(max(0.0, now - card.issued_at), 1),
    }


def _span(s: ServedLayers) -> dict[str, Any]:
    return {"model": text(s.model), "start": int(s.start), "end": int(s.end)}


def coverage(cards: Sequence[CapabilityCard]) -> list[dict[str, Any]]:
    """Per sharded model: which peers serve which blocks, and the blocks nobody serves.

    A model's size in blocks is the largest end any card names (cards do not say more)."""
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for card in cards:
        for s in card.layers_served:
            spans.setdefault(s.model, []).append((s.start, s.end, card.peer_id))
    out = []
    for model in sorted(spans)[:MAX_ITEMS]:
        served = sorted(spans[model])
        blocks = max(end for _, end, _ in served)
        gaps, covered = [], 0
        for start, end, _ in served:
            if start > covered:
                gaps.append({"start": covered, "end": start})
            covered = max(covered, end)
        out.append(
            {
                "model": text(model),
                "blocks": blocks,
                "covered": not gaps,
                "gaps": gaps[:MAX_ITEMS],
                "spans": [
                    {"peer_id": text(p), "start": a, "end": b} for a, b, p in served[:MAX_ITEMS]
                ],
            }
        )
    return out
