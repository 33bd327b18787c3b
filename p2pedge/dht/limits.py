"""The strict DHT's limits, apart from the DHT itself so configuration can name them
without importing libp2p."""

from __future__ import annotations

from dataclasses import dataclass

from p2pedge.errors import LocalProtocolError
from p2pedge.records.card import MAX_CARD_LIFETIME_S

# Provider keys are sha2-256 multihashes (records.keys.provider_record_key): 34 bytes
PROVIDER_KEY_PREFIX = b"\x12\x20"
PROVIDER_KEY_BYTES = 34


@dataclass(frozen=True)
class DhtLimits:
    """What the DHT holds for others and how fast a peer may add to it.

    A source address gets ``source_share`` peers' worth of each rate, so that minting
    peer ids does not multiply what one machine may store.
    """

    max_values: int = 4096  # records held for others (each at most MAX_CARD_BYTES)
    put_rate: float = 1.0  # PUT_VALUE per second, per peer
    put_burst: float = 20.0
    provider_rate: float = 10.0  # ADD_PROVIDER per second, per peer
    provider_burst: float = 400.0  # a node announcing every blob of a model at once
    source_share: float = 8.0
    max_provider_records: int = 16384
    max_provider_records_per_peer: int = 2048
    max_card_lifetime_s: float = MAX_CARD_LIFETIME_S

    def __post_init__(self) -> None:
        numbers = (self.put_rate, self.put_burst, self.provider_rate, self.provider_burst)
        if min(numbers) <= 0 or self.source_share < 1 or self.max_card_lifetime_s <= 0:
            raise LocalProtocolError(f"DHT limits must be positive: {self}")
        if min(self.max_values, self.max_provider_records, self.max_provider_records_per_peer) < 1:
            raise LocalProtocolError(f"DHT capacities must be at least 1: {self}")
