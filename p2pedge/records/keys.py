"""Every DHT key p2pedge reads or writes, built in one place (pure: hashlib only).

Keys stay short: py-libp2p's lookups break on keys past about 50 bytes, so long names
are hashed. A card lives under its own namespace, which the DHT validates; provider
records announce who holds a model (any version, or one) or a blob.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

CARD_NAMESPACE = "p2pcard"
MAX_KEY_CHARS = 48


def card_key(peer_id: str) -> str:
    """DHT key of a peer's signed capability card."""
    digest = hashlib.sha256(peer_id.encode()).hexdigest()[:24]
    return f"/{CARD_NAMESPACE}/{digest}"


def model_key(model: str) -> str:
    """Provider key for holders of ``model``: a name (any version) or ``name@version``."""
    key = "model/" + model
    if len(key) < MAX_KEY_CHARS:
        return key
    return "model/" + hashlib.sha256(model.encode()).hexdigest()[:32]


def model_keys(model_ids: Iterable[str]) -> list[str]:
    """The provider keys a holder of these ``name@version`` ids announces: each id and
    each bare name, so a lookup by either finds it."""
    ids = set(model_ids)
    return sorted({model_key(i.split("@")[0]) for i in ids} | {model_key(i) for i in ids})


def blob_key(digest: str) -> str:
    """Provider key under which holders of a blob (by SHA-256 hex) announce themselves."""
    return "blob/" + digest[:32]


def provider_record_key(key: str) -> str:
    """The raw key a provider record is stored under: a sha2-256 multihash in hex, which
    py-libp2p decodes to its 34 bytes. A multihash is what a CID carries, so peers of
    other libp2p implementations (js-libp2p's ``findProviders(cid)``) ask for the same
    bytes."""
    return "1220" + hashlib.sha256(key.encode()).hexdigest()
