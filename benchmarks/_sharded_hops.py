"""Section 3 of the sharded benchmark: added latency per hop.

A 1-hop chain (one server with every block) and 3-hop chains (relayed, pushed, round a
ring) decode the same tokens; the difference per token, halved, is
what each extra server adds. The client also runs the three shard graphs itself on the
same tokens, so each relayed hop's round trip splits into compute and the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks._shard_servers import MODEL, N_LAYERS, STEP_TIMEOUT, Server, third_dirs
from p2pedge.ids import LayerRange
from p2pedge.node.node import Node
from p2pedge.planning.routes import Hop, ServerOption
from p2pedge.protocols._stream import FramedStream
from p2pedge.protocols.pipeline.client import ClientConfig, ShardedSession
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.shard_session import ShardModel, ShardSession

WARMUP_TOKENS = 8
RING_BLOCK = 8  # tokens per turn when rings and lock-step chains take turns


async def chain(
    node: Node,
    route: list[Hop],
    max_length: int,
    *,
    push: bool = False,
    ring: bool = False,
) -> ShardedSession:
    async def find() -> list[ServerOption]:
        return []  # routes are fixed here; a failure should surface, not be re-planned

    async def opener(peer: str, protocol: str) -> FramedStream:
        return await node.lanes.open(peer, protocol, timeout=STEP_TIMEOUT)  # as node.complete

    config = ClientConfig(
        max_length=max_length,
        step_timeout=STEP_TIMEOUT,
        max_recoveries=0,
        logits_top_k=1,
        push=push,
        ring=ring,
    )
    session = ShardedSession(opener, find, MODEL, N_LAYERS, config)
    await session.start(route=route)
    return session


def in_process_thirds(root: Path, model_dir: Path) -> list[ShardModel]:
    """The servers' own shard graphs loaded in this process (1 thread), for a compute-only
    baseline of each hop measured in the same rounds."""
    config = RuntimeConfig(intra_op_threads=1)
    return [ShardModel.from_dir(d, config) for d in third_dirs(root, model_dir)]


def compute_only(thirds: Sequence[ShardSession], x: npt.NDArray[Any], start: int) -> list[float]:
    """Seconds each third takes on ``x`` at ``start``, chained as the servers would."""
    took = []
    for shard in thirds:
        began = time.perf_counter()
        x = shard.step(x, start)
        took.append(time.perf_counter() - began)
    return took


async def timed_extend(session: ShardedSession, token: int) -> tuple[float, int, list[float]]:
    before = [h.conn.busy_seconds for h in session.hops]
    start = time.perf_counter()
    logits = await session.extend([token])
    took = time.perf_counter() - start
    hops = [h.conn.busy_seconds - b for h, b in zip(session.hops, before, strict=True)]
    return took, int(np.argmax(logits)), hops


async def ring_block(
    session: ShardedSession, feed: list[int], at: int, n: int
) -> tuple[dict[int, tuple[float, int]], int]:
    """``n`` tokens from ``session.stream(feed)`` (``feed`` goes in at position ``at``):
    for each token after the first, the seconds since the one before and the token, keyed
    by the position whose step produced it (round the ring); and the last token."""
    out: dict[int, tuple[float, int]] = {}
    previous, position, token = 0.0, at + len(feed), -1
    async with aclosing(session.stream(feed, n)) as stream:
        async for token in stream:
            now = time.perf_counter()
            if previous:
                out[position] = (now - previous, token)
                position += 1
            previous = now
    return out, token


async def in_lock_step(
    chains: Sequence[ShardedSession],
    local: Sequence[ShardSession],
    at: int,
    token: int,
    n: int,
) -> dict[str, Any]:
    """``n`` tokens (``token`` fed at position ``at``, then each next one) through the
    1-hop, relayed and pushed chains in lock-step, each going first, second and third in
    turn, and the same blocks in-process per token."""
    out: dict[str, Any] = {k: [] for k in ("t1", "t3", "t3p", "hops", "compute", "positions")}
    out["tokens"], out["mismatches"] = [], 0
    for i in range(n):
        position = at + i
        timed: dict[int, tuple[float, int, list[float]]] = {}
        for j in range(3):
            k = (i + j) % 3
            timed[k] = await timed_extend(chains[k], token)
        out["compute"].append(compute_only(local, np.asarray([[token]]), position))
        out["mismatches"] += len({timed[k][1] for k in timed}) != 1
        token = timed[1][1]
        out["tokens"].append(token)
        out["positions"].append(position)
        out["t1"].append(timed[0][0])
        out["t3"].append(timed[1][0])
        out["t3p"].append(timed[2][0])
        out["hops"].append(timed[1][2])
    return out


async def hop_latency(
    node: Node,
    whole: Server,
    thirds: Sequence[Server],
    prompt: list[int],
    tokens: int,
    rounds: int,
    local_thirds: Callable[[], list[ShardSession]],
) -> dict[str, Any]:
    one_route = [Hop(whole.peer_id, LayerRange.parse(whole.layers))]
    three_route = [Hop(s.peer_id, LayerRange.parse(s.layers)) for s in thirds]
    t1s: list[float] = []
    t3s: list[float] = []
    t3ps: list[float] = []
    t3rs: list[float] = []
    t1_ring: list[float] = []  # the 1-hop chain's steps at the positions the rings timed
    hop_rtts: list[list[float]] = [[] for _ in thirds]
    hop_compute: list[list[float]] = [[] for _ in thirds]
    mismatches = 0
    for rnd in range(rounds + 1):  # round 0 warms both chains up and is not kept
        s1 = await chain(node, one_route, len(prompt) + tokens + 2)
        s3 = await chain(node, three_route, len(prompt) + tokens + 2)
        s3p = await chain(node, three_route, len(prompt) + tokens + 2, push=True)
        s3r = await chain(node, three_route, len(prompt) + tokens + 2, push=True, ring=True)
        local = local_thirds()
        n = tokens if rnd > 0 else WARMUP_TOKENS
        try:
            token = int(np.argmax(await s1.extend(prompt)))
            mismatches += token != int(np.argmax(await s3.extend(prompt)))
            mismatches += token != int(np.argmax(await s3p.extend(prompt)))
            compute_only(local, np.asarray([prompt], dtype=np.int64), 0)
            # Blocks of RING_BLOCK tokens: the lock-step chains, then the ring, in turns,
            # so drift within a round does not favour either; rings pair with the 1-hop
            # chain by position (the first step of each later ring block is the client's
            # own, not timed, so those positions have no pair).
            lock: dict[str, Any] = {"t1": [], "t3": [], "t3p": [], "hops": [], "compute": []}
            lock_tokens: dict[int, tuple[float, int]] = {}
            ring_at = {s3r: (list(prompt), 0)}
            ring_seen: dict[ShardedSession, dict[int, tuple[float, int]]] = {s3r: {}}
            at = len(prompt)
            for block in range(0, n, RING_BLOCK):
                size = min(RING_BLOCK, n - block)
                part = await in_lock_step((s1, s3, s3p), local, at, token, size)
                for key in lock:
                    lock[key] += part[key]
                mismatches += part["mismatches"]
                for position, t1, produced in zip(
                    part["positions"], part["t1"], part["tokens"], strict=True
                ):
                    lock_tokens[position] = (t1, produced)
                token, at = part["tokens"][-1], at + size
                for session in (s3r,):
                    feed, fed_at = ring_at[session]
                    seen, last = await ring_block(
                        session, feed, fed_at, at - fed_at - len(feed) + 1
                    )
                    ring_seen[session] |= seen
                    ring_at[session] = ([last], at)
            for session in (s3r,):
                for position, (_, produced) in ring_seen[session].items():
                    mismatches += lock_tokens[position][1] != produced
            round_t1, round_t3, round_t3p = lock["t1"], lock["t3"], lock["t3p"]
            round_hops, round_compute = lock["hops"], lock["compute"]
            paired = sorted(ring_seen[s3r])
            round_p1 = [lock_tokens[q][0] for q in paired]
            round_t3r = [ring_seen[s3r][q][0] for q in paired]
        finally:
            for session in (s1, s3, s3p, s3r):
                await session.aclose()
        if rnd > 0:
            if s3p.pushed_steps != len(round_t3p):
                raise RuntimeError(f"pushed {s3p.pushed_steps} of {len(round_t3p)} steps")
            for session in (s3r,):
                if session.ring_steps != len(ring_seen[session]):
                    raise RuntimeError(f"{session.ring_steps} tokens came round, not all timed")
            t1s += round_t1
            t3s += round_t3
            t3ps += round_t3p
            t3rs += round_t3r
            t1_ring += round_p1
            for hops, computed in zip(round_hops, round_compute, strict=True):
                for k, (rtt, own) in enumerate(zip(hops, computed, strict=True)):
                    hop_rtts[k].append(rtt)
                    hop_compute[k].append(own)
    added = [(t3 - t1) / 2 for t1, t3 in zip(t1s, t3s, strict=True)]
    added_push = [(t3 - t1) / 2 for t1, t3 in zip(t1s, t3ps, strict=True)]
    added_ring = [(t3 - t1) / 2 for t1, t3 in zip(t1_ring, t3rs, strict=True)]
    client = [t3 - sum(h) for t3, h in zip(t3s, zip(*hop_rtts, strict=True), strict=True)]
    return {
        "added": added,
        "added_push": added_push,
        "added_ring": added_ring,
        "t1": t1s,
        "t3r": t3rs,
        "t3": t3s,
        "t3p": t3ps,
        "hop_rtts": hop_rtts,
        "hop_compute": hop_compute,
        "client": client,
        "mismatches": mismatches,
    }
