"""Publisher keys (ed25519) and the set of publishers a node trusts.

Private keys are stored as PKCS#8 PEM (``keygen`` writes them 0600); public keys travel
as 64 lowercase hex characters (the raw 32 bytes), which is also how manifests name
their publisher, so a trust directory is just ``*.pub`` files holding that hex.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pedge.errors import ConfigError, IntegrityError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class UntrustedPublisher(IntegrityError):
    """The manifest is signed by a key this node does not trust."""


class BadSignature(IntegrityError):
    """The signature does not verify over the canonical manifest."""


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write the key 0600 and its ``.pub`` companion next to it."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    Path(str(path) + ".pub").write_text(public_key_hex(key) + "\n")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an ed25519 key")
    return key


def parse_public_hex(text: str) -> Ed25519PublicKey:
    text = text.strip().lower()
    if not _HEX64.match(text):
        raise IntegrityError("publisher key must be 64 hex characters")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))


def verify_signature(public_hex: str, signature_hex: str, message: bytes) -> None:
    public = parse_public_hex(public_hex)
    try:
        signature = bytes.fromhex(signature_hex)
    except ValueError as exc:
        raise BadSignature("signature is not hex") from exc
    try:
        public.verify(signature, message)
    except InvalidSignature as exc:
        raise BadSignature("manifest signature does not verify") from exc


class TrustStore:
    """The publisher keys a node accepts manifests from."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys: set[str] = set()
        for key in keys:
            self.add(key)

    @classmethod
    def from_dir(cls, directory: Path) -> TrustStore:
        """Every ``*.pub`` file in ``directory`` (one hex key per file)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(f"trust directory {directory} does not exist")
        return cls(p.read_text() for p in sorted(directory.glob("*.pub")))

    @classmethod
    def load(cls, paths: Iterable[Path], keys: Iterable[str] = ()) -> TrustStore:
        """Keys from ``*.pub`` files and directories of them, plus literal hex ``keys``."""
        trust = cls(keys)
        for path in map(Path, paths):
            if path.is_dir():
                trust._keys |= cls.from_dir(path)._keys
            else:
                try:
                    trust.add(path.read_text())
                except OSError as exc:
                    raise ConfigError(f"cannot read publisher key {path}: {exc}") from exc
        return trust

    def add(self, key_hex: str) -> None:
        parse_public_hex(key_hex)
        self._keys.add(key_hex.strip().lower())

    def __contains__(self, key_hex: object) -> bool:
        return isinstance(key_hex, str) and key_hex.lower() in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def require(self, key_hex: str) -> None:
        if key_hex not in self:
            raise UntrustedPublisher(f"publisher {key_hex[:16]}… is not trusted")
