"""Signed outputs over real libp2p nodes on 127.0.0.1: every shard server signs each
output with its libp2p key over the session, the positions, the input history and the
output as sent; a client checks the signature on receipt, and the evidence of a server
caught computing wrong proves to a third party, with the server's public key alone, what
that server sent for which inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from p2pedge.errors import RemoteProtocolError
from p2pedge.ids import LayerRange
from p2pedge.protocols.pipeline.attest import (
    InputChain,
    chain_of,
    chain_seed,
    check_attested,
    output_digest,
)
from p2pedge.protocols.pipeline.connection import ShardConnection
from p2pedge.protocols.pipeline.serving import LANE_OPEN_TIMEOUT
from p2pedge.records.peer_ids import ed25519_from_peer_id
from p2pedge.testing.hostile import CorruptingShard, Corruption
from simnet.swarm import Swarm
from tests.node.test_sharded_push import MODEL, PROMPT
from tests.node.test_verified import (
    RANGES,
    checked,
    config,
    honest,
    open_on,
    peers,
    route_of,
    server_of,
    start,
)
from tests.node.test_verified import model_dir as model_dir  # the module's tiny model


def test_the_input_chain_follows_rewinds_and_outputs_bind_every_field() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 8, 4)).astype(np.float32)
    seed = chain_seed("m", LayerRange(2, 4), 7)
    assert seed != chain_seed("m", LayerRange(2, 4), 8) != chain_seed("n", LayerRange(2, 4), 7)
    chain = InputChain(seed)
    chain.extend(0, x[:, :5])
    other = x.copy()
    other[0, 3:] += 1.0
    chain.extend(3, other[:, 3:6])  # rewound to 3, as the server's cache is
    assert chain.length == 6
    assert chain.at(6) == chain_of(seed, other[0, :6]) != chain_of(seed, x[0, :6])
    assert chain.at(3) == chain_of(seed, x[0, :3])
    y = rng.standard_normal((1, 3)).astype(np.float32)
    ids = np.array([[4, 1, 9]], dtype=np.int64)
    base = output_digest(y, ids, 16, 4)
    assert base != output_digest(y, ids, 16, 1) != output_digest(y, ids, 17, 4)
    assert base != output_digest(y, ids[:, ::-1].copy(), 16, 4)
    assert output_digest(y) != output_digest(y.astype(np.float16))


@pytest.mark.parametrize("hop", [1, 4], ids=["middle", "last"])
async def test_evidence_of_a_corrupting_server_proves_what_it_signed(
    model_dir: Path, tmp_path: Path, hop: int
) -> None:
    async with Swarm(1 + len(RANGES), seed=31, measure_compute=False) as swarm:
        servers = await start(swarm, model_dir, tmp_path)
        client, ps = swarm.nodes[0], peers(swarm)
        expected = await honest(client, ps, 12)
        CorruptingShard(server_of(swarm, servers, ps[hop]), Corruption(scale=0.5))
        async with await open_on(client, route_of(ps, 1, 4), checked()) as session:
            assert await session.generate(PROMPT, 12) == expected
            assert session.audits is not None
            (evidence,) = session.audits.evidence
        assert evidence.peer == ps[hop]
        record = evidence.attested
        assert record is not None and len(evidence.signature) == 64
        assert record.start <= evidence.position < record.end
        assert evidence.proof() is None  # the server's own key verifies what it sent
        key = ed25519_from_peer_id(ps[hop])
        assert check_attested(record, key) is None
        # a third party is not fooled by an edited output, edited inputs or another key
        y = record.y.copy()
        y.flat[0] += 1.0
        assert "signature" in (check_attested(dataclasses.replace(record, y=y), key) or "")
        inputs = record.inputs.copy()
        inputs[0] += 1.0  # hidden states from the hop before
        changed = check_attested(dataclasses.replace(record, inputs=inputs), key)
        assert "inputs" in (changed or "")
        assert check_attested(record, ed25519_from_peer_id(ps[0])) is not None


async def test_a_reply_with_a_bad_signature_fails_that_hop(model_dir: Path, tmp_path: Path) -> None:
    async with Swarm(1 + len(RANGES), seed=32, measure_compute=False) as swarm:
        servers = await start(swarm, model_dir, tmp_path)
        client, ps = swarm.nodes[0], peers(swarm)
        expected = await honest(client, ps, 8)
        faulty = server_of(swarm, servers, ps[1])
        real = faulty.signer
        assert real is not None  # a Node's server signs

        def opener(peer: str, protocol: str):  # type: ignore[no-untyped-def]
            return client.lanes.open(peer, protocol, timeout=LANE_OPEN_TIMEOUT)

        x = np.zeros((1, 2, faulty.catalog[(MODEL, RANGES[1])].hidden), dtype=np.float32)
        conn = await ShardConnection.open(opener, ps[1], MODEL, RANGES[1], 32, timeout=10)
        try:
            assert (await conn.step(x, 0)).shape[:2] == (1, 2)  # signed and checked
            faulty.signer = None  # a server that stops signing mid-session
            with pytest.raises(RemoteProtocolError, match="stopped signing"):
                await conn.step(x, 2)
        finally:
            await conn.abort()

        # a signature by another key: that hop fails, the session moves to a replica
        faulty.signer = servers[0].signer
        async with await open_on(client, route_of(ps, 1, 4), config()) as session:
            assert await session.generate(PROMPT, 8) == expected
            assert session.recoveries == 1 and ps[1] not in {h.peer_id for h in session.route}
        conn = await ShardConnection.open(opener, ps[1], MODEL, RANGES[1], 32, timeout=10)
        try:
            with pytest.raises(RemoteProtocolError, match="signature does not match"):
                await conn.step(x, 0)
        finally:
            await conn.abort()
        faulty.signer = real
