"""GenaiModel against a direct onnxruntime-genai Generator loop on a tiny model."""

from __future__ import annotations

from pathlib import Path

import onnxruntime_genai as og
import pytest

from p2pedge.errors import ModelLoadError
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.genai_model import PREFILL_CHUNK, GenaiModel
from p2pedge.runtime.loader import load_model
from p2pedge.runtime.providers import available_execution_providers, pick_providers
from p2pedge.runtime.sampling import PromptTooLong, SamplingParams

CONFIG = RuntimeConfig(intra_op_threads=1)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> GenaiModel:
    loaded = load_model(tiny_dir, CONFIG)
    assert isinstance(loaded, GenaiModel)
    return loaded


def raw_loop(model: GenaiModel, ids: list[int], n: int, **search: object) -> list[int]:
    """The baseline: onnxruntime-genai's own loop, no p2pedge code in between."""
    params = og.GeneratorParams(model.model)
    params.set_search_options(max_length=len(ids) + n, **search)
    gen = og.Generator(model.model, params)
    gen.append_tokens(ids)
    out: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def run(model: GenaiModel, ids: list[int], params: SamplingParams) -> list[int]:
    gen = model.start(ids, params)
    tokens = []
    while not gen.done:
        tokens.append(gen.step().id)
    assert tokens == gen.token_ids
    return tokens


def test_provider_is_recorded_and_available(model: GenaiModel) -> None:
    assert model.provider in available_execution_providers()
    assert pick_providers(["NoSuchProvider", "CPUExecutionProvider"])[-1] == "CPUExecutionProvider"
    assert model.context_length == 256


def test_greedy_tokens_match_raw_loop(model: GenaiModel) -> None:
    ids = model.encode_prompt(prompt="hello world")
    ours = run(model, ids, SamplingParams.make(max_tokens=40))
    assert ours == raw_loop(model, ids, 40, do_sample=False, top_k=1)[: len(ours)]


def test_seeded_sampling_matches_raw_loop_and_repeats(model: GenaiModel) -> None:
    ids = model.encode_prompt(messages=[{"role": "user", "content": "hi"}])
    params = SamplingParams.make(max_tokens=40, temperature=1.0, top_k=0, seed=7)
    first = run(model, ids, params)
    assert first == run(model, ids, params)
    raw = raw_loop(model, ids, 40, do_sample=True, temperature=1.0, top_k=0, random_seed=7)
    assert first == raw[: len(first)]
    others = {tuple(run(model, ids, SamplingParams.make(max_tokens=40, temperature=1.0, seed=s)))
              for s in range(1, 5)}  # fmt: skip
    assert len(others) > 1  # the seed matters


def test_chunked_prefill_gives_the_tokens_of_a_single_append(model: GenaiModel) -> None:
    ids = model.encode_prompt(prompt="the quick brown fox " * 12)
    assert len(ids) > 3 * PREFILL_CHUNK
    gen = model.start(ids, SamplingParams.make(max_tokens=20))
    chunks = 1
    while not gen.prefill():
        chunks += 1
    assert chunks == -(-len(ids) // PREFILL_CHUNK)
    ours = []
    while not gen.done:
        ours.append(gen.step().id)
    assert ours == raw_loop(model, ids, 20, do_sample=False, top_k=1)[: len(ours)]


def test_max_tokens_bounds_output_and_reports_length(model: GenaiModel) -> None:
    ids = model.encode_prompt(prompt="abc")
    gen = model.start(ids, SamplingParams.make(max_tokens=3, temperature=1.0, seed=1))
    while not gen.done:
        gen.step()
    assert gen.completion_tokens <= 3
    assert gen.finish_reason in {"length", "stop"}
    if gen.completion_tokens == 3:
        assert gen.finish_reason == "length" or gen.token_ids[-1] in model.eos_ids


def test_chat_template_is_chatml(model: GenaiModel) -> None:
    text = model.render_chat([{"role": "user", "content": "hey"}], 10_000)
    assert "<|im_start|>user\nhey<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_prompt_longer_than_context_is_refused(model: GenaiModel) -> None:
    with pytest.raises(PromptTooLong):
        model.encode_prompt(prompt="hello world " * 400)
    with pytest.raises(PromptTooLong):
        model.start(list(range(300)), SamplingParams())


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": 3}]},
        {"prompt": ""},
    ],
)
def test_malformed_prompts_are_refused(model: GenaiModel, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        model.encode_prompt(**kwargs)  # type: ignore[arg-type]


def test_broken_directory_raises_model_load_error(broken_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        load_model(broken_dir, CONFIG)
    with pytest.raises(ModelLoadError):
        load_model(tmp_path, CONFIG)  # no genai_config.json
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "missing", CONFIG)
