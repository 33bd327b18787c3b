"""Who may publish a name: its first publisher's key, plus keys the operator grants.

The first accepted manifest of a name records its publisher under ``<root>/owners/<name>``;
later versions must be signed by that key or by one the operator listed for the name in a
grants file. A name published before owners were recorded belongs to the keys that signed
its stored versions. Without this, any token holder could take over a name by signing a
newer version with their own key.

Grants file: one ``NAME KEYHEX`` per line (``#`` starts a comment); a name may appear on
several lines to grant several keys.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from p2pedge.errors import ConfigError, IntegrityError
from p2pedge.ids import ModelId
from p2pedge.models.keys import parse_public_hex

Grants = Mapping[str, frozenset[str]]


def parse_grants(text: str, where: str = "grants") -> dict[str, frozenset[str]]:
    """``{name: keys}`` from the grants file format; ``ConfigError`` names the bad line."""
    grants: dict[str, set[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            if len(words) != 2:
                raise ValueError("want NAME KEYHEX")
            name = ModelId(words[0]).name
            parse_public_hex(words[1])
        except (ValueError, IntegrityError) as exc:
            raise ConfigError(f"{where}:{number}: {exc}") from exc
        grants.setdefault(name, set()).add(words[1].lower())
    return {name: frozenset(keys) for name, keys in grants.items()}


def load_grants(path: Path) -> dict[str, frozenset[str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read grants file {path}: {exc}") from exc
    return parse_grants(text, str(path))


class Owners:
    """The owner records under ``root/owners`` and the operator's grants (blocking I/O)."""

    def __init__(self, root: Path, grants: Grants | None = None) -> None:
        self.folder = Path(root) / "owners"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.grants: Grants = grants or {}

    def owner(self, name: str) -> str | None:
        try:
            text = (self.folder / ModelId(name).name).read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"owner record of {name!r} is unreadable: {exc}") from exc
        return text.lower()

    def allowed(self, name: str, legacy_publishers: Iterable[str] = ()) -> frozenset[str] | None:
        """Keys that may publish ``name``; ``None`` when anyone may (nobody published it)."""
        owner = self.owner(name)
        owners = {owner} if owner is not None else {k.lower() for k in legacy_publishers}
        if not owners:
            return None
        return frozenset(owners | self.grants.get(name, frozenset()))

    def claim(self, name: str, key: str) -> None:
        """Record ``key`` as the owner of ``name`` unless an owner is recorded already."""
        path = self.folder / ModelId(name).name
        temp = self.folder / f".tmp-{os.getpid()}-{path.name}"
        temp.write_text(key.lower() + "\n", encoding="ascii")
        try:
            os.link(temp, path)  # atomic and refuses to replace an existing owner
        except FileExistsError:
            pass
        finally:
            temp.unlink(missing_ok=True)
