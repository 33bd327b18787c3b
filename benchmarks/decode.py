"""Decode speed of the imported SmolLM2-135M-Instruct: fp32 vs lossless 4-bit (fp32 and int8
activations), through onnxruntime-genai on 2 threads, same prompt, interleaved in one run.

The three directories are what ``make model`` imports: the default lossless-4 (the file's
Q4_1 blocks as MatMulNBits, fp32 activations), ``-int8`` (the same weights, int8 activations
through MatMulNBits' ``accuracy_level`` 4, with the Q8_0 embedding as an exact 8-bit head)
and ``-fp32`` (dequantised). Next-token agreement is teacher-forced on the
fp32 variant's greedy continuation (top-1 match per position), which is cheap and robust to
one early divergence.

Run ``make model`` first, then ``python benchmarks/decode.py [--tokens N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import write_section

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / ".cache" / "models"
LOSSLESS4 = MODELS / "smollm2-135m-instruct"  # the default: exact Q4_1, fp32 activations
INT8 = MODELS / "smollm2-135m-instruct-int8"  # same weights, int8 activations
FP32 = MODELS / "smollm2-135m-instruct-fp32"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "decode"
THREADS = 2
QUESTION = "Write a short story about a robot who learns to paint."


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per run")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per variant")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    for d in (LOSSLESS4, INT8, FP32):
        if not (d / "model.onnx").is_file():
            print(f"missing {d}; run `make model`", file=sys.stderr)
            return 2

    dirs = {"fp32": FP32, "lossless4": LOSSLESS4, "lossless4_int8": INT8}
    models = {name: load(d) for name, d in dirs.items()}
    tok = og.Tokenizer(models["fp32"])
    chat = json.dumps([{"role": "user", "content": QUESTION}])
    prompt = [int(i) for i in tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True))]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    outputs: dict[str, list[int]] = {}
    for name, model in models.items():  # warm-up: first-run allocations and page faults
        outputs[name] = timed_decode(model, prompt, args.tokens)[2]
    for _ in range(args.rounds):  # interleaved so machine noise hits every variant alike
        for name, model in models.items():
            runs[name].append(timed_decode(model, prompt, args.tokens)[:2])
    reference = outputs["fp32"]
    agreement: dict[str, float] = {}
    for name, model in models.items():
        agreement[name] = forced_agreement(model, prompt, reference)
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
    lines = [
        "| variant | decode tok/s | vs fp32 | prefill ms | top-1 agreement | same greedy prefix"
        " | disk MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("fp32", "lossless4", "lossless4_int8"):
        lines.append(
            f"| {name} | {tok_s[name]:.1f} | {tok_s[name] / tok_s['fp32']:.2f}x | "
            f"{prefill[name] * 1000:.0f} | {agreement[name]:.3f} | {same[name]}/{args.tokens} | "
            f"{disk[name]:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_doc:
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        load_avg = os.getloadavg()[0]  # other work on the box skews absolute tok/s, not ratios
        cpu = platform.processor() or platform.machine()
        machine = f"{cpu}, {os.cpu_count()} cores, load {load_avg:.1f}"
        body = (
            "### Decode speed (`benchmarks/decode.py`): SmolLM2-135M-Instruct"
            f" ({when}, {machine})\n\n"
            f"onnxruntime-genai {og.__version__}, CPU, {THREADS} intra-op threads, greedy, "
            f"{len(prompt)}-token chat prompt, {args.tokens} tokens per run (EOS held off), "
            f"median of {args.rounds} interleaved rounds. Agreement: teacher-forced top-1 match "
            "with the fp32 variant's greedy continuation.\n\n" + table
        )
        write_section(SECTION, body, DOC)
    print(
        f"lossless4_int8_tok_s={tok_s['lossless4_int8']:.1f} "
        f"lossless4_tok_s={tok_s['lossless4']:.1f} fp32_tok_s={tok_s['fp32']:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
