"""The node's own card reads what it serves at once (the CLI's ``serving`` event reads it
right after start, before any announce)."""

from collections.abc import Callable

from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node
from p2pedge.records.card import ServedLayers


async def test_served_layers_are_on_the_card_before_the_next_announce(
    config: Callable[..., NodeConfig],
) -> None:
    async with Node(config("a", local_only=True)) as node:
        assert node.card.layers_served == ()
        node.announcer.set_layers_served([ServedLayers("smollm2", 0, 10)])
        assert [(s.model, s.start, s.end) for s in node.card.layers_served] == [("smollm2", 0, 10)]
        node.announcer.set_card_extra("lane", "127.0.0.1:4002")
        assert node.card.extra["lane"] == "127.0.0.1:4002"
