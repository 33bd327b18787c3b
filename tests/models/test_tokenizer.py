"""The written tokenizer gives the same ids through `tokenizers` and onnxruntime-genai."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from p2pedge.models.convert.tokenizer import (
    build_tokenizer,
    byte_to_unicode,
    learn_merges,
    write_tokenizer,
)
from p2pedge.testing import build_tiny_model, tiny_tokenizer_spec

TEXTS = [
    "Hello world, the quick brown fox!",
    "digits 0123456789 and 3.14159 and 2024-11-28",
    "unicode: héllo wörld ✓ 日本語 🙂",
    "  leading spaces\n\nnew lines\ttabs  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tok") / "m", n_layers=1)


@pytest.mark.parametrize("text", TEXTS)
def test_hf_and_genai_agree(text: str, model_dir: Path) -> None:
    import onnxruntime_genai as og

    hf = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok = og.Tokenizer(og.Model(str(model_dir)))
    hf_ids = hf.encode(text).ids
    og_ids = [int(i) for i in tok.encode(text)]
    assert og_ids == hf_ids
    plain = "<|" not in text
    if plain:
        assert hf.decode(hf_ids) == text
        assert tok.decode(np.array(og_ids, dtype=np.int32)) == text


def test_special_tokens_and_digits(model_dir: Path) -> None:
    hf = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = hf.encode("<|im_start|>x<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    digit_ids = hf.encode("12345").ids
    assert len(digit_ids) == 5  # individual digits


def test_chat_template_renders_chatml(model_dir: Path) -> None:
    import onnxruntime_genai as og

    tok = og.Tokenizer(og.Model(str(model_dir)))
    messages = json.dumps([{"role": "user", "content": "Hi"}])
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["bos_token"] == "<|im_start|>"


def test_byte_alphabet_is_a_bijection() -> None:
    table = byte_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ"


def test_learn_merges_is_deterministic_and_skips_digits() -> None:
    corpus = "aaa bbb aaa 111 111 abab"
    first = learn_merges(corpus, 10)
    assert first == learn_merges(corpus, 10)
    assert first and not any(ch.isdigit() for m in first for ch in m)


def test_gpt2_pre_tokenizer_and_validation(tmp_path: Path) -> None:
    spec = tiny_tokenizer_spec()
    gpt2 = dataclasses.replace(spec, pre_tokenizer="gpt2")
    write_tokenizer(tmp_path, gpt2)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.decode(hf.encode("abc 123").ids) == "abc 123"
    with pytest.raises(ValueError):
        build_tokenizer(dataclasses.replace(spec, merges=("nospace",)))
    with pytest.raises(ValueError):
        build_tokenizer(dataclasses.replace(spec, tokens=(*spec.tokens, "a")))
