"""``ask()`` finds a model the user registered under a shorter (or longer) name than the
catalog's: ``smollm2`` for the catalog's ``smollm2-135m-instruct``, and the reverse."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.orchestrator.catalog import Catalog, registered_alias
from p2pedge.orchestrator.router import NoPlacement
from p2pedge.testing import build_tiny_model

CATALOG_MODEL = "smollm2-135m-instruct"  # what the shipped catalog names


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("short") / "tiny", seed=5)


async def test_ask_runs_a_model_registered_under_a_short_name(
    tiny: Path, config: Callable[..., NodeConfig]
) -> None:
    cfg = config("short", local_only=True, model_dirs=(("smollm2", tiny),))
    async with Node(cfg) as node:
        answer = await node.ask("Translate 'good morning' into French.", max_tokens=4)
        assert answer.decision.category == "translate"
        assert answer.decision.where == "local"
        assert answer.decision.model == "smollm2"  # the name it was registered under
        assert "registered here as smollm2" in answer.decision.reason
        assert answer.completion_tokens > 0
        # and again, now that the model is warm under the registered name
        again = await node.ask("Translate 'good night' into French.", max_tokens=4)
        assert again.decision.model == "smollm2" and again.was_warm


async def test_ask_runs_a_model_registered_under_a_longer_name(
    tiny: Path, config: Callable[..., NodeConfig]
) -> None:
    cfg = config("long", local_only=True, model_dirs=((f"{CATALOG_MODEL}-q4", tiny),))
    async with Node(cfg) as node:
        node.models.orchestrator.catalog = Catalog.from_toml(  # type: ignore[union-attr]
            '[[specialist]]\nname = "chat"\ncategory = "chat"\nmodel = "smollm2"\n'
        )
        answer = await node.ask("hello", "chat", max_tokens=3)
        assert answer.decision.model == f"{CATALOG_MODEL}-q4"
        assert answer.decision.where == "local"


async def test_two_candidates_are_not_guessed_between(
    tiny: Path, config: Callable[..., NodeConfig]
) -> None:
    dirs = (("smollm2", tiny), ("smollm2-135m-instruct-q8", tiny))
    cfg = config("two", local_only=True, model_dirs=dirs)
    async with Node(cfg) as node:
        with pytest.raises(NoPlacement, match=CATALOG_MODEL):
            await node.ask("Translate 'yes' into French.", "translate", max_tokens=3)


def test_alias_rule() -> None:
    names = ["smollm2", "other-model@2"]
    assert registered_alias(CATALOG_MODEL, names) == "smollm2"
    assert registered_alias("other", names) == "other-model@2"
    assert registered_alias("smollm", names) is None  # a prefix, not at a '-' boundary
    assert registered_alias(f"{CATALOG_MODEL}@3", names) is None  # a pinned version
    assert registered_alias("smollm2-135m", ["smollm2-135m-a", "smollm2-135m-b"]) is None
