"""The swarm directory: a facade over py-libp2p's KadDHT for cards and providers.

It owns three things py-libp2p leaves to us: a validator that only admits verified
cards (and picks the newest), short hashed keys (lookups break past ~50 bytes), and our
own timeouts (a frozen peer is never detected by the library).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from p2pedge.errors import InvalidRecord
from p2pedge.records.card import CARD_NAMESPACE, CapabilityCard, card_key, verify_card

log = logging.getLogger("p2pedge.dht")


def provider_key(key: str) -> str:
    """32 hex chars: py-libp2p decodes hex keys to 16 raw bytes, short and uniform."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _make_card_validator(clock: Callable[[], float]) -> Any:
    from libp2p.records.validator import Validator

    class CardValidator(Validator):  # type: ignore[misc]
        """Admits only cards signed by the peer they name, current and small."""

        def validate(self, key: str, value: bytes) -> None:
            verify_card(value, clock(), key)

        def select(self, key: str, values: list[bytes]) -> int:
            best, best_issued = 0, float("-inf")
            for index, value in enumerate(values):
                try:
                    issued = verify_card(value, clock(), key).issued_at
                except InvalidRecord:
                    continue
                if issued > best_issued:
                    best, best_issued = index, issued
            return best

    return CardValidator()


class Directory:
    """Cards and provider records on the DHT, with a local cache of verified cards."""

    def __init__(self, dht: Any, *, clock: Callable[[], float] = time.time, timeout: float = 10.0) -> None:
        self.dht = dht
        self.clock = clock
        self.timeout = timeout
        self._cards: dict[str, CapabilityCard] = {}
        dht.register_validator(CARD_NAMESPACE, _make_card_validator(clock))

    async def put_card(self, record: bytes, peer_id: str) -> None:
        with trio.move_on_after(self.timeout):
            await self.dht.put_value(card_key(peer_id), record)
        self.remember(verify_card(record, self.clock()))

    def remember(self, card: CapabilityCard) -> None:
        cached = self._cards.get(card.peer_id)
        if cached is None or cached.issued_at <= card.issued_at:
            self._cards[card.peer_id] = card

    def cached_card(self, peer_id: str) -> CapabilityCard | None:
        card = self._cards.get(peer_id)
        if card is not None and card.expires_at <= self.clock():
            del self._cards[peer_id]
            return None
        return card

    def forget(self, peer_id: str) -> None:
        self._cards.pop(peer_id, None)

    async def get_card(self, peer_id: str, *, refresh: bool = False) -> CapabilityCard | None:
        """A verified, current card, or None; invalid records from peers are logged."""
        if not refresh and (cached := self.cached_card(peer_id)) is not None:
            return cached
        value: bytes | None = None
        with trio.move_on_after(self.timeout):
            value = await self.dht.get_value(card_key(peer_id))
        if value is None:
            return self.cached_card(peer_id)
        try:
            card = verify_card(value, self.clock(), card_key(peer_id))
        except InvalidRecord as exc:
            log.warning("rejected card for %s: %s", peer_id, exc)
            return self.cached_card(peer_id)
        self.remember(card)
        return self.cached_card(peer_id)

    async def provide(self, key: str) -> bool:
        result = False
        with trio.move_on_after(self.timeout):
            result = bool(await self.dht.provide(provider_key(key)))
        return result

    async def find_providers(self, key: str, limit: int = 20) -> list[str]:
        infos: list[Any] = []
        with trio.move_on_after(self.timeout):
            infos = await self.dht.find_providers(provider_key(key), limit)
        seen: dict[str, None] = {}
        for info in infos:
            seen.setdefault(info.peer_id.to_base58(), None)
        return list(seen)[:limit]
