"""Short decode steps skip the worker thread on an idle server; everything else does not.

Real ``PipelineServer`` with worker threads (``offload=True``) and onnxruntime over
in-process streams; the policy itself is checked directly on :class:`StepCosts`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import trio

from p2pedge.ids import LayerRange
from p2pedge.protocols._stream import FramedStream, memory_stream_pair
from p2pedge.protocols.pipeline import codec
from p2pedge.protocols.pipeline.handler import PipelineServer
from p2pedge.runtime.inline import StepCosts
from p2pedge.testing.shards import tiny_shards

MODEL = "tiny"
WHOLE = LayerRange(0, 4)


@pytest.fixture(scope="module")
def shard() -> Any:
    return tiny_shards([(0, 4)], n_layers=4, seed=3)[0][WHOLE]


def test_policy_needs_a_measured_short_decode_step_and_an_idle_server() -> None:
    model: Any = object()
    costs = StepCosts(0.010)
    assert not costs.may_inline(model, 1, busy=False)  # nothing measured yet
    costs.record(model, 7, 0.001)  # prefill chunks are not decode costs
    assert costs.estimate(model) is None
    costs.record(model, 1, 0.004)
    assert costs.may_inline(model, 1, busy=False)
    assert not costs.may_inline(model, 1, busy=True)
    assert not costs.may_inline(model, 2, busy=False)
    for _ in range(10):  # the shard slows down: the estimate follows and inlining stops
        costs.record(model, 1, 0.050)
    estimate = costs.estimate(model)
    assert estimate is not None and estimate > 0.010
    assert not costs.may_inline(model, 1, busy=False)
    never = StepCosts(0.0)
    never.record(model, 1, 0.001)
    assert not never.may_inline(model, 1, busy=False)
    with pytest.raises(ValueError):
        StepCosts(-1.0)


async def decode(server: PipelineServer, tokens: list[int]) -> list[np.ndarray]:
    """Prefill ``tokens[:2]`` then decode the rest one by one; the outputs in order."""
    ours, theirs = memory_stream_pair()
    client = FramedStream(ours)
    outputs: list[np.ndarray] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, FramedStream(theirs), "peer")
        rid = 0

        async def ask(msg: codec.Message) -> codec.Message:
            nonlocal rid
            rid += 1
            await client.send({**codec.to_map(msg), "rid": rid})
            return codec.from_map(await client.receive(timeout=30))

        opened = await ask(codec.Open(0, MODEL, WHOLE.start, WHOLE.end, 32))
        assert isinstance(opened, codec.Opened)
        chunks = [tokens[:2]] + [[t] for t in tokens[2:]]
        start = 0
        for chunk in chunks:
            out = await ask(codec.Step(0, opened.session, start, np.array([chunk], np.int64)))
            assert isinstance(out, codec.Output), out
            outputs.append(np.asarray(out.y))
            start += len(chunk)
        await client.close()
        nursery.cancel_scope.cancel()
    return outputs


async def test_decode_steps_run_inline_after_the_first_and_give_the_same_logits(
    shard: Any,
) -> None:
    tokens = [3, 14, 15, 92, 65, 35]
    threaded = PipelineServer({(MODEL, WHOLE): shard}, inline_step_s=0.0)
    inline = PipelineServer({(MODEL, WHOLE): shard}, inline_step_s=10.0)
    reference = await decode(threaded, tokens)
    got = await decode(inline, tokens)
    assert threaded.steps_inline == 0 and threaded.steps_served == 5
    # the prefill and the first decode step (nothing measured yet) went to a thread
    assert inline.steps_inline == 3 and inline.steps_served == 5
    for a, b in zip(reference, got, strict=True):
        assert np.array_equal(a, b)
