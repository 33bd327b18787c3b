"""Looking peers up: verified cards from the DHT, and provider records."""

from __future__ import annotations

from collections.abc import Callable

import trio

from p2pedge.node.network import Network
from p2pedge.records.card import CapabilityCard
from p2pedge.records.keys import model_key


class Peers:
    """Queries over the network's DHT; ``own_card`` answers for this node itself."""

    def __init__(self, network: Network, own_card: Callable[[], CapabilityCard]) -> None:
        self.network = network
        self.own_card = own_card

    async def card_of(self, peer_id: str, *, refresh: bool = False) -> CapabilityCard | None:
        if peer_id == self.network.peer_id:
            return self.own_card()
        return await self.network.require_directory().get_card(peer_id, refresh=refresh)

    async def find_peers(
        self, model: str | None = None, *, limit: int = 64
    ) -> list[CapabilityCard]:
        """Verified cards of peers (with ``model`` cached, when given), self included."""
        directory = self.network.require_directory()
        if model is None:
            candidates = self.network.known_peers()
        else:
            candidates = await directory.find_providers(model_key(model), limit)
        cards: dict[str, CapabilityCard] = {}

        async def fetch(peer_id: str) -> None:
            card = await self.card_of(peer_id)
            if card is not None and (model is None or card.has_model(model)):
                cards[peer_id] = card

        async with trio.open_nursery() as nursery:
            for peer_id in candidates[:limit]:
                nursery.start_soon(fetch, peer_id)
        own = self.own_card()
        if model is None or own.has_model(model):
            cards[own.peer_id] = own
        return sorted(cards.values(), key=lambda c: c.peer_id)

    async def provide(self, key: str) -> bool:
        """Announce ``key`` as a provider record; True when a peer took a replica."""
        return await self.network.require_directory().provide(key) > 0

    async def find_providers(self, key: str, *, limit: int = 20) -> list[str]:
        return await self.network.require_directory().find_providers(key, limit)
