"""Verified computation over real libp2p nodes on 127.0.0.1 (one process): a client that
spot-checks its shard servers on replicas catches a server returning wrong activations or
tokens, bans it, replays from the last verified position onto an honest replica, and
delivers exactly the honest run's tokens; NaN is blamed on the hop that produced it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pedge.errors import LocalProtocolError, RemoteProtocolError, ShardFailed
from p2pedge.ids import LayerRange
from p2pedge.models.convert.onnx_graph import build_shard
from p2pedge.node.node import Node
from p2pedge.planning.routes import Hop
from p2pedge.planning.verification import VerifyPolicy, first_mismatch, tolerance_for
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.chain import check_output
from p2pedge.protocols.pipeline.client import ClientConfig, ShardedSession
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.protocols.pipeline.sampling import Sampler, SamplingSpec, greedy
from p2pedge.protocols.pipeline.serving import open_sharded_session
from p2pedge.protocols.pipeline.verify import token_agrees
from p2pedge.runtime.shard_session import ShardModel
from p2pedge.testing.hostile import CorruptingShard, Corruption, open_route
from p2pedge.testing.tiny import build_tiny_model, tiny_weights
from simnet.swarm import Swarm
from tests.node.test_sharded_push import MODEL, PROMPT, serve_thirds

# a middle range served three times (one corrupts, one checks, one takes over) and a
# last range twice
RANGES = [
    LayerRange(0, 2),
    LayerRange(2, 4),
    LayerRange(2, 4),
    LayerRange(2, 4),
    LayerRange(4, 6),
    LayerRange(4, 6),
]
MODES: dict[str, dict[str, Any]] = {"relay": {"push": False}, "push": {"ring": False}, "ring": {}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / MODEL, seed=5, n_layers=6)


def config(**kw: Any) -> ClientConfig:
    base: dict[str, Any] = {
        "max_length": 128,
        "chunk": 4,
        "step_timeout": 10,
        "logits_top_k": 1,
        "slowdown": None,
    }
    return ClientConfig(**base | kw)


def checked(fraction: float = 0.1, seed: int = 1, **kw: Any) -> ClientConfig:
    return config(verify=VerifyPolicy(fraction=fraction, seed=seed), **kw)


async def open_on(
    node: Node,
    route: Sequence[Hop],
    cfg: ClientConfig,
    bans: dict[str, tuple[float, int]] | None = None,
) -> ShardedSession:
    return await open_route(node, MODEL, 6, route, cfg, bans)


def server_of(swarm: Swarm, servers: list[PipelineServer], peer: str) -> PipelineServer:
    return servers[[n.peer_id for n in swarm.nodes[1:]].index(peer)]


def peers(swarm: Swarm) -> list[str]:
    return [n.peer_id for n in swarm.nodes[1:]]


async def honest(client: Node, ps: list[str], n: int, sampler: Sampler = greedy) -> list[int]:
    """The tokens of an unchecked run on honest servers."""
    async with await open_on(client, route_of(ps, middle=3, last=5), config()) as session:
        return await session.generate(PROMPT, n, sampler=sampler)


def route_of(ps: list[str], middle: int = 1, last: int = 4) -> list[Hop]:
    """Servers are numbered as in RANGES: 0 first, 1-3 middle, 4-5 last."""
    return [Hop(ps[0], RANGES[0]), Hop(ps[middle], RANGES[middle]), Hop(ps[last], RANGES[last])]


async def start(swarm: Swarm, model_dir: Path, tmp_path: Path) -> list[PipelineServer]:
    return await serve_thirds(swarm, model_dir, tmp_path, RANGES)


def kv_in_use(servers: list[PipelineServer]) -> int:
    return sum(s.budget.used for s in servers)


# --- pure parts ------------------------------------------------------------------------


def test_tolerance_fits_the_arithmetic() -> None:
    assert (
        tolerance_for("float32")
        < tolerance_for("float16")
        < tolerance_for("float32", quantized=True)
    )
    assert VerifyPolicy(rtol=0.5).tolerance("float32") == 0.5
    cases: list[dict[str, Any]] = [
        {"fraction": 1.5},
        {"fraction": -0.1},
        {"rtol": float("nan")},
        {"atol": -1.0},
    ]
    for bad in cases:
        with pytest.raises(ValueError):
            VerifyPolicy(**bad)


def test_first_mismatch_finds_the_first_bad_position_nan_included() -> None:
    ref = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert first_mismatch(ref.copy(), ref, 0.0, 1e-3) is None
    near = ref + 1e-4 * np.abs(ref).max(axis=1, keepdims=True)
    assert first_mismatch(near, ref, 0.0, 1e-3) is None  # float noise passes
    far = ref.copy()
    far[2, 1] += 1.0
    far[1, 3] += 0.1
    assert first_mismatch(far, ref, 0.0, 1e-3) == 1
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert first_mismatch(nan, ref, 1.0, 1.0) == 0


def test_token_agrees_allows_only_near_ties() -> None:
    row = np.array([0.0, 5.0, 5.0 - 1e-5, 1.0], dtype=np.float32)
    assert token_agrees(1, row, greedy, 3, 0.0, 1e-3)
    assert token_agrees(2, row, greedy, 3, 0.0, 1e-3)  # a tie float noise could break
    assert not token_agrees(3, row, greedy, 3, 0.0, 1e-3)
    assert not token_agrees(99, row, greedy, 3, 0.0, 1e-3)
    sampled = Sampler(SamplingSpec(temperature=1.0, seed=7))
    pick = sampled(row[None], 3)
    assert token_agrees(pick, row, sampled, 3, 0.0, 1e-3)
    assert not token_agrees((pick + 1) % 4, row, sampled, 3, 0.0, 1e-3)


def test_every_hop_refuses_non_finite_values_where_they_first_show() -> None:
    w = tiny_weights(seed=2, n_layers=4)
    middle = ShardModel(build_shard(w, LayerRange(1, 3)).SerializeToString())
    session = middle.new_session(16)
    hidden = middle.info.hidden
    ok = session.step(np.ones((1, 2, hidden), dtype=np.float32), 0)
    assert np.isfinite(ok).all()
    nan = np.ones((1, 1, hidden), dtype=np.float32)
    nan[0, 0, 3] = np.nan
    with pytest.raises(LocalProtocolError, match="non-finite"):
        session.step(nan, 2)  # what it receives
    # what it would send: a last shard whose final norm went bad computes NaN logits
    broken = dataclasses.replace(w, output_norm=np.full_like(w.output_norm, np.nan))
    last = ShardModel(build_shard(broken, LayerRange(3, 4)).SerializeToString()).new_session(8)
    with pytest.raises(ShardFailed, match="non-finite"):
        last.step(np.ones((1, 1, hidden), dtype=np.float32), 0)
    # on the wire, a step whose input is not finite is refused at decode (the session
    # is never touched), and the hop before is the one blamed
    step = codec.to_map(codec.Step(1, 1, 0, nan))
    with pytest.raises(RemoteProtocolError, match="not finite"):
        codec.from_map(step)
    assert check_output(nan, 1, False) == "non-finite hidden states for 1 positions"
    assert check_output(ok[:, :1], 1, False) is None


# --- over real nodes ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_server_corrupting_every_step_is_caught_banned_and_avoided(
    model_dir: Path, tmp_path: Path, mode: str
) -> None:
    async with Swarm(1 + len(RANGES), seed=21, measure_compute=False) as swarm:
        servers = await start(swarm, model_dir, tmp_path)
        client, ps = swarm.nodes[0], peers(swarm)
        expected = await honest(client, ps, 24)
        bad = CorruptingShard(server_of(swarm, servers, ps[1]), Corruption(scale=0.5))
        # the corruption has teeth: unchecked, it changes the text
        async with await open_on(client, route_of(ps), config(**MODES[mode])) as blind:
            assert await blind.generate(PROMPT, 24) != expected
        bad.corrupted.clear()
        bans: dict[str, tuple[float, int]] = {}
        session = await open_on(client, route_of(ps), checked(**MODES[mode]), bans)
        async with session:
            tokens = await session.generate(PROMPT, 24)
            assert session.detections == 1 and session.recoveries == 0
            assert ps[1] in session.banned() and ps[1] not in {h.peer_id for h in session.route}
            assert session.route[1].peer_id in ps[2:4]
            (evidence,) = session.audits.evidence if session.audits else []
            assert evidence.peer == ps[1] and evidence.auditor in ps[2:4]
            assert (
                evidence.layers == RANGES[1] and evidence.inputs.shape[0] == evidence.position + 1
            )
            assert not np.allclose(evidence.served, evidence.recomputed, atol=1e-3)
            # every corrupted step before the check that caught it, none after the ban
            assert 1 <= bad.corrupted_before(evidence.found_at) == len(bad.corrupted)
        assert kv_in_use(servers) == 0  # hops' and auditors' sessions all freed
        # the ban outlives the session: the next one (sharing the node's bans) avoids it
        after = await open_sharded_session(client, MODEL, config=checked(), bans=bans)
        async with after:
            assert ps[1] not in {h.peer_id for h in after.route}  # route choice skips it
            assert await after.generate(PROMPT, 8) == expected[:8]
            assert after.detections == 0
    assert tokens == expected


async def test_a_server_corrupting_one_step_in_50_is_caught(
    model_dir: Path, tmp_path: Path
) -> None:
    async with Swarm(1 + len(RANGES), seed=22, measure_compute=False) as swarm:
        servers = await start(swarm, model_dir, tmp_path)
        client, ps = swarm.nodes[0], peers(swarm)
        expected = await honest(client, ps, 64)
        bad = CorruptingShard(server_of(swarm, servers, ps[1]), Corruption(every=50, scale=0.5))
        async with await open_on(client, route_of(ps), checked(fraction=1 / 20)) as session:
            tokens = await session.generate(PROMPT, 64)
            assert session.detections == 1
            assert session.audits is not None
            (evidence,) = session.audits.evidence
            assert evidence.peer == ps[1]
            assert bad.corrupted_before(evidence.found_at) == len(bad.corrupted) == 1
            assert evidence.position >= len(PROMPT)  # a decode step, the 50th the server ran
    assert tokens == expected


async def test_a_server_corrupting_only_some_sessions_is_caught_in_those(
    model_dir: Path, tmp_path: Path
) -> None:
    async with Swarm(1 + len(RANGES), seed=23, measure_compute=False) as swarm:
        servers = await start(swarm, model_dir, tmp_path)
        client, ps = swarm.nodes[0], peers(swarm)
        expected = await honest(client, ps, 16)
        # honest in its first session (earning trust), wrong in its second
        bad = CorruptingShard(
            server_of(swarm, servers, ps[1]), Corruption(sessions=frozenset({1}), scale=0.5)
        )
        bans: dict[str, tuple[float, int]] = {}
        results = []
        for _ in range(3):
            async with await open_on(client, route_of(ps), checked(), bans) as session:
                results.append((await session.generate(PROMPT, 16), session.detections))
        # the third is put on the same route again (no route choice): honest there, unflagged
        assert results == [(expected, 0), (expected, 1), (expected, 0)]
        assert len(bad.corrupted) >= 1 and ps[1] in bans


async def test_a_last_server_naming_wrong_tokens_is_caught(model_dir: Path, tmp_path: Path) -> None:
    async with Swarm(1 + len(RANGES), seed=24, measure_compute=False) as swarm:
        servers = await start(swarm, model_dir, tmp_path)
        client, ps = swarm.nodes[0], peers(swarm)
        expected = await honest(client, ps, 24)
        CorruptingShard(server_of(swarm, servers, ps[4]), Corruption(every=3, after=6))
        async with await open_on(client, route_of(ps), checked(fraction=0.2)) as session:
            tokens = await session.generate(PROMPT, 24)
            assert session.detections == 1 and session.route[2].peer_id == ps[5]
            assert session.audits is not None
            (evidence,) = session.audits.evidence
            assert evidence.peer == ps[4] and evidence.auditor == ps[5]
            assert "token" in evidence.detail
    assert tokens == expected


async def test_a_lying_auditor_is_overruled_by_a_referee(model_dir: Path, tmp_path: Path) -> None:
    async with Swarm(1 + len(RANGES), seed=27, measure_compute=False) as swarm:
        servers = await start(swarm, model_dir, tmp_path)
        client, ps = swarm.nodes[0], peers(swarm)
        expected = await honest(client, ps, 16)
        # the middle replica ps[2] computes wrong in every session: as an auditor it would
        # accuse the honest ps[1]; the referee ps[3] sides with ps[1]
        CorruptingShard(server_of(swarm, servers, ps[2]), Corruption(scale=0.5))
        refuted = 0
        for seed in range(8):  # which replica audits is the seeded draw's: until it is ps[2]
            cfg = checked(fraction=0.2, seed=seed)
            async with await open_on(client, route_of(ps), cfg) as session:
                assert await session.generate(PROMPT, 16) == expected
                assert session.detections == 0 and ps[1] not in session.banned()
                assert session.audits is not None and not session.audits.evidence
                refuted += session.audits.refuted
                if session.audits.refuted:
                    assert ps[2] in session.audits.unusable
            if refuted:
                break
        assert refuted == 1
        assert kv_in_use(servers) == 0


@pytest.mark.parametrize("mode", MODES)
async def test_nan_from_a_middle_hop_is_blamed_on_the_middle_hop(
    model_dir: Path, tmp_path: Path, mode: str
) -> None:
    async with Swarm(1 + len(RANGES), seed=25, measure_compute=False) as swarm:
        servers = await start(swarm, model_dir, tmp_path)
        client, ps = swarm.nodes[0], peers(swarm)
        expected = await honest(client, ps, 12)
        # NaN from the middle server's 8th step on (the prompt was 3 chunks)
        CorruptingShard(server_of(swarm, servers, ps[1]), Corruption(nan=True, after=7))
        async with await open_on(client, route_of(ps), config(**MODES[mode])) as session:
            tokens = await session.generate(PROMPT, 12)
            assert session.recoveries == 1
            assert session.banned() == {ps[1]}  # not the last hop, which got it first
            assert [h.peer_id for h in session.route][::2] == [ps[0], ps[4]]
        assert kv_in_use(servers) == 0
        # the honest servers serve a well-behaved client afterwards
        async with await open_on(client, route_of(ps, middle=2), config()) as again:
            assert await again.generate(PROMPT, 12) == expected
    assert tokens == expected


async def test_checks_cost_nothing_in_tokens_and_find_nothing_on_honest_servers(
    model_dir: Path, tmp_path: Path
) -> None:
    async with Swarm(1 + len(RANGES), seed=26, measure_compute=False) as swarm:
        servers = await start(swarm, model_dir, tmp_path)
        client, ps = swarm.nodes[0], peers(swarm)
        expected = await honest(client, ps, 20)
        spec = Sampler(SamplingSpec(temperature=0.8, top_k=5, seed=3))
        sampled = await honest(client, ps, 20, spec)
        for fraction in (1.0, 0.05):
            async with await open_on(client, route_of(ps), checked(fraction)) as session:
                assert await session.generate(PROMPT, 20) == expected
                assert session.detections == 0 and session.audits is not None
                # every middle hidden state and every picked token (the first hop has no replica)
                assert session.audits.compared == len(PROMPT) + 19 + 20
                assert session.ring_steps > 0  # checks and the ring go together
        cfg = checked(1.0, logits_top_k=5)
        async with await open_on(client, route_of(ps), cfg) as session:
            assert await session.generate(PROMPT, 20, sampler=spec) == sampled
            assert session.detections == 0
        # float16 on the wire: each side rounds its own float32, within the fitted tolerance
        async with await open_on(client, route_of(ps), config(dtype="float16")) as half:
            rounded = await half.generate(PROMPT, 20)
        async with await open_on(client, route_of(ps), checked(1.0, dtype="float16")) as session:
            assert await session.generate(PROMPT, 20) == rounded
            assert session.detections == 0
        assert kv_in_use(servers) == 0
