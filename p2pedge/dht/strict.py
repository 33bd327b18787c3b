"""A strict Kademlia: only p2pedge's own records, bounded stores, PUTs and reads
rate-limited.

py-libp2p's ``KadDHT`` (strict_validation off) stores any value under any namespace it
has no validator for, keeps up to 50,000 of them and then evicts the oldest, cards
included. Here every PUT names one of our namespaces, fits its size limit, passes its
validator and is charged to the sender's peer id and source address; the value store
refuses new keys when full rather than evicting, and forgets a card when it expires.
Provider records must use our 16-byte keys and are capped per peer and in total.

Reads are charged too (:class:`ReadRate`): each FIND_NODE, GET_VALUE and GET_PROVIDERS
a peer sends costs units of one budget per peer, per source and in total, charged when
the library first touches the routing table or a store for it, before any lookup or
serialisation; past the budget the stream is reset, as for a refused PUT, and the
refusal is counted under ``dht.read``.

The library's stream handler does the protocol work; we wrap it so that its validator,
stores and routing table know which peer (and address) sent the message, and admit each
inbound stream against :class:`~p2pedge.quota.Quota` ``dht.streams`` (refusals are resets,
counted like the others) with a deadline on every read (:class:`_IdleDeadline`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.provider_store import ProviderStore
from libp2p.kad_dht.value_store import ValueStore
from libp2p.records.validator import NamespacedValidator, Validator

from p2pedge.dht.limits import PROVIDER_KEY_BYTES, PROVIDER_KEY_PREFIX, DhtLimits
from p2pedge.errors import Busy, InvalidRecord, LocalProtocolError, P2PEdgeError
from p2pedge.protocols._stream import remote_host, reset_quietly
from p2pedge.quota import Limit, Quota, RateLimit
from p2pedge.records.card import (
    CARD_NAMESPACE,
    MAX_CARD_BYTES,
    verify_card,
)

log = logging.getLogger("p2pedge.dht")

_DAY_S = 24 * 3600.0


@dataclass(frozen=True)
class Namespace:
    """One kind of record: its size limit, its validator, and when a value lapses."""

    name: str
    max_bytes: int
    validator: Validator
    expires_at: Callable[[bytes], float]


# (peer id, source address) of the inbound DHT message being handled, if any.
_sender: ContextVar[tuple[str, str] | None] = ContextVar("p2pedge_dht_sender", default=None)
# whether the inbound message being handled has been charged its read already
_read_charged: ContextVar[bool] = ContextVar("p2pedge_dht_read_charged", default=False)
# a PUT_VALUE passed validation: the store lookup that follows is part of it, not a read
_in_put: ContextVar[bool] = ContextVar("p2pedge_dht_in_put", default=False)


@contextmanager
def sender(peer: str, source: str) -> Iterator[None]:
    """Charge what the DHT admits inside this block to ``peer`` at address ``source``."""
    token = _sender.set((peer, source))
    try:
        yield
    finally:
        _sender.reset(token)


class ReadRate:
    """The read budget (see the module docstring): ``charge`` one inbound message's read,
    of ``cost`` units, to its sender, or raise :class:`Busy` (counted in ``refused``)."""

    LIMIT = "dht.read"

    def __init__(self, limits: DhtLimits, clock: Callable[[], float], refused: Counter[str]):
        self.rate = PeerRate(self.LIMIT, limits.read_rate, limits.read_burst, limits.source_share)
        self.total = RateLimit(self.LIMIT, limits.read_total_rate, limits.read_total_burst)
        self.clock = clock
        self.refused = refused

    def charge(self, cost: float, *, first: bool) -> None:
        """Charge the message being handled, if it is inbound. ``first`` marks a store
        lookup that opens a message's work (the routing-table lookup after it is free)."""
        inbound = _sender.get()
        if inbound is None:
            return  # our own lookups
        if not first and _read_charged.get():
            _read_charged.set(False)  # GET_VALUE / GET_PROVIDERS: charged at the store
            return
        _read_charged.set(first)
        now = self.clock()
        try:
            self.rate.take(*inbound, now, cost)
            try:
                self.total.take("total", now, cost)
            except Busy as exc:
                raise Busy(str(exc), limit=self.LIMIT, scope="total") from None
        except Busy as exc:
            self.refused[self.LIMIT] += 1
            log.debug("refused a DHT read from %s: %s", inbound[0], exc)
            raise


class PeerRate:
    """A rate per peer and ``share`` times it per source address."""

    def __init__(self, name: str, rate: float, burst: float, share: float) -> None:
        self.name = name
        self.peers = RateLimit(name, rate, burst)
        self.sources = RateLimit(name, rate * share, burst * share)

    def take(self, peer: str, source: str, now: float, cost: float = 1.0) -> None:
        self.peers.take(peer, now, cost)
        if source:
            try:
                self.sources.take(source, now, cost)
            except Busy as exc:
                raise Busy(
                    str(exc), limit=self.name, scope=exc.scope.replace("peer", "source")
                ) from None


