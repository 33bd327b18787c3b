"""llama.cpp's own next-token choices on the synthetic GGUF files, as committed fixtures.

``python -m p2pedge.testing.llamacpp_fixtures [OUT.json]`` (needs the binding `make
llamacpp` builds under ``.cache/llamacpp/pyllama``) writes, for every case in
:data:`CASES`, the GGUF's sha256 (the writer is deterministic, so a test regenerates the
same file), and for each position of :data:`PROMPT` (teacher-forced, one batch, float32
KV cache) llama.cpp's top-1 token and the gap to its runner-up.
``tests/models/test_llamacpp_agreement.py`` holds our graphs to them (the Gemma cases:
``tests/models/test_gemma.py``, whose reference covers Gemma's features).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from p2pedge.testing.synthetic_gguf import (
    QTYPES,
    SyntheticShape,
    SyntheticSpec,
    write_synthetic_gguf,
)

ROOT = Path(__file__).resolve().parents[2]
LLAMA_PY = ROOT / ".cache" / "llamacpp" / "pyllama"
FIXTURES = ROOT / "tests" / "models" / "fixtures" / "llamacpp_top1.json"
PROMPT = [int(i) for i in np.random.default_rng(7).integers(3, 250, size=48)]

CASES: dict[str, SyntheticSpec] = {
    **{f"llama-{q}": SyntheticSpec(qtype=q) for q in (*QTYPES, "F16", "BF16", "F32")},
    "llama-Q4_K_M": SyntheticSpec(
        qtype="Q4_K",
        embd_qtype="Q4_K",
        overrides={"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"},
        untied_head=True,
    ),
    "llama-spm-Q4_K": SyntheticSpec(qtype="Q4_K", tokenizer="llama-spm"),
    "llama31-Q8_0": SyntheticSpec(qtype="Q8_0", tokenizer="llama-bpe", rope_factors=True),
    "qwen2-Q4_K": SyntheticSpec(arch="qwen2", qtype="Q4_K", tokenizer="qwen2"),
    "qwen3-Q6_K": SyntheticSpec(arch="qwen3", qtype="Q6_K", tokenizer="qwen2"),
    "phi3-Q4_K": SyntheticSpec(arch="phi3", qtype="Q4_K", tokenizer="llama-spm"),
    "phi3-Q8_0": SyntheticSpec(arch="phi3", qtype="Q8_0", tokenizer="llama-spm"),
    # a final cap as loose as the real one (30), so top-1 margins stay readable
    "gemma2-Q4_K": SyntheticSpec(
        arch="gemma2", qtype="Q4_K", tokenizer="llama-spm", softcaps=(4.0, 30.0)
    ),
    "gemma3-Q8_0": SyntheticSpec(
        arch="gemma3", qtype="Q8_0", tokenizer="llama-spm", shape=SyntheticShape(n_layers=6)
    ),
}
# Graphs outside the plain reference's reach (tests/models/test_gemma.py holds these).
GEMMA_CASES = ("gemma2-Q4_K", "gemma3-Q8_0")


# One case per tokenizer kind, and the awkward strings whose ids llama.cpp gives.
TOKENIZER_CASES = {
    "smollm": "llama-Q4_0",
    "llama-bpe": "llama31-Q8_0",
    "qwen2": "qwen2-Q4_K",
    "llama-spm": "llama-spm-Q4_K",
}
TOKENIZER_TEXTS = [
    "The quick brown fox",
    "Hello world! How are you today?",
    "café naïve Straße 東京 😀🚀",
    "  double  spaces\tand\nnewlines\n\n",
    "Numbers 12345 and 3.14159, 2024-06-01.",
    "def f(x):\n    return x ** 2  # code",
    "thethe andand ofof",
    " leading space",
    "",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def llamacpp_tokens(path: Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's token ids for ``texts`` (no BOS; special tokens parsed as text)."""
    llama_cpp = importlib.import_module("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return [[int(t) for t in llm.tokenize(text.encode(), add_bos=False)] for text in texts]


def llamacpp_logits(path: Path, prompt: list[int]) -> np.ndarray:
    """llama.cpp's logits ``[len(prompt), vocab]`` for every position of ``prompt``."""
    if LLAMA_PY.is_dir() and str(LLAMA_PY) not in sys.path:
        sys.path.append(str(LLAMA_PY))
    llama_cpp = importlib.import_module("llama_cpp")  # optional: `make llamacpp`
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=len(prompt) + 8,
        n_batch=len(prompt),
        n_threads=2,
        n_threads_batch=2,
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32: an fp16 cache would round every key and value
        type_v=0,
        verbose=False,
    )
    llm.eval(prompt)
    return np.array(llm.scores[: len(prompt)], dtype=np.float64)


def make_fixtures() -> dict[str, Any]:
    if LLAMA_PY.is_dir() and str(LLAMA_PY) not in sys.path:
        sys.path.append(str(LLAMA_PY))
    version = getattr(importlib.import_module("llama_cpp"), "__version__", "?")
    out: dict[str, Any] = {"prompt": PROMPT, "llama_cpp_python": version, "cases": {}}
    out["texts"], out["tokens"] = TOKENIZER_TEXTS, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in CASES.items():
            path = write_synthetic_gguf(Path(tmp) / f"{name}.gguf", spec)
            logits = llamacpp_logits(path, PROMPT)
            order = np.argsort(-logits, axis=-1)
            top = logits[np.arange(len(PROMPT)), order[:, 0]]
            second = logits[np.arange(len(PROMPT)), order[:, 1]]
            out["cases"][name] = {
                "sha256": sha256(path),
                "top1": [int(i) for i in order[:, 0]],
                "margin": [round(float(m), 5) for m in top - second],
            }
            kinds = [k for k, case in TOKENIZER_CASES.items() if case == name]
            if kinds:
                out["tokens"][kinds[0]] = llamacpp_tokens(path, TOKENIZER_TEXTS)
            print(name, "done", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else FIXTURES
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(make_fixtures(), sort_keys=True, separators=(",", ":"))
    target.write_text(text + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
