"""libp2p peer ids for ed25519 keys, derived without importing libp2p.

A libp2p peer id is the identity multihash of the protobuf-encoded public key
(``Type=Ed25519, Data=<32 bytes>``), written in base58btc. Deriving it here keeps
record validation pure and lets us check that a card is signed by the peer it names.
"""

from __future__ import annotations

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_ED25519_PROTO_PREFIX = b"\x08\x01\x12\x20"  # field 1 (KeyType) = 1, field 2 (Data) len 32
_IDENTITY_MULTIHASH = b"\x00\x24"  # identity hash, 36 bytes follow
MAX_IDENTITY_KEY = 42  # libp2p inlines public keys up to this size; larger ones are hashed
MAX_PEER_ID_CHARS = 128


def b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, rem = divmod(number, 58)
        out.append(_ALPHABET[rem])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        index = _ALPHABET.find(char)
        if index < 0:
            raise ValueError(f"invalid base58 character {char!r}")
        number = number * 58 + index
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * zeros + body


def peer_id_from_ed25519(public_key: bytes) -> str:
    if len(public_key) != 32:
        raise ValueError("an ed25519 public key is 32 bytes")
    return b58encode(_IDENTITY_MULTIHASH + _ED25519_PROTO_PREFIX + public_key)


def ed25519_from_peer_id(peer_id: str) -> bytes:
    """The public key embedded in an ed25519 peer id (``12D3KooW...``)."""
    raw = b58decode(peer_id)
    prefix = _IDENTITY_MULTIHASH + _ED25519_PROTO_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        raise ValueError(f"{peer_id!r} is not an ed25519 peer id")
    return raw[len(prefix) :]


def is_peer_id(text: str) -> bool:
    """Whether ``text`` is a libp2p peer id in base58btc: an identity multihash of a public
    key (at most ``MAX_IDENTITY_KEY`` bytes) or a sha2-256 multihash of a larger one.
    Servers dial the ids clients name, so anything else must stop at decode."""
    if not 0 < len(text) <= MAX_PEER_ID_CHARS:
        return False
    try:
        raw = b58decode(text)
    except ValueError:
        return False
    if raw[:2] == b"\x12\x20":
        return len(raw) == 34
    # identity multihash of a protobuf PublicKey: field 1 key type (RSA, Ed25519,
    # Secp256k1, ECDSA), field 2 the key's bytes
    return (
        len(raw) > 6
        and raw[0] == 0
        and raw[1] <= MAX_IDENTITY_KEY
        and len(raw) == 2 + raw[1]
        and raw[2] == 0x08
        and raw[3] <= 3
        and raw[4] == 0x12
        and raw[5] == len(raw) - 6
    )
