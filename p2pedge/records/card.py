"""Signed capability cards: what a peer has and can do, verifiable by anyone.

A card is a canonical msgpack body signed with the peer's own ed25519 key. The peer id
is derived from the key inside the body, so a card signed by any other key fails
validation. Cards carry ``issued_at``/``expires_at``; the newest valid card wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from p2pedge.errors import InvalidRecord, RemoteProtocolError
from p2pedge.records.keys import CARD_NAMESPACE as CARD_NAMESPACE
from p2pedge.records.keys import card_key as card_key
from p2pedge.records.peer_ids import peer_id_from_ed25519
from p2pedge.wire.messages import pack, unpack_map

MAX_CARD_BYTES = 16 * 1024
CARD_VERSION = 1
_MAX_SKEW_S = 300.0
# A card is re-announced every interval and lives a few intervals; a lifetime beyond an
# hour only lets a record outlive the peer's own say about itself.
MAX_CARD_LIFETIME_S = 3600.0
# Self-reported figures are believed only within these bounds (no float32 matmul on a
# home machine reaches this); measured step times replace them where routing has them.
MAX_CLAIMED_GFLOPS = 5000.0
_MAX_COUNT = 1 << 16  # cores, accelerators: a sanity bound, not a capability


@dataclass(frozen=True)
class CachedModel:
    id: str  # name@version
    digest: str  # manifest digest, sha256 hex


@dataclass(frozen=True)
class ServedLayers:
    model: str
    start: int
    end: int


@dataclass(frozen=True)
class CapabilityCard:
    peer_id: str
    public_key: bytes
    addrs: tuple[str, ...]
    software_version: str
    os: str
    arch: str
    cpu_cores: int
    ram_total: int
    ram_available: int
    accelerators: tuple[str, ...]
    execution_providers: tuple[str, ...]
    compute_gflops: float
    models: tuple[CachedModel, ...]
    layers_served: tuple[ServedLayers, ...]
    load: float
    issued_at: float
    expires_at: float
    extra: dict[str, Any] = field(default_factory=dict)

    def has_model(self, model: str) -> bool:
        return any(m.id == model or m.id.split("@")[0] == model for m in self.models)

    def content(self) -> dict[str, Any]:
        """What the card says, apart from when: the signed body without its timestamps."""
        body = _to_body(self)
        body.pop("issued_at")
        body.pop("expires_at")
        return body


def _to_body(card: CapabilityCard) -> dict[str, Any]:
    body = asdict(card)
    body["addrs"] = list(card.addrs)
    body["accelerators"] = list(card.accelerators)
    body["execution_providers"] = list(card.execution_providers)
    body["models"] = [asdict(m) for m in card.models]
    body["layers_served"] = [asdict(s) for s in card.layers_served]
    body["v"] = CARD_VERSION
    return body


def sign_card(card: CapabilityCard, key: Ed25519PrivateKey) -> bytes:
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    if public != card.public_key or peer_id_from_ed25519(public) != card.peer_id:
        raise ValueError("card must be signed by the key of the peer it names")
    body = pack(_to_body(card))
    record = pack({"body": body, "sig": key.sign(body)})
    if len(record) > MAX_CARD_BYTES:
        raise ValueError(f"card of {len(record)} bytes exceeds {MAX_CARD_BYTES}")
    return record


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidRecord(f"card field {name!r} is missing or of the wrong type")
    return value


def _str_list(body: dict[str, Any], name: str) -> tuple[str, ...]:
    items = _field(body, name, list)
    if not all(isinstance(item, str) for item in items):
        raise InvalidRecord(f"card field {name!r} must list strings")
    return tuple(items)


def _finite(body: dict[str, Any], name: str) -> float:
    """A finite, non-negative number: NaN or infinity would poison every comparison."""
    value = float(_field(body, name, (int, float)))
    if not math.isfinite(value) or value < 0:
        raise InvalidRecord(f"card field {name!r} must be finite and non-negative")
    return value


def _count(body: dict[str, Any], name: str, cap: int) -> int:
    value: int = _field(body, name, int)
    if not 0 <= value <= cap:
        raise InvalidRecord(f"card field {name!r} is out of range")
    return value


def _parse_body(body: dict[str, Any]) -> CapabilityCard:
    models = []
    for item in _field(body, "models", list):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("id"), str)
            and isinstance(item.get("digest"), str)
        ):
            raise InvalidRecord("card model entries need id and digest")
        models.append(CachedModel(item["id"], item["digest"]))
    served = []
    for item in _field(body, "layers_served", list):
        if not isinstance(item, dict):
            raise InvalidRecord("card layer entries must be maps")
        start, end, model = item.get("start"), item.get("end"), item.get("model")
        if not (
            isinstance(model, str) and type(start) is int and type(end) is int and 0 <= start < end
        ):
            raise InvalidRecord("card layer entries need model, start < end")
        served.append(ServedLayers(model, start, end))
    extra = body.get("extra", {})
    if not isinstance(extra, dict):
        raise InvalidRecord("card field 'extra' must be a map")
    return CapabilityCard(
        peer_id=_field(body, "peer_id", str),
        public_key=_field(body, "public_key", bytes),
        addrs=_str_list(body, "addrs"),
        software_version=_field(body, "software_version", str),
        os=_field(body, "os", str),
        arch=_field(body, "arch", str),
        cpu_cores=_count(body, "cpu_cores", _MAX_COUNT),
        ram_total=_count(body, "ram_total", 1 << 60),
        ram_available=_count(body, "ram_available", 1 << 60),
        accelerators=_str_list(body, "accelerators"),
        execution_providers=_str_list(body, "execution_providers"),
        compute_gflops=min(_finite(body, "compute_gflops"), MAX_CLAIMED_GFLOPS),
        models=tuple(models),
        layers_served=tuple(served),
        load=min(_finite(body, "load"), 1.0),
        issued_at=_finite(body, "issued_at"),
        expires_at=_finite(body, "expires_at"),
        extra=extra,
    )


def verify_card(
    record: bytes,
    now: float,
    key: str | None = None,
    *,
    max_lifetime: float = MAX_CARD_LIFETIME_S,
) -> CapabilityCard:
    """Parse and check a card from anyone; raise :class:`InvalidRecord` if it fails.

    Checks, in order: size, shape and ranges, that the signing key is the one the peer
    id names, the signature, the DHT key (when given), that the card is current at
    ``now``, and that it claims no lifetime beyond ``max_lifetime``. Compute and load
    are clamped to plausible bounds (``MAX_CLAIMED_GFLOPS``, 1.0).
    """
    if len(record) > MAX_CARD_BYTES:
        raise InvalidRecord(f"card of {len(record)} bytes exceeds {MAX_CARD_BYTES}")
    try:
        outer = unpack_map(record, MAX_CARD_BYTES)
        body_bytes = outer.get("body")
        signature = outer.get("sig")
        if not isinstance(body_bytes, bytes) or not isinstance(signature, bytes):
            raise InvalidRecord("card record needs body and sig bytes")
        body = unpack_map(body_bytes, MAX_CARD_BYTES)
    except RemoteProtocolError as exc:
        raise InvalidRecord(f"malformed card: {exc}") from exc
    if body.get("v") != CARD_VERSION:
        raise InvalidRecord(f"unsupported card version {body.get('v')!r}")
    card = _parse_body(body)
    if len(card.public_key) != 32 or peer_id_from_ed25519(card.public_key) != card.peer_id:
        raise InvalidRecord("card is not signed by the key of the peer it names")
    try:
        Ed25519PublicKey.from_public_bytes(card.public_key).verify(signature, body_bytes)
    except InvalidSignature as exc:
        raise InvalidRecord("card signature does not verify") from exc
    if key is not None and key != card_key(card.peer_id):
        raise InvalidRecord("card stored under another peer's key")
    if card.expires_at <= now:
        raise InvalidRecord(f"card of {card.peer_id} expired")
    if card.issued_at > now + _MAX_SKEW_S or card.issued_at >= card.expires_at:
        raise InvalidRecord("card issued in the future or with a bad lifetime")
    if card.expires_at - card.issued_at > max_lifetime:
        raise InvalidRecord(
            f"card lifetime {card.expires_at - card.issued_at:.0f} s exceeds {max_lifetime:.0f} s"
        )
    return card


def covers_model(cards: Sequence[CapabilityCard], name: str) -> bool:
    """Whether the blocks of ``name`` that ``cards`` serve cover the whole model."""
    served = sorted((s.start, s.end) for c in cards for s in c.layers_served if s.model == name)
    covered = 0
    for start, end in served:
        if start <= covered:
            covered = max(covered, end)
    return bool(served) and covered >= max(end for _, end in served)
