"""``Swarm(n, seed=...)``: n real Nodes in one process, wired reproducibly for a seed.

Each node runs in its own task so any one can be killed. Two ways to join:

- ``seeds=0`` (the default): routing tables are pre-filled from a seeded random choice of
  peers, a harness shortcut that skips Kademlia's bootstrap. The swarm has converged when
  every node is up and wired: any card is then resolvable, from its owner directly.
- ``seeds=k``: a real bootstrap. The first k nodes are seeds (each dials the seeds before
  it); every other node is given only the seeds' addresses, dials them, looks its own id
  up to fill its routing table and announces its card, as a deployed node does.
  ``converge_s`` is when every node has announced once.
 Replicating the first cards to their closest peers costs a dial
per replica and continues in the background unless ``wait_for_replication`` is set;
``replicated`` is set when it is done and ``replicated_s`` says how long it took.
``replicate_on_start=False`` leaves replication to each node's announce interval.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from p2pedge.node.config import NodeConfig, Tuning
from p2pedge.node.identity import Identity
from p2pedge.node.node import Node

TUNING_FIELDS = frozenset(f.name for f in fields(Tuning))  # Swarm(**config) may name them


@dataclass
class _Slot:
    node: Node
    stop: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)


class Swarm:
    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        fanout: int = 20,
        announce_interval: float = 60.0,
        wait_for_replication: bool = False,
        replicate_on_start: bool = True,
        seeds: int = 0,
        root: Path | None = None,
        **config: Any,
    ) -> None:
        if n < 1:
            raise ValueError("a swarm needs at least one node")
        self.n = n
        self.seeds = seeds
        self.rng = random.Random(seed)
        self.fanout = fanout
        self.announce_interval = announce_interval
        self.config = config
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="simnet-")) if root is None else root
        self._slots: list[_Slot] = []
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None
        self.started_at = 0.0
        self.converge_s = 0.0
        self.replicated_s = 0.0
        self.replicated = trio.Event()
        self.wait_for_replication = wait_for_replication
        self.replicate_on_start = replicate_on_start

    @property
    def nodes(self) -> list[Node]:
        """Live nodes, in start order (killed ones are left out)."""
        return [slot.node for slot in self._slots if not slot.stop.is_set()]

    async def __aenter__(self) -> Swarm:
        self.started_at = time.perf_counter()
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        try:
            if self.seeds:
                await self._join_from_seeds()
                return self
            for _ in range(self.n):
                await self._start_node()
            await self._wire_all()
            for node in self.nodes:
                await node.announce(replicate=False)
            self.converge_s = time.perf_counter() - self.started_at
            if not self.replicate_on_start:
                for node in self.nodes:
                    node.announcer.start_announcing(node.nursery, now=False)
            elif self.wait_for_replication:
                await self._replicate()
            else:
                self._nursery.start_soon(self._replicate)
        except BaseException as exc:
            await self._close(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def _join_from_seeds(self, concurrency: int = 8) -> None:
        """Start the seeds one by one, then every other node at once (a few at a time, as
        independent machines would, bounded so one event loop is not swamped), and wait
        for every node's first announce."""
        for _ in range(min(self.seeds, self.n)):
            await self._start_node()
        limiter = trio.CapacityLimiter(concurrency)

        async def start() -> None:
            async with limiter:
                await self._start_node()

        async with trio.open_nursery() as nursery:
            for _ in range(self.n - min(self.seeds, self.n)):
                nursery.start_soon(start)
        async with trio.open_nursery() as nursery:
            for node in self.nodes:
                nursery.start_soon(node.announced)
        self.converge_s = self.replicated_s = time.perf_counter() - self.started_at
        self.replicated.set()

    async def _replicate(self) -> None:
        await self._announce(self.nodes)
        self.replicated_s = time.perf_counter() - self.started_at
        self.replicated.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self._close(exc_type, exc, tb)
        return None

    async def _close(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for slot in self._slots:
            slot.stop.set()
        try:
            await self._nursery_cm.__aexit__(exc_type, exc, tb)
        finally:
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)

    async def _start_node(self) -> _Slot:
        assert self._nursery is not None
        index = len(self._slots)
        settings = dict(self.config)
        tuning = {k: settings.pop(k) for k in list(settings) if k in TUNING_FIELDS}
        real = bool(self.seeds)  # a real bootstrap: look our id up, announce on start
        tuning.update(
            announce_interval=self.announce_interval, self_lookup=real, announce_on_start=real
        )
        if real:
            seeds = [slot.node for slot in self._slots[: min(index, self.seeds)]]
            settings["bootstrap"] = tuple(node.addrs[0] for node in seeds)
        config = NodeConfig(
            data_dir=self.root / f"node{index}",
            listen=("/ip4/127.0.0.1/tcp/0",),
            tuning=Tuning(**tuning),
            **settings,
        )
        identity = Identity.from_seed(self.rng.randbytes(32))
        slot = _Slot(Node(config, identity=identity))
        self._slots.append(slot)
        await self._nursery.start(self._run_node, slot)
        return slot

    async def _run_node(self, slot: _Slot, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with slot.node:
                task_status.started()
                await slot.stop.wait()
        finally:
            slot.done.set()

    async def _wire(self, node: Node, others: list[Node]) -> None:
        chosen = others if len(others) <= self.fanout else self.rng.sample(others, self.fanout)
        for other in chosen:
            await node.network.introduce(other.peer_id, other.addrs)
            await other.network.introduce(node.peer_id, node.addrs)

    async def _wire_all(self) -> None:
        live = self.nodes
        for index, node in enumerate(live):
            await self._wire(node, live[:index])

    async def _announce(self, nodes: list[Node], concurrency: int = 8) -> None:
        """First announce of each node, bounded so one event loop is not swamped."""
        limiter = trio.CapacityLimiter(concurrency)

        async def one(node: Node) -> None:
            async with limiter:
                await node.announce()
            # a node stopped meanwhile (killed, or the swarm is closing while it replicates
            # in the background) has no nursery left to announce from
            if any(slot.node is node and not slot.stop.is_set() for slot in self._slots):
                node.announcer.start_announcing(node.nursery, now=False)

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(one, node)

    async def add(self) -> Node:
        """Start one more node, wire it in, and announce it."""
        slot = await self._start_node()
        if self.seeds:  # it bootstraps from the seeds and announces on its own
            await slot.node.announced()
            return slot.node
        await self._wire(slot.node, [n for n in self.nodes if n is not slot.node])
        await self._announce([slot.node])
        return slot.node

    async def kill(self, index: int) -> None:
        """Stop node ``index`` (start order) abruptly: its host closes, peers see EOF."""
        slot = self._slots[index]
        slot.stop.set()
        await slot.done.wait()
