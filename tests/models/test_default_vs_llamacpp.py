"""The default SmolLM2 import (Q4_1 blocks, 8-bit activations) behaves like llama.cpp on the
same GGUF: same prompt tokens, llama.cpp's greedy tokens teacher-forced, the same answers.

The reference is llama.cpp's own output, committed in ``tests/models/fixtures/
llamacpp_smollm2.json`` by ``python -m p2pedge.testing.llamacpp_smollm2`` (llama.cpp is not
needed here). llama.cpp rounds activations to 8 bits in its quantised matmuls too, so where
its top two logits nearly tie its choice is noise: measured on the 24 prompts, the default
agrees at 96.3% of 1129 positions in one batch (97.1% stepwise, as decode runs; the exact
and fp32 imports: 97.1%), and every disagreement sits where llama.cpp's gap is below 0.35.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import onnxruntime_genai as og
import pytest

from p2pedge.testing import real_gguf_path, real_model_dir
from p2pedge.testing.llamacpp_smollm2 import FIXTURE, QUESTIONS, sha256

pytestmark = pytest.mark.real_model

DATA: dict[str, Any] = json.loads(FIXTURE.read_text())
MIN_AGREEMENT = 0.95  # issue 18's target; measured 0.963 (batch)
CLEAR_MARGIN = 0.5  # llama.cpp's top-two gap beyond which we must pick its token


def _levels(model_dir: Any) -> set[int]:
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    return {
        a.i
        for n in graph.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }


def _forced_top1(sess: ort.InferenceSession, prompt: list[int], target: list[int]) -> Any:
    """Our argmax at each position of ``target``, fed llama.cpp's tokens (one batch)."""
    ids = prompt + target[:-1]
    n = len(ids)
    feeds: dict[str, npt.NDArray[np.generic]] = {
        "input_ids": np.array([ids], np.int64),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            _, heads, _, dim = inp.shape
            feeds[inp.name] = np.zeros((1, heads, 0, dim), np.float32)
    logits = sess.run(["logits"], feeds)[0][0]
    return logits[len(prompt) - 1 :].argmax(-1)


def test_fixture_belongs_to_this_file() -> None:
    assert DATA["gguf_sha256"] == sha256(real_gguf_path())
    assert DATA["llama_cpp_python"] and DATA["llama_cpp_commit"]
    assert len(DATA["prompts"]) >= 20
    assert [q["message"] for q in DATA["questions"]] == [q for q, _ in QUESTIONS]


def test_default_runs_8_bit_activations() -> None:
    """The default is the int8-activation graph; the exact one keeps fp32 activations."""
    assert _levels(real_model_dir()) == {4}
    assert 4 not in _levels(real_model_dir("exact"))


def test_chat_prompts_tokenize_as_llamacpp_does() -> None:
    model = og.Model(str(real_model_dir()))
    tok = og.Tokenizer(model)
    for entry in [*DATA["prompts"], *DATA["questions"]]:
        chat = json.dumps([{"role": "user", "content": entry["message"]}])
        text = tok.apply_chat_template(chat, add_generation_prompt=True)
        assert [int(i) for i in tok.encode(text)] == entry["prompt"], entry["message"]


def test_default_agrees_with_llamacpp_greedy_tokens() -> None:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    model = str(real_model_dir() / "model.onnx")
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    hits = total = clear = 0
    for entry in DATA["prompts"]:
        want = np.array(entry["tokens"])
        got = _forced_top1(sess, entry["prompt"], entry["tokens"])
        sure = np.array(entry["margins"]) > CLEAR_MARGIN
        assert np.array_equal(got[sure], want[sure]), entry["message"]
        hits += int((got == want).sum())
        total += len(want)
        clear += int(sure.sum())
    assert clear >= total // 2  # the clear positions are most of them (measured 79%)
    assert hits / total >= MIN_AGREEMENT, f"{hits}/{total}"


def _greedy(model: og.Model, prompt: list[int], n_tokens: int) -> str:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    tokens: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return str(og.Tokenizer(model).decode(tokens))


def test_default_answers_what_llamacpp_answers() -> None:
    """The questions llama.cpp answers right on this file (the script checked its word)."""
    model = og.Model(str(real_model_dir()))
    for entry in DATA["questions"]:
        assert entry["word"].lower() in entry["text"].lower()  # llama.cpp's own answer
        answer = _greedy(model, entry["prompt"], 16)
        assert entry["word"].lower() in answer.lower(), (entry["message"], answer)
