"""A card's claims are bounded: lifetime, timestamps, numbers, self-reported compute."""

from __future__ import annotations

import dataclasses
import math

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_card import NOW, make_card

from p2pedge.errors import InvalidRecord
from p2pedge.records.card import (
    MAX_CARD_LIFETIME_S,
    MAX_CLAIMED_GFLOPS,
    card_key,
    sign_card,
    verify_card,
)
from p2pedge.wire.messages import pack

YEAR_S = 365 * 24 * 3600.0


def signed_body(key: Ed25519PrivateKey, **fields: object) -> bytes:
    """A card record whose body carries ``fields`` as given, bypassing sign_card."""
    body = pack(
        {**make_card(key).content(), "issued_at": NOW, "expires_at": NOW + 9, "v": 1, **fields}
    )
    return pack({"body": body, "sig": key.sign(body)})


def test_lifetime_up_to_the_cap_is_accepted() -> None:
    key = Ed25519PrivateKey.generate()
    card = make_card(key, expires_at=NOW + MAX_CARD_LIFETIME_S)
    assert verify_card(sign_card(card, key), NOW + 1, card_key(card.peer_id)) == card


@pytest.mark.parametrize("lifetime", [MAX_CARD_LIFETIME_S + 1, 31 * YEAR_S])
def test_lifetime_beyond_the_cap_is_rejected(lifetime: float) -> None:
    key = Ed25519PrivateKey.generate()
    record = sign_card(make_card(key, expires_at=NOW + lifetime), key)
    with pytest.raises(InvalidRecord, match="lifetime"):
        verify_card(record, NOW + 1)


def test_the_cap_is_the_callers_to_choose() -> None:
    key = Ed25519PrivateKey.generate()
    record = sign_card(make_card(key, expires_at=NOW + 600), key)
    assert verify_card(record, NOW, max_lifetime=600).expires_at == NOW + 600
    with pytest.raises(InvalidRecord, match="lifetime"):
        verify_card(record, NOW, max_lifetime=599)


def test_card_issued_far_in_the_future_is_rejected_even_with_a_short_lifetime() -> None:
    key = Ed25519PrivateKey.generate()
    record = sign_card(make_card(key, issued_at=NOW + 86400, expires_at=NOW + 86500), key)
    with pytest.raises(InvalidRecord, match="future"):
        verify_card(record, NOW)


@pytest.mark.parametrize(
    "fields",
    [
        {"compute_gflops": math.nan},
        {"compute_gflops": math.inf},
        {"compute_gflops": -1.0},
        {"load": math.nan},
        {"load": -0.5},
        {"expires_at": math.inf},
        {"issued_at": math.nan},
        {"cpu_cores": -4},
        {"cpu_cores": 1 << 40},
        {"ram_total": -1},
    ],
)
def test_non_finite_or_negative_numbers_are_rejected(fields: dict[str, object]) -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(InvalidRecord):
        verify_card(signed_body(key, **fields), NOW)


def test_implausible_compute_and_load_are_clamped_at_decode() -> None:
    key = Ed25519PrivateKey.generate()
    liar = make_card(key, compute_gflops=1e9, load=7.0, accelerators=("cuda",) * 8, cpu_cores=4096)
    card = verify_card(sign_card(liar, key), NOW)
    assert card.compute_gflops == MAX_CLAIMED_GFLOPS
    assert card.load == 1.0
    honest = make_card(key, compute_gflops=138.7, load=0.25)
    assert verify_card(sign_card(honest, key), NOW) == dataclasses.replace(honest)
