"""Specialists: a model plus a category, a prompt template and generation defaults.

The catalog is declared in TOML so operators can add specialists without code; several
specialists may share one model (one SmolLM2 behind "chat", "summarize", ...), which is
why routing picks a *specialist* first and a *place to run its model* second.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from p2pedge.errors import ConfigError, LocalProtocolError
from p2pedge.ids import ModelId
from p2pedge.runtime.sampling import check_generation, check_sampling

DEFAULT_CATALOG = "catalog.toml"


class CardLike(Protocol):
    """What routing reads from a capability card (the lead's CapabilityCard fits)."""

    @property
    def peer_id(self) -> str: ...

    @property
    def models(self) -> Sequence[Any]: ...


class UnknownCategory(LocalProtocolError, KeyError):
    """The caller named a category or specialist the catalog does not know."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown category {self.name!r}; known: {', '.join(self.known)}"


@dataclass(frozen=True)
class Specialist:
    """How to ask one model for one kind of work."""

    name: str
    category: str
    model: str
    system: str = ""
    template: str = "{text}"
    temperature: float = 0.7
    max_tokens: int = 128
    top_p: float = 1.0
    top_k: int = 0
    description: str = ""

    @property
    def model_id(self) -> ModelId:
        return ModelId.parse(self.model)

    def messages(self, text: str) -> list[dict[str, str]]:
        """Chat messages for ``text``: the system prompt, then the filled template."""
        out: list[dict[str, str]] = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        out.append({"role": "user", "content": self.template.replace("{text}", text)})
        return out


def offered_models(card: CardLike) -> list[str]:
    """Model ids in a card: entries are ``records.card.CachedModel`` or ``{"id": ...}`` maps."""
    out = []
    for entry in card.models:
        value = entry.get("id") if isinstance(entry, Mapping) else getattr(entry, "id", None)
        if isinstance(value, str):
            out.append(value)
    return out


def model_matches(wanted: str, offered: str) -> bool:
    """``name`` matches any version; ``name@ver`` must match exactly (``latest`` is a name)."""
    try:
        want, have = ModelId.parse(wanted), ModelId.parse(offered)
    except ValueError:
        return False
    if "@" not in wanted or want.version == "latest":
        return want.name == have.name
    return want == have


def registered_alias(wanted: str, registered: Iterable[str]) -> str | None:
    """The one registered name that is ``wanted`` under a shorter or longer name, else None.

    Users register model dirs as they like (``smollm2`` for the catalog's
    ``smollm2-135m-instruct``, or the reverse); one name must extend the other at a ``-``
    so ``smollm`` does not pass for ``smollm2``. A pinned version is never aliased, and
    two candidates are not guessed between.
    """
    try:
        want = ModelId.parse(wanted)
    except ValueError:
        return None
    if "@" in wanted and want.version != "latest":
        return None
    found = set()
    for name in registered:
        try:
            have = ModelId.parse(name).name
        except ValueError:
            continue
        short, long = sorted((want.name, have), key=len)
        if have != want.name and long.startswith(short + "-"):
            found.add(name)
    return found.pop() if len(found) == 1 else None


@dataclass
class Catalog:
    """Categories, the specialists behind them and the models those need."""

    specialists: dict[str, Specialist] = field(default_factory=dict)

    @classmethod
    def from_toml(cls, text: str) -> Catalog:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"catalog is not valid TOML: {exc}") from exc
        entries = data.get("specialist", [])
        if not isinstance(entries, list) or not entries:
            raise ConfigError("catalog needs at least one [[specialist]] table")
        catalog = cls()
        for entry in entries:
            catalog.add(_specialist(entry))
        return catalog

    @classmethod
    def load(cls, path: Path | None = None) -> Catalog:
        """Read ``path``, or the catalog shipped with the package."""
        if path is None:
            text = resources.files(__package__).joinpath("data", DEFAULT_CATALOG).read_text("utf-8")
        else:
            text = Path(path).read_text("utf-8")
        return cls.from_toml(text)

    def add(self, specialist: Specialist) -> None:
        if specialist.name in self.specialists:
            raise ConfigError(f"duplicate specialist {specialist.name!r}")
        self.specialists[specialist.name] = specialist

    @property
    def categories(self) -> list[str]:
        return sorted({s.category for s in self.specialists.values()})

    def models(self) -> list[str]:
        return sorted({s.model for s in self.specialists.values()})

    def for_category(self, category: str) -> Specialist:
        """The specialist serving ``category`` (the first declared wins)."""
        for specialist in self.specialists.values():
            if specialist.category == category:
                return specialist
        raise UnknownCategory(category, self.categories)

    def resolve(self, name: str) -> Specialist:
        """A specialist by its name or its category."""
        if name in self.specialists:
            return self.specialists[name]
        try:
            return self.for_category(name)
        except UnknownCategory:
            raise UnknownCategory(name, set(self.categories) | set(self.specialists)) from None

    def peers_offering(self, specialist: Specialist, cards: Iterable[CardLike]) -> list[str]:
        """Peer ids whose cards list the specialist's model."""
        out = []
        for card in cards:
            if any(model_matches(specialist.model, m) for m in offered_models(card)):
                out.append(card.peer_id)
        return out


def _specialist(entry: Any) -> Specialist:
    if not isinstance(entry, dict):
        raise ConfigError("each [[specialist]] must be a table")
    try:
        name, category, model = str(entry["name"]), str(entry["category"]), str(entry["model"])
    except KeyError as exc:
        raise ConfigError(f"specialist lacks {exc.args[0]!r}") from exc
    try:
        ModelId.parse(model)
        spec = Specialist(
            name=name,
            category=category,
            model=model,
            system=str(entry.get("system", "")),
            template=str(entry.get("template", "{text}")),
            temperature=float(entry.get("temperature", 0.7)),
            max_tokens=int(entry.get("max_tokens", 128)),
            top_p=float(entry.get("top_p", 1.0)),
            top_k=int(entry.get("top_k", 0)),
            description=str(entry.get("description", "")),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"specialist {name!r}: {exc}") from exc
    if "{text}" not in spec.template:
        raise ConfigError(f"specialist {name!r}: template must contain {{text}}")
    try:
        check_sampling(spec.temperature, spec.top_p, spec.top_k, None)
        check_generation(spec.max_tokens, ())
    except ValueError as exc:
        raise ConfigError(f"specialist {name!r}: {exc}") from exc
    return spec
