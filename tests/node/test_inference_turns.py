"""A model's running generations take turns, one prompt chunk or token each."""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pedge.node.inference import LocalInference
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.genai_model import Generation
from p2pedge.testing import build_tiny_model

STREAMS = 3
TOKENS = 12


@pytest.fixture(scope="module")
def tiny_turns(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("turns") / "tiny", seed=4)


async def test_streams_alternate_and_never_step_at_once(
    tiny_turns: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stepping = most = 0
    lock = threading.Lock()
    real = Generation.step

    def step(gen: Generation) -> Any:
        nonlocal stepping, most
        with lock:
            stepping += 1
            most = max(most, stepping)
        try:
            return real(gen)
        finally:
            with lock:
                stepping -= 1

    monkeypatch.setattr(Generation, "step", step)
    config = RuntimeConfig(intra_op_threads=1, max_active_per_model=STREAMS, inline_step_s=0)
    local = LocalInference(lambda mid: tiny_turns, config)
    order: list[int] = []

    async def one(i: int) -> None:
        tokens: AsyncGenerator[Any, None] = local.stream(
            "tiny", prompt=f"stream {i} says", max_tokens=TOKENS
        )
        async with aclosing(tokens):
            async for _ in tokens:
                order.append(i)

    await local.warm("tiny")
    turn = local._queue(tiny_turns).turn
    async with trio.open_nursery() as nursery:
        async with turn:  # hold the model until every stream waits for its turn
            for i in range(STREAMS):
                nursery.start_soon(one, i)
            with trio.fail_after(30):
                while turn.statistics().tasks_waiting < STREAMS:
                    await trio.sleep(0.01)  # their prompts are tokenized in worker threads
    local.close()
    assert most == 1  # the turn serialises steps even though each runs in a worker thread
    assert len(order) == STREAMS * TOKENS
    first = order[:STREAMS]
    assert sorted(first) == list(range(STREAMS))
    assert order == first * TOKENS  # round-robin from the first token to the last


async def test_a_kv_budget_runs_generations_that_do_not_fit_one_after_another(
    tiny_turns: Path,
) -> None:
    config = RuntimeConfig(
        intra_op_threads=1, max_active_per_model=STREAMS, inline_step_s=0, kv_budget_bytes=1
    )
    local = LocalInference(lambda mid: tiny_turns, config)
    order: list[int] = []

    async def one(i: int) -> None:
        tokens: AsyncGenerator[Any, None] = local.stream(
            "tiny", prompt=f"stream {i} says", max_tokens=TOKENS
        )
        async with aclosing(tokens):
            async for _ in tokens:
                order.append(i)

    await local.warm("tiny")
    async with trio.open_nursery() as nursery:
        for i in range(STREAMS):
            nursery.start_soon(one, i)
    held = local._queue(tiny_turns).kv_held
    local.close()
    assert len(order) == STREAMS * TOKENS
    runs = [order[k] for k in range(len(order)) if k == 0 or order[k] != order[k - 1]]
    assert sorted(runs) == list(range(STREAMS))  # each stream ran whole, alone
    assert held == 0
