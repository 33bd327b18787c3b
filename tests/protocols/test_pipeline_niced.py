"""The long steps of a peer past half its compute burst run at a lowered CPU priority,
decode steps and a prompt within its share at the server's own: a flood of long steps
yields the cores to the next hop's work (``fair.run_niced``)."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import numpy as np
import pytest
import trio

from p2pedge.ids import LayerRange
from p2pedge.protocols._stream import FramedStream, memory_stream_pair
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.fair import run_niced
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.protocols.pipeline.limits import PipelineLimits
from p2pedge.runtime.shard_session import ShardModel, ShardSession
from p2pedge.testing.shards import tiny_shards

linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread nice is Linux's"
)
FIRST = LayerRange(0, 2)


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@linux
async def test_run_niced_lowers_only_its_own_thread() -> None:
    base = own_nice()
    assert await run_niced(own_nice, 5) == min(base + 5, 19)
    assert await run_niced(own_nice, 0) == base  # an ordinary worker thread
    assert own_nice() == base  # the trio thread keeps its priority
    with pytest.raises(ZeroDivisionError):
        await run_niced(lambda: 1 // 0, 5)


class NiceRecordingSession(ShardSession):
    """Fault-free instrumentation: each step records its size and its thread's nice."""

    def __init__(self, model: ShardModel, max_length: int, log: list[tuple[int, int]]) -> None:
        super().__init__(model, max_length)
        self.log = log

    def step(self, x: np.ndarray, start: int, *, last_only: bool = True) -> np.ndarray:
        self.log.append((int(x.shape[1]), own_nice()))
        return super().step(x, start, last_only=last_only)


@linux
async def test_long_step_chunks_run_niced_and_decode_steps_do_not() -> None:
    model = tiny_shards([(0, 2)], n_layers=4, seed=1)[0][FIRST]
    log: list[tuple[int, int]] = []
    model.new_session = lambda n: NiceRecordingSession(model, n, log)  # type: ignore[method-assign]
    limits = PipelineLimits(step_chunk=16, long_step_nice=7, compute_burst=64)
    server = PipelineServer({("tiny", FIRST): model}, inline_step_s=0.0, limits=limits)
    base = own_nice()
    async with trio.open_nursery() as nursery:
        ours, theirs = memory_stream_pair()
        nursery.start_soon(server.handle, FramedStream(theirs), "peer")
        stream = FramedStream(ours)
        await stream.send(codec.to_map(codec.Open(1, "tiny", 0, 2, 64)))
        opened = codec.from_map(await stream.receive(timeout=10))
        assert isinstance(opened, codec.Opened)
        prompt: Any = np.arange(1, 57, dtype=np.int64)[None]
        steps = [(0, prompt[:, :16]), (16, prompt[:, 16:]), (56, prompt[:, :1])]
        for rid, (start, x) in enumerate(steps, start=2):
            await stream.send(codec.to_map(codec.Step(rid, opened.session, start, x)))
            assert isinstance(codec.from_map(await stream.receive(timeout=10)), codec.Output)
        nursery.cancel_scope.cancel()
    niced = min(base + 7, 19)
    # 16 of a 64-position burst: full priority; 40 more leave under half: niced
    assert log == [(16, base), (16, niced), (16, niced), (8, niced), (1, base)]
