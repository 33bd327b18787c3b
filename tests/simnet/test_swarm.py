import pytest
import trio

from p2pedge.records.card import CachedModel
from simnet import Swarm

pytestmark = pytest.mark.slow


async def test_thirty_nodes_all_find_a_model_announced_by_one() -> None:
    # Provider records are what this test is about; cards replicate on the announce
    # interval and are served by their owners meanwhile.
    async with Swarm(30, seed=7, measure_compute=False, replicate_on_start=False) as swarm:
        owner = swarm.nodes[11]
        owner.announcer.set_models([CachedModel("needle@1", "aa" * 32)])
        await owner.announce()
        found: dict[str, list[str]] = {}

        async def look(index: int) -> None:
            node = swarm.nodes[index]
            found[node.peer_id] = [c.peer_id for c in await node.find_peers("needle")]

        limit = trio.CapacityLimiter(6)

        async def bounded(index: int) -> None:
            async with limit:
                await look(index)

        async with trio.open_nursery() as nursery:
            for index in range(30):
                nursery.start_soon(bounded, index)
        assert len(found) == 30
        assert all(peers == [owner.peer_id] for peers in found.values()), found


async def test_seed_fixes_identities_and_kill_and_add_work() -> None:
    async with Swarm(4, seed=3) as first:
        ids = [n.peer_id for n in first.nodes]
    async with Swarm(4, seed=3) as swarm:
        assert [n.peer_id for n in swarm.nodes] == ids
        victim = swarm.nodes[1]
        await swarm.kill(1)
        assert victim not in swarm.nodes and len(swarm.nodes) == 3
        newcomer = await swarm.add()
        card = await swarm.nodes[0].card_of(newcomer.peer_id, refresh=True)
        assert card is not None and card.peer_id == newcomer.peer_id


async def test_a_real_bootstrap_from_seeds_makes_every_card_findable() -> None:
    """``seeds=2``: nodes get only the seeds' addresses (no pre-filled tables), yet every
    node's card is found from every other node with caches cleared."""
    async with Swarm(6, seed=5, measure_compute=False, seeds=2) as swarm:
        nodes = swarm.nodes
        assert nodes[0].config.bootstrap == () and len(nodes[5].config.bootstrap) == 2
        assert all(n.config.tuning.self_lookup for n in nodes)
        for a in nodes:
            for b in nodes:
                if a is b:
                    continue
                assert a.directory is not None
                a.directory.forget(b.peer_id)
                card = await a.card_of(b.peer_id, refresh=True)
                assert card is not None and card.peer_id == b.peer_id
        newcomer = await swarm.add()  # joins the same way
        assert len(newcomer.config.bootstrap) == 2
        card = await nodes[3].card_of(newcomer.peer_id, refresh=True)
        assert card is not None and card.peer_id == newcomer.peer_id
