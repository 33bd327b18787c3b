"""Sharded generation through real servers (codec, machine, handler, onnxruntime) over
in-process streams: tokens must equal the unsplit model's, with and without failures."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import trio
import trio.testing

from p2pedge.errors import ShardFailed
from p2pedge.ids import LayerRange
from p2pedge.protocols.pipeline.client import ClientConfig, ShardedSession
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.protocols.pipeline.local import FaultyShardServer, LocalSwarm
from p2pedge.protocols.pipeline.sampling import make_sampler
from p2pedge.testing.shards import tiny_shards

N_LAYERS = 6
MODEL = "tiny"
PROMPT = [5, 17, 42, 99, 100, 101, 7, 8, 9, 250, 251, 3, 4, 60, 61, 62, 63, 64, 65, 66, 67, 2]
NEW_TOKENS = 12
RANGES = [(0, 2), (2, 4), (4, 6), (2, 6), (0, 6)]


@pytest.fixture(scope="module")
def tiny() -> tuple[dict[LayerRange, Any], bytes]:
    return tiny_shards(RANGES, n_layers=N_LAYERS, seed=3)


def reference_greedy(decoder: bytes, prompt: list[int], n: int) -> list[int]:
    """The unsplit decoder on plain onnxruntime, greedy, with its own KV loop."""
    sess = ort.InferenceSession(decoder)
    kv = {
        i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        for i in sess.get_inputs()
        if i.name.startswith("past_key_values")
    }
    out: list[int] = []
    ids, past = prompt, 0
    names = ["logits"] + [n.replace("past_key_values", "present") for n in kv]
    while len(out) < n:
        feeds = dict(kv)
        feeds["input_ids"] = np.array([ids], np.int64)
        feeds["attention_mask"] = np.ones((1, past + len(ids)), np.int64)
        feeds["position_ids"] = np.arange(past, past + len(ids), dtype=np.int64)[None]
        logits, *present = sess.run(names, feeds)
        kv = dict(zip(kv, present, strict=True))
        past += len(ids)
        ids = [int(np.argmax(logits[0, -1]))]
        out.append(ids[0])
    return out


@pytest.fixture(scope="module")
def expected(tiny: tuple[dict[LayerRange, Any], bytes]) -> list[int]:
    return reference_greedy(tiny[1], PROMPT, NEW_TOKENS)


def server(tiny: tuple[dict[LayerRange, Any], bytes], a: int, b: int, **kw: Any) -> PipelineServer:
    kw.setdefault("offload", False)
    return PipelineServer({(MODEL, LayerRange(a, b)): tiny[0][LayerRange(a, b)]}, **kw)


def session(swarm: LocalSwarm, **kw: Any) -> ShardedSession:
    config = ClientConfig(max_length=64, chunk=kw.pop("chunk", 8), push=False, **kw)
    return ShardedSession(swarm.open_stream, swarm.options, MODEL, N_LAYERS, config)


async def test_three_hops_match_unsplit_model(tiny: Any, expected: list[int]) -> None:
    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery)
        for peer, (a, b) in zip(["a", "b", "c"], [(0, 2), (2, 4), (4, 6)], strict=True):
            swarm.add(peer, server(tiny, a, b))
        async with session(swarm) as s:
            assert [h.peer_id for h in s.route] == ["a", "b", "c"]
            assert await s.generate(PROMPT, NEW_TOKENS) == expected
            stats = s.hop_stats()
        nursery.cancel_scope.cancel()
    assert s.recoveries == 0
    prefill_steps = -(-len(PROMPT) // 8)
    assert [h["steps"] for h in stats] == [prefill_steps + NEW_TOKENS - 1] * 3


async def test_fp16_wire_stays_close(tiny: Any, expected: list[int]) -> None:
    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery)
        swarm.add("a", server(tiny, 0, 2))
        swarm.add("b", server(tiny, 2, 6))
        async with session(swarm, dtype="float16") as s:
            tokens = await s.generate(PROMPT, NEW_TOKENS)
        nursery.cancel_scope.cancel()
    assert len(tokens) == NEW_TOKENS
    assert tokens[:4] == expected[:4]


async def test_prefill_is_pipelined(tiny: Any) -> None:
    """Hop 2 starts on the first chunk before hop 1 has seen the last one."""
    order: list[tuple[str, int]] = []

    class Recording(PipelineServer):
        async def run_step(self, session: Any, action: Any) -> Any:
            order.append((self.name, action.start))
            return await super().run_step(session, action)

    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery)
        for peer, (a, b) in zip(["a", "b"], [(0, 2), (2, 6)], strict=True):
            srv = Recording({(MODEL, LayerRange(a, b)): tiny[0][LayerRange(a, b)]}, offload=True)
            srv.name = peer  # type: ignore[attr-defined]
            swarm.add(peer, srv)
        async with session(swarm, chunk=4) as s:
            await s.extend(PROMPT)
        nursery.cancel_scope.cancel()
    last_a = max(i for i, (peer, _) in enumerate(order) if peer == "a")
    first_b = order.index(("b", 0))
    assert first_b < last_a


@pytest.mark.parametrize("faulty", ["a1", "b1", "c1"])
async def test_crashed_server_is_replaced_with_identical_tokens(
    tiny: Any, expected: list[int], faulty: str
) -> None:
    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery)
        for tag, (a, b) in zip("abc", [(0, 2), (2, 4), (4, 6)], strict=True):
            for n in "12":
                srv: Any = server(tiny, a, b)
                if f"{tag}{n}" == faulty:
                    srv = FaultyShardServer(srv, fail_after_steps=5, mode="drop")
                swarm.add(f"{tag}{n}", srv)
        async with session(swarm) as s:
            assert faulty in [h.peer_id for h in s.route]
            assert await s.generate(PROMPT, NEW_TOKENS) == expected
            route = [h.peer_id for h in s.route]
            assert faulty in s.banned()
        nursery.cancel_scope.cancel()
    assert s.recoveries == 1
    assert faulty not in route and faulty.replace("1", "2") in route


async def test_replacement_may_span_the_next_hop(tiny: Any, expected: list[int]) -> None:
    """With no other server for blocks 2-4, blocks 2-6 replace the failed hop and the next."""
    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery)
        swarm.add("a", server(tiny, 0, 2))
        swarm.add("b", FaultyShardServer(server(tiny, 2, 4), fail_after_steps=4))
        swarm.add("c", server(tiny, 4, 6))
        swarm.add("z", server(tiny, 2, 6), compute_gflops=0.1)  # slow: not chosen at first
        async with session(swarm) as s:
            assert [h.peer_id for h in s.route] == ["a", "b", "c"]
            assert await s.generate(PROMPT, NEW_TOKENS) == expected
            assert [h.peer_id for h in s.route] == ["a", "z"]
        nursery.cancel_scope.cancel()


async def test_frozen_server_detected_by_step_deadline(
    tiny: Any, expected: list[int], autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery)
        swarm.add("a", server(tiny, 0, 2))
        swarm.add("b1", FaultyShardServer(server(tiny, 2, 6), fail_after_steps=6, mode="freeze"))
        swarm.add("b2", server(tiny, 2, 6))
        async with session(swarm, step_timeout=5.0) as s:
            began = trio.current_time()
            assert await s.generate(PROMPT, NEW_TOKENS) == expected
            elapsed = trio.current_time() - began
            assert [h.peer_id for h in s.route] == ["a", "b2"]
        nursery.cancel_scope.cancel()
    assert 5.0 <= elapsed < 10.0


async def test_no_server_left_raises_shard_failed(tiny: Any) -> None:
    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery)
        swarm.add("a", server(tiny, 0, 2))
        swarm.add("b", FaultyShardServer(server(tiny, 2, 6), fail_after_steps=2))
        async with session(swarm) as s:
            with pytest.raises(ShardFailed, match="no server left"):
                await s.generate(PROMPT, NEW_TOKENS)
        nursery.cancel_scope.cancel()


async def test_full_budget_routes_elsewhere(tiny: Any, expected: list[int]) -> None:
    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery)
        swarm.add("a", server(tiny, 0, 6, budget_bytes=1000))  # cannot hold 64 positions
        swarm.add("b", server(tiny, 0, 6))
        swarm.stats["b"]["load"] = 0.5
        async with session(swarm) as s:
            assert [h.peer_id for h in s.route] == ["b"]
            assert await s.generate(PROMPT, NEW_TOKENS) == expected
        nursery.cancel_scope.cancel()


async def test_sampling_is_reproducible_and_sessions_share_servers(tiny: Any) -> None:
    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery)
        swarm.add("a", server(tiny, 0, 2))
        swarm.add("b", server(tiny, 2, 6))
        outs = []
        async with session(swarm) as s1, session(swarm) as s2:
            for s in (s1, s2):
                outs.append(await s.generate(PROMPT, 8, sampler=make_sampler(0.8, 20, seed=1)))
        nursery.cancel_scope.cancel()
    assert outs[0] == outs[1]


async def test_last_shard_sends_only_the_logits_the_sampler_needs(
    tiny: Any, expected: list[int]
) -> None:
    async with trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery)
        swarm.add("a", server(tiny, 0, 2))
        swarm.add("b", server(tiny, 2, 6))
        async with session(swarm, logits_top_k=1) as s:
            assert await s.generate(PROMPT, NEW_TOKENS) == expected
        outs = []
        for k in (0, 20):
            async with session(swarm, logits_top_k=k) as s:
                sampler = make_sampler(0.8, 20, seed=4)
                outs.append(await s.generate(PROMPT, 8, sampler=sampler))
        nursery.cancel_scope.cancel()
    assert outs[0] == outs[1]