def card_namespace(clock: Callable[[], float], max_lifetime: float) -> Namespace:
    """Cards: signed by the peer they name, current, at most ``max_lifetime`` long."""

    class CardValidator(Validator):  # type: ignore[misc]
        def validate(self, key: str, value: bytes) -> None:
            verify_card(value, clock(), key, max_lifetime=max_lifetime)

        def select(self, key: str, values: list[bytes]) -> int:
            best, best_issued = 0, float("-inf")
            for index, value in enumerate(values):
                try:
                    issued = verify_card(value, clock(), key, max_lifetime=max_lifetime).issued_at
                except InvalidRecord:
                    continue
                if issued > best_issued:
                    best, best_issued = index, issued
            return best

    def expires_at(value: bytes) -> float:
        # Runs on values the validator has admitted; unreadable ones lapse at once.
        try:
            return verify_card(value, clock(), max_lifetime=max_lifetime).expires_at
        except InvalidRecord:
            return 0.0

    return Namespace(CARD_NAMESPACE, MAX_CARD_BYTES, CardValidator(), expires_at)


def _namespace_of(key: str) -> str:
    parts = key.split("/", 2)
    return parts[1] if len(parts) == 3 and parts[0] == "" and parts[2] else ""


class StrictValidator(NamespacedValidator):  # type: ignore[misc]
    """Admits only registered namespaces, within size, at the sender's allowed rate."""

    def __init__(self, namespaces: dict[str, Namespace], put_rate: PeerRate, clock: Any) -> None:
        super().__init__({n.name: n.validator for n in namespaces.values()}, True)
        self.namespaces = namespaces
        self.put_rate = put_rate
        self.clock = clock
        self.refused: Counter[str] = Counter()  # refusals by limit, for tests and metrics

    def add_validator(self, namespace: str, validator: Validator) -> None:
        raise LocalProtocolError("the strict DHT's namespaces are fixed at construction")

    def validate(self, key: str, value: bytes) -> None:
        try:
            self._validate(key, value)
        except P2PEdgeError as exc:
            self.refused[getattr(exc, "limit", "") or type(exc).__name__] += 1
            sender = _sender.get()
            log.debug("refused PUT of %s from %s: %s", key, sender and sender[0], exc)
            raise
        if _sender.get() is not None:
            _in_put.set(True)

    def _validate(self, key: str, value: bytes) -> None:
        sender = _sender.get()
        if sender is not None:  # charged before any parsing or signature check
            self.put_rate.take(*sender, self.clock())
        namespace = self.namespaces.get(_namespace_of(key))
        if namespace is None:
            raise InvalidRecord(f"DHT key {key[:64]!r} is not in a p2pedge namespace")
        if len(value) > namespace.max_bytes:
            raise InvalidRecord(
                f"{namespace.name} value of {len(value)} bytes exceeds {namespace.max_bytes}"
            )
        namespace.validator.validate(key, value)


class BoundedValueStore(ValueStore):  # type: ignore[misc]
    """Refuses new keys when full instead of evicting, and forgets a value when it lapses;
    a peer's GET_VALUE is charged its read (``reads``) before the lookup."""

    def __init__(self, host: Any, local_peer_id: Any, validator: StrictValidator, limit: int):
        super().__init__(host, local_peer_id)
        self.validator = validator
        self.limit = limit
        self.reads: ReadRate | None = None
        self.read_cost = 1.0

    def get(self, key: bytes) -> Any:
        if _in_put.get():
            _in_put.set(False)  # a PUT comparing with what is held: charged as a PUT
        elif self.reads is not None:
            self.reads.charge(self.read_cost, first=True)
        return super().get(key)

    def put_record(self, key: bytes, record: Any) -> None:
        if key not in self.store and self._held_for_others() >= self.limit:
            self.cleanup_expired()
            if self._held_for_others() >= self.limit:
                full = Busy(f"DHT holds {self.limit} values", limit="dht.values", scope="total")
                _refuse(self.validator.refused, full)
                return
        namespace = self.validator.namespaces.get(_namespace_of(key.decode("utf-8", "replace")))
        lapses = namespace.expires_at(record.value) if namespace is not None else 0.0
        self.store[key] = (record, min(time.time() + _DAY_S, lapses))

    def _held_for_others(self) -> int:
        return len(self.store) - len(self.local_keys & self.store.keys())


