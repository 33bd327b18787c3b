"""The node's card: what it declares (models, served blocks, extras), signed, and the
announce loop that stores it on the DHT.

The announcer knows the node only through callbacks (its addresses, its load, the
directory to publish to), so it can be built and tested without a network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import trio

from p2pedge import __version__
from p2pedge.dht.directory import Directory
from p2pedge.errors import LocalProtocolError
from p2pedge.node.config import Tuning
from p2pedge.node.hardware import Hardware, ram_available
from p2pedge.node.identity import Identity
from p2pedge.records.card import CachedModel, CapabilityCard, ServedLayers, sign_card
from p2pedge.records.keys import model_keys


class Announcer:
    """Builds and signs our :class:`CapabilityCard`; :meth:`announce` publishes it."""

    def __init__(
        self,
        identity: Identity,
        tuning: Tuning,
        *,
        clock: Callable[[], float],
        addrs: Callable[[], Sequence[str]],
        load: Callable[[], float],
        directory: Callable[[], Directory | None],
    ) -> None:
        self.identity = identity
        self.tuning = tuning
        self.clock = clock
        self._addrs = addrs
        self._load = load
        self._directory = directory
        self._hardware: Hardware | None = None
        self._gflops = 0.0
        self._models: tuple[CachedModel, ...] = ()
        self._layers: tuple[ServedLayers, ...] = ()
        self._extra: dict[str, Any] = {}
        self._card: CapabilityCard | None = None
        self._record: bytes | None = None
        self._announce_now = trio.Event()
        self._started = 0
        self._done = 0
        self._finished = trio.Event()

    def start(self, hardware: Hardware, gflops: float) -> None:
        """Sign the first card; until then :attr:`card` raises."""
        self._hardware = hardware
        self._gflops = gflops
        self.refresh()

    @property
    def card(self) -> CapabilityCard:
        if self._card is None:
            raise LocalProtocolError("node is not running; use `async with Node(...)`")
        return self._card

    @property
    def record(self) -> bytes:
        """The signed card, as stored on the DHT."""
        if self._record is None:
            raise LocalProtocolError("node is not running; use `async with Node(...)`")
        return self._record

    def refresh(self) -> None:
        """Sign a card of what holds now (load and free memory read afresh)."""
        if self._hardware is None:
            raise LocalProtocolError("node is not running; use `async with Node(...)`")
        hw = self._hardware
        now = self.clock()
        self._card = CapabilityCard(
            peer_id=self.identity.peer_id,
            public_key=self.identity.public_key,
            addrs=tuple(self._addrs()),
            software_version=__version__,
            os=hw.os,
            arch=hw.arch,
            cpu_cores=hw.cpu_cores,
            ram_total=hw.ram_total,
            ram_available=ram_available(),
            accelerators=hw.accelerators,
            execution_providers=hw.execution_providers,
            compute_gflops=self._gflops,
            models=self._models,
            layers_served=self._layers,
            load=self._load(),
            issued_at=now,
            expires_at=now + self.tuning.card_ttl,
            extra=dict(self._extra),
        )
        self._record = sign_card(self._card, self.identity.private_key)

    def set_models(self, models: Sequence[CachedModel]) -> None:
        """Declare the models this node has cached; announced at once."""
        self._models = tuple(models)
        self._changed()

    def set_layers_served(self, layers: Sequence[ServedLayers]) -> None:
        self._layers = tuple(layers)
        self._changed()

    def set_card_extra(self, key: str, value: Any) -> None:
        self._extra[key] = value
        self._changed()

    def addresses_changed(self) -> None:
        """Our addresses changed (e.g. a relay lent or took back a slot): re-sign, announce."""
        self._changed()

    def _changed(self) -> None:
        """Our card reads the change at once; peers see it at the next announce (now)."""
        if self._card is not None:
            self.refresh()
        self._announce_now.set()

    async def announce(self, *, replicate: bool = True) -> None:
        """Sign a fresh card, store it on the DHT, and provide each model's key.

        ``replicate=False`` only keeps the card in our own store, where peers that know
        our address can ask for it; nothing is dialed.
        """
        self._started += 1
        number = self._started
        try:
            self.refresh()
            directory = self._directory()
            if directory is not None:
                await directory.put_card(self.record, self.identity.peer_id, replicate=replicate)
                if replicate:  # served blocks are in the card (layers_served), not here
                    for key in model_keys(m.id for m in self._models):
                        await directory.provide(key)
        finally:
            self._done = max(self._done, number)
            finished, self._finished = self._finished, trio.Event()
            finished.set()

    async def announced(self, count: int = 1) -> None:
        """Wait until ``count`` announces have completed since the node started."""
        while self._done < count:
            await self._finished.wait()

    async def next_announce(self) -> None:
        """Wait for an announce that starts after this call (e.g. after set_models)."""
        await self.announced(self._started + 1)

    def start_announcing(self, nursery: trio.Nursery, *, now: bool = True) -> None:
        """Run the periodic announce loop in ``nursery``; ``now=False`` waits one interval
        first, for a caller that has just announced."""
        nursery.start_soon(self._loop, now)

    async def _loop(self, now: bool) -> None:
        if not now:
            await self._wait_for_reannounce()
        while True:
            await self.announce()
            await self._wait_for_reannounce()

    async def _wait_for_reannounce(self) -> None:
        with trio.move_on_after(self.tuning.announce_interval):
            await self._announce_now.wait()
        self._announce_now = trio.Event()
