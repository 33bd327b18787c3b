"""The node's parts work from what they are given, without a Node or a network."""

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from p2pedge.errors import LocalProtocolError
from p2pedge.node.announcer import Announcer
from p2pedge.node.config import NodeConfig, Tuning
from p2pedge.node.hardware import Hardware
from p2pedge.node.identity import Identity
from p2pedge.records.card import CachedModel, ServedLayers, verify_card
from p2pedge.records.keys import card_key, model_key, model_keys

HARDWARE = Hardware("linux", "x86_64", 2, 1 << 30, (), ("CPUExecutionProvider",))


class RecordingDirectory:
    """Takes what an announce publishes (a real Directory needs a running DHT)."""

    def __init__(self) -> None:
        self.cards: list[bytes] = []
        self.provided: list[str] = []

    async def put_card(self, record: bytes, peer_id: str, *, replicate: bool = True) -> int:
        self.cards.append(record)
        return 1

    async def provide(self, key: str) -> int:
        self.provided.append(key)
        return 1


def announcer(directory: object = None, addrs: Sequence[str] = ()) -> Announcer:
    return Announcer(
        Identity.from_seed(b"\x01" * 32),
        Tuning(announce_interval=30.0, card_ttl_factor=2.0),
        clock=lambda: 1000.0,
        addrs=lambda: list(addrs),
        load=lambda: 0.25,
        directory=lambda: directory,  # type: ignore[arg-type,return-value]
    )


async def test_the_announcer_signs_what_it_is_told_and_publishes_it() -> None:
    directory = RecordingDirectory()
    part = announcer(directory, ["/ip4/127.0.0.1/tcp/1/p2p/x"])
    part.set_models([CachedModel("tiny@1", "ab" * 32)])  # before start: kept, no card yet
    with pytest.raises(LocalProtocolError):
        part.card  # noqa: B018
    part.start(HARDWARE, 12.5)
    card = part.card
    assert card.models == (CachedModel("tiny@1", "ab" * 32),)
    assert card.load == 0.25 and card.compute_gflops == 12.5
    assert card.expires_at - card.issued_at == 60.0  # announce_interval x card_ttl_factor
    part.set_layers_served([ServedLayers("tiny", 0, 2)])
    assert part.card.layers_served == (ServedLayers("tiny", 0, 2),)  # at once, not next time
    await part.announce()
    await part.announced(1)
    assert verify_card(directory.cards[-1], 1000.0, card_key(card.peer_id)) == part.card
    assert directory.provided == model_keys(["tiny@1"]) == ["model/tiny", "model/tiny@1"]


async def test_a_change_announces_at_once_and_next_announce_waits_for_it() -> None:
    directory = RecordingDirectory()
    part = announcer(directory)
    part.start(HARDWARE, 0.0)
    async with trio.open_nursery() as nursery:
        part.start_announcing(nursery)
        await part.announced(1)
        with trio.fail_after(5):  # far less than the 30 s interval: the change woke it
            waiting = part.next_announce()
            part.set_card_extra("lane", "127.0.0.1:4002")
            await waiting
        nursery.cancel_scope.cancel()
    assert len(directory.cards) == 2
    assert part.card.extra == {"lane": "127.0.0.1:4002"}


def test_long_model_names_are_hashed_into_short_keys() -> None:
    name = "a-model-with-a-very-long-name-that-would-break-lookups"
    assert model_key("smollm2") == "model/smollm2"
    assert len(model_key(name)) < 48 and model_key(name) != model_key(name + "x")
    assert model_keys([f"{name}@1"]) == sorted({model_key(name), model_key(f"{name}@1")})


def test_tuning_is_checked_and_kept_apart_from_the_user_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="announce_interval"):
        Tuning(announce_interval=0)
    with pytest.raises(TypeError):
        NodeConfig(data_dir=tmp_path, announce_interval=5.0)  # type: ignore[call-arg]
    config = NodeConfig(data_dir=tmp_path, tuning=Tuning(shard_ring=False))
    assert config.tuning.card_ttl == 180.0 and not config.tuning.shard_ring