class BoundedProviderStore(ProviderStore):  # type: ignore[misc]
    """Provider records under our key shape only, capped per peer and in total."""

    def __init__(self, host: Any, peer_routing: Any, limits: DhtLimits, refused: Counter[str]):
        super().__init__(host, peer_routing)
        self.limits = limits
        self.refused = refused
        self.reads: ReadRate | None = None

    def get_providers(self, key: bytes) -> Any:
        if self.reads is not None:
            self.reads.charge(self.limits.get_providers_cost, first=True)
        return super().get_providers(key)

    def add_provider(self, key: bytes, provider: Any) -> None:
        peer = str(provider.peer_id) if provider is not None and provider.peer_id else ""
        if peer and provider.peer_id != self.local_peer_id:
            try:
                self.admit(key, peer)
            except P2PEdgeError as exc:
                _refuse(self.refused, exc)
                return
        super().add_provider(key, provider)

    def admit(self, key: bytes, peer: str) -> None:
        """Raise the typed refusal unless ``peer`` may hold a record under ``key``."""
        if len(key) != PROVIDER_KEY_BYTES or not key.startswith(PROVIDER_KEY_PREFIX):
            raise InvalidRecord(
                f"provider key of {len(key)} bytes, not a {PROVIDER_KEY_BYTES}-byte sha2-256 "
                "multihash",
            )
        if peer in self.providers.get(key, {}):
            return  # a refresh, not a new record
        limits = self.limits
        total = sum(len(held) for held in self.providers.values())
        if total >= limits.max_provider_records:
            self.cleanup_expired()
            total = sum(len(held) for held in self.providers.values())
        if total >= limits.max_provider_records:
            raise Busy("DHT provider store is full", limit="dht.providers", scope="total")
        mine = sum(1 for held in self.providers.values() if peer in held)
        if mine >= limits.max_provider_records_per_peer:
            raise Busy(
                f"{peer} holds its share of provider records", limit="dht.providers", scope="peer"
            )


def _refuse(refused: Counter[str], exc: P2PEdgeError) -> None:
    """Count a refusal; a peer's message gets it raised (its stream ends), while a record
    our own lookup came across is simply not cached."""
    refused[getattr(exc, "limit", "") or type(exc).__name__] += 1
    if _sender.get() is not None:
        raise exc
    log.debug("not caching a DHT record: %s", exc)


class StrictKadDHT(KadDHT):  # type: ignore[misc]
    """py-libp2p's Kademlia in server mode, admitting only what p2pedge publishes."""

    def __init__(
        self,
        host: Any,
        *,
        limits: DhtLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits = limits or DhtLimits()
        self.clock = clock
        cards = card_namespace(clock, limits.max_card_lifetime_s)
        put_rate = PeerRate("dht.put", limits.put_rate, limits.put_burst, limits.source_share)
        validator = StrictValidator({cards.name: cards}, put_rate, clock)
        super().__init__(
            host,
            DHTMode.SERVER,
            validator=validator,
            validator_changed=True,
            strict_validation=True,
        )
        self.value_store = BoundedValueStore(host, self.local_peer_id, validator, limits.max_values)
        self.provider_store = BoundedProviderStore(
            host, self.peer_routing, limits, validator.refused
        )
        self.refused = validator.refused
        per_peer = limits.max_streams_per_peer
        per_source = min(limits.max_streams, int(per_peer * limits.source_share))
        self.streams = Quota("dht.streams", Limit(per_peer, per_source, limits.max_streams))
        self._provider_rate = PeerRate(
            "dht.provider", limits.provider_rate, limits.provider_burst, limits.source_share
        )
        self.reads = reads = ReadRate(limits, clock, self.refused)
        self.value_store.reads = self.provider_store.reads = reads
        self.value_store.read_cost = limits.get_value_cost
        # every inbound read ends in one routing-table lookup: a FIND_NODE is charged there
        table, closest = self.routing_table, self.routing_table.find_local_closest_peers

        def find_local_closest_peers(key: bytes, count: int = 20) -> Any:
            reads.charge(limits.find_node_cost, first=False)
            return closest(key, count)

        table.find_local_closest_peers = find_local_closest_peers

    async def handle_stream(self, stream: Any) -> None:
        """The library's message loop, admitted against ``dht.streams``, with the sender
        known to our validator and stores and a deadline on each read."""
        if self.mode == DHTMode.CLIENT:
            await stream.close()
            return
        peer, source = stream.muxed_conn.peer_id.to_base58(), remote_host(stream)
        try:
            grant = self.streams.acquire(peer, source)
        except Busy as exc:
            self.refused[exc.limit] += 1
            log.debug("refused a DHT stream from %s: %s", peer, exc)
            await reset_quietly(stream)
            return
        try:
            with sender(peer, source):
                await self._do_handle_stream(_IdleDeadline(stream, self.limits.stream_idle_s))
        finally:
            self.streams.release(grant)

    def _check_provider_rate_limit(self, peer_id: Any) -> bool:
        inbound = _sender.get()
        source = inbound[1] if inbound is not None else ""
        try:
            self._provider_rate.take(peer_id.to_base58(), source, self.clock())
        except Busy as exc:
            self.refused[exc.limit] += 1
            log.debug("refused ADD_PROVIDER from %s: %s", peer_id, exc)
            return False
        return True


class _IdleDeadline:
    """A stream whose every read fails after ``seconds`` without bytes.

    The library's loop treats the failure like any read error: it resets the stream and
    returns, which frees the stream's slot.
    """

    def __init__(self, stream: Any, seconds: float) -> None:
        self._stream = stream
        self._seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        with trio.fail_after(self._seconds):
            data: bytes = await self._stream.read(n)
        return data
