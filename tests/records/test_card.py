import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from p2pedge.errors import InvalidRecord
from p2pedge.records.card import (
    MAX_CARD_BYTES,
    CachedModel,
    CapabilityCard,
    ServedLayers,
    card_key,
    sign_card,
    verify_card,
)
from p2pedge.records.peer_ids import ed25519_from_peer_id, peer_id_from_ed25519
from p2pedge.wire.messages import pack, unpack_map

NOW = 1_700_000_000.0


def make_card(key: Ed25519PrivateKey, **changes: object) -> CapabilityCard:
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    card = CapabilityCard(
        peer_id=peer_id_from_ed25519(public),
        public_key=public,
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        software_version="0.1.0",
        os="linux",
        arch="x86_64",
        cpu_cores=2,
        ram_total=24 << 30,
        ram_available=20 << 30,
        accelerators=(),
        execution_providers=("CPUExecutionProvider",),
        compute_gflops=50.0,
        models=(CachedModel("smollm2@1", "ab" * 32),),
        layers_served=(ServedLayers("smollm2@1", 0, 10),),
        load=0.25,
        issued_at=NOW,
        expires_at=NOW + 180,
    )
    return dataclasses.replace(card, **changes)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    key = Ed25519PrivateKey.generate()
    card = make_card(key)
    assert verify_card(sign_card(card, key), NOW + 1, card_key(card.peer_id)) == card


def test_peer_id_embeds_the_key() -> None:
    key = Ed25519PrivateKey.generate()
    card = make_card(key)
    assert card.peer_id.startswith("12D3KooW")
    assert ed25519_from_peer_id(card.peer_id) == card.public_key


def test_card_signed_by_another_key_is_rejected() -> None:
    victim, attacker = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    forged = make_card(victim, load=0.0)
    body = pack(
        {**unpack_map(pack(forged.content())), "issued_at": NOW, "expires_at": NOW + 180, "v": 1}
    )
    record = pack({"body": body, "sig": attacker.sign(body)})
    with pytest.raises(InvalidRecord, match="signature"):
        verify_card(record, NOW)


def test_card_naming_a_peer_whose_key_it_does_not_carry_is_rejected() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    other_id = make_card(other).peer_id
    card = make_card(key, peer_id=other_id)
    with pytest.raises(ValueError):
        sign_card(card, key)
    body = pack(
        {
            **make_card(key).content(),
            "peer_id": other_id,
            "issued_at": NOW,
            "expires_at": NOW + 9,
            "v": 1,
        }
    )
    with pytest.raises(InvalidRecord, match="not signed by the key"):
        verify_card(pack({"body": body, "sig": key.sign(body)}), NOW)


def test_expired_card_is_rejected() -> None:
    key = Ed25519PrivateKey.generate()
    record = sign_card(make_card(key), key)
    assert verify_card(record, NOW + 179)
    with pytest.raises(InvalidRecord, match="expired"):
        verify_card(record, NOW + 180)


def test_card_under_another_peers_key_is_rejected() -> None:
    key = Ed25519PrivateKey.generate()
    record = sign_card(make_card(key), key)
    with pytest.raises(InvalidRecord, match="another peer"):
        verify_card(record, NOW, card_key("12D3KooWsomeoneelse"))


def test_oversized_card_is_rejected() -> None:
    key = Ed25519PrivateKey.generate()
    big = make_card(key, addrs=tuple(f"/ip4/10.0.0.{i}/tcp/{i}" for i in range(2000)))
    with pytest.raises(ValueError):
        sign_card(big, key)
    body = pack({**big.content(), "issued_at": NOW, "expires_at": NOW + 9, "v": 1})
    record = pack({"body": body, "sig": key.sign(body)})
    assert len(record) > MAX_CARD_BYTES
    with pytest.raises(InvalidRecord, match="exceeds"):
        verify_card(record, NOW)


def test_future_card_is_rejected() -> None:
    key = Ed25519PrivateKey.generate()
    record = sign_card(make_card(key, issued_at=NOW + 3600, expires_at=NOW + 3700), key)
    with pytest.raises(InvalidRecord, match="future"):
        verify_card(record, NOW)


@pytest.mark.parametrize(
    "mutation",
    [
        {"cpu_cores": "two"},
        {"models": [{"id": 3}]},
        {"layers_served": [{"model": "m", "start": 5, "end": 2}]},
        {"addrs": "not-a-list"},
        {"load": True},
    ],
)
def test_malformed_fields_are_rejected(mutation: dict[str, object]) -> None:
    key = Ed25519PrivateKey.generate()
    body = pack(
        {**make_card(key).content(), "issued_at": NOW, "expires_at": NOW + 9, "v": 1, **mutation}
    )
    with pytest.raises(InvalidRecord):
        verify_card(pack({"body": body, "sig": key.sign(body)}), NOW)


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash_the_validator(data: bytes) -> None:
    with pytest.raises(InvalidRecord):
        verify_card(data, NOW)


@given(
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(), st.binary()),
        max_size=8,
    )
)
def test_arbitrary_maps_are_invalid_records(body: dict[str, object]) -> None:
    with pytest.raises(InvalidRecord):
        verify_card(pack({"body": pack(body), "sig": b"x" * 64}), NOW)
