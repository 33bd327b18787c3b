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
    """What the DHT holds for others and how fast a peer may add to it or ask it.

    A source address gets ``source_share`` peers' worth of each rate, so that minting
    peer ids does not multiply what one machine may store or ask.

    Reads (FIND_NODE, GET_VALUE, GET_PROVIDERS) share one budget of cost units per peer,
    per source and in total: each answer is a routing-table lookup and a serialised list
    of 20 peers, and GET_VALUE and GET_PROVIDERS add a record or a provider list on top.
    One lookup of ours asks each peer once or twice, and a node fetching every card of a
    50-node swarm asks one peer about 50 times; the burst covers both many times over.

    Inbound Kademlia streams are capped while open (``max_streams`` in all,
    ``max_streams_per_peer`` each, ``source_share`` times that per address) and each waits
    at most ``stream_idle_s`` for its peer's next bytes: a stream that says nothing holds
    its slot that long, never for good. py-libp2p's own cap (12 streams, anyone's) is
    replaced: a handful of silent streams would stall every lookup others make of us, and
    a busy honest swarm of 50 already opens more than 12 at a time.
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
    read_rate: float = 50.0  # cost units per second, per peer
    read_burst: float = 500.0
    read_total_rate: float = 1000.0  # for everyone together
    read_total_burst: float = 5000.0
    find_node_cost: float = 1.0
    get_value_cost: float = 2.0
    get_providers_cost: float = 2.0
    max_streams: int = 512
    max_streams_per_peer: int = 32
    stream_idle_s: float = 10.0

    def __post_init__(self) -> None:
        numbers = (
            self.put_rate,
            self.put_burst,
            self.provider_rate,
            self.provider_burst,
            self.read_rate,
            self.read_burst,
            self.read_total_rate,
            self.read_total_burst,
        )
        costs = (self.find_node_cost, self.get_value_cost, self.get_providers_cost)
        if min(costs) < 0 or max(costs) > min(self.read_burst, self.read_total_burst):
            raise LocalProtocolError(f"DHT read costs must fit the bursts: {self}")
        if min(numbers) <= 0 or self.source_share < 1 or self.max_card_lifetime_s <= 0:
            raise LocalProtocolError(f"DHT limits must be positive: {self}")
        if self.stream_idle_s <= 0 or min(self.max_streams, self.max_streams_per_peer) < 1:
            raise LocalProtocolError(f"DHT stream limits must be positive: {self}")
        if min(self.max_values, self.max_provider_records, self.max_provider_records_per_peer) < 1:
            raise LocalProtocolError(f"DHT capacities must be at least 1: {self}")
