"""The node's ed25519 identity, kept in its data directory so the peer id survives restarts."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from p2pedge.errors import ConfigError
from p2pedge.records.peer_ids import peer_id_from_ed25519

KEY_FILE = "identity.key"


class Identity:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self.private_key = private_key
        self.seed = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.peer_id = peer_id_from_ed25519(self.public_key)

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A reproducible identity (simnet, tests); never written to disk."""
        if len(seed) != 32:
            raise ConfigError("an identity seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Identity:
        path = Path(data_dir) / KEY_FILE
        if path.exists():
            seed = path.read_bytes()
            if len(seed) != 32:
                raise ConfigError(f"{path} is not a 32-byte ed25519 seed")
            return cls(Ed25519PrivateKey.from_private_bytes(seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        identity = cls(Ed25519PrivateKey.generate())
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(identity.seed)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return identity

    def libp2p_key_pair(self) -> object:
        from libp2p.crypto.ed25519 import Ed25519PrivateKey as LibKey
        from libp2p.crypto.keys import KeyPair

        private = LibKey.from_bytes(self.seed)
        return KeyPair(private, private.get_public_key())


def read_psk(path: Path) -> str:
    """A libp2p ``swarm.key`` (``/key/swarm/psk/1.0.0/``, ``/base16/``, hex) or bare hex."""
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read PSK file {path}: {exc}") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("/key/swarm/psk/"):
        if len(lines) != 3 or lines[1] != "/base16/":
            raise ConfigError(f"{path}: only /base16/ swarm keys are supported")
        lines = lines[2:]
    key = "".join(lines)
    if len(key) != 64 or any(c not in "0123456789abcdefABCDEF" for c in key):
        raise ConfigError(f"{path}: a pre-shared key is 64 hex characters")
    return key.lower()


def write_psk(path: Path) -> str:
    key = os.urandom(32).hex()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"/key/swarm/psk/1.0.0/\n/base16/\n{key}\n")
    return key
