"""Token log-probabilities from onnxruntime-genai's logits, against a numpy reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og
import pytest

from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.genai_model import GenaiModel, Token, log_softmax, top_ids
from p2pedge.runtime.loader import load_model
from p2pedge.runtime.sampling import MAX_TOP_LOGPROBS, SamplingParams

PROMPT = "the quick brown fox jumps over the lazy dog " * 6  # more than one prefill chunk


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> GenaiModel:
    loaded = load_model(tiny_dir, RuntimeConfig(intra_op_threads=1))
    assert isinstance(loaded, GenaiModel)
    return loaded


def run(model: GenaiModel, ids: list[int], params: SamplingParams) -> list[Token]:
    gen = model.start(ids, params)
    tokens = []
    while not gen.done:
        tokens.append(gen.step())
    return tokens


def reference(model: GenaiModel, ids: list[int], n: int) -> list[tuple[int, Any]]:
    """onnxruntime-genai's own greedy loop; each token with the probabilities it was
    chosen from: a plain float64 softmax of the logits the model computed for it."""
    params = og.GeneratorParams(model.model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False, top_k=1)
    gen = og.Generator(model.model, params)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        logits = np.asarray(gen.get_logits(), dtype=np.float64)[0, -1]
        gen.generate_next_token()
        probs = np.exp(logits) / np.exp(logits).sum()
        out.append((int(gen.get_next_tokens()[0]), probs))
    return out


def test_greedy_logprobs_match_a_softmax_of_the_logits(model: GenaiModel) -> None:
    ids = model.encode_prompt(prompt=PROMPT)
    tokens = run(model, ids, SamplingParams.make(max_tokens=24, logprobs=True, top_logprobs=5))
    ref = reference(model, ids, 24)
    assert [t.id for t in tokens] == [tid for tid, _ in ref][: len(tokens)]
    for token, (tid, probs) in zip(tokens, ref, strict=False):
        assert token.logprob is not None and token.logprob.id == tid
        assert token.logprob.logprob == pytest.approx(np.log(probs[tid]), abs=1e-9)
        assert token.logprob.text == model.tokenizer.decode([tid])
        assert [a.id for a in token.top_logprobs] == list(np.argsort(-probs, kind="stable")[:5])
        for alt in token.top_logprobs:
            assert alt.logprob == pytest.approx(np.log(probs[alt.id]), abs=1e-9)
        values = [a.logprob for a in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        # greedy: the chosen token is the likeliest one
        assert token.logprob.logprob == pytest.approx(values[0], abs=1e-12)
        assert np.exp(token.logprob.logprob) <= 1.0


@pytest.mark.parametrize(
    "sampling", [{}, {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7}]
)
def test_tokens_are_the_same_with_and_without_logprobs(
    model: GenaiModel, sampling: dict[str, Any]
) -> None:
    ids = model.encode_prompt(prompt=PROMPT)
    plain = run(model, ids, SamplingParams.make(max_tokens=30, **sampling))
    with_lp = run(model, ids, SamplingParams.make(max_tokens=30, logprobs=True, **sampling))
    assert [(t.id, t.text) for t in with_lp] == [(t.id, t.text) for t in plain]
    assert all(t.logprob is None and t.top_logprobs == () for t in plain)
    assert all(t.logprob is not None and t.top_logprobs == () for t in with_lp)


def test_logprobs_to_the_end_of_the_context(model: GenaiModel) -> None:
    """The read before each step never trips the end-of-generation trap: a generation
    that fills the whole context finishes normally, logprobs on every token."""
    ids = model.encode_prompt(prompt=PROMPT)
    room = model.context_length - len(ids)
    params = SamplingParams.make(max_tokens=room, logprobs=True, top_logprobs=1)
    gen = model.start(ids, params)
    tokens = []
    while not gen.done:
        tokens.append(gen.step())
    assert gen.finish_reason in ("length", "stop")
    assert all(t.logprob is not None and len(t.top_logprobs) == 1 for t in tokens)


def test_log_softmax_sums_to_one_and_is_stable() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(49152).astype(np.float32) * 8
    lp = log_softmax(logits)
    assert lp.dtype == np.float64
    assert np.exp(lp).sum() == pytest.approx(1.0, abs=1e-12)
    direct = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum()
    np.testing.assert_allclose(np.exp(lp), direct, rtol=1e-12)
    # logits that overflow exp() on their own
    big = log_softmax(np.array([1000.0, 1000.0, 0.0], dtype=np.float32))
    assert big[0] == pytest.approx(np.log(0.5)) and np.isfinite(big).all()
    assert top_ids(big, 2) == [0, 1] and top_ids(big, 0) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"logprobs": True, "top_logprobs": MAX_TOP_LOGPROBS + 1},
        {"logprobs": True, "top_logprobs": -1},
        {"logprobs": True, "top_logprobs": 2.0},
        {"logprobs": True, "top_logprobs": True},
        {"logprobs": 1},
        {"top_logprobs": 3},  # alternatives without logprobs
    ],
)
def test_bad_logprob_parameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams.make(**kwargs)  # type: ignore[arg-type]


def test_top_logprobs_bounds_are_accepted() -> None:
    assert SamplingParams.make(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS).top_logprobs == 20
    assert SamplingParams.make(logprobs=True).top_logprobs == 0
