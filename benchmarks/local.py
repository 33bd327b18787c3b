"""LocalInference.stream/generate against a raw onnxruntime-genai loop, same model, same run.

For each model (the real SmolLM2 when imported, and a tiny random Llama) the two paths
decode the same greedy tokens from the same og.Model, interleaved round by round; the
table reports medians of decode tok/s and time to first token, the ratio, and the
memory each warm model costs (RSS growth measured by ModelCache at load).
``generate()`` is ``stream()`` with empty pieces dropped, so both are timed through
``stream()`` to count tokens exactly.

llama.cpp on the same GGUF joins the real model's rounds when it is available (``LLAMA_BENCH``
naming a llama-bench binary, or an importable ``llama_cpp``; see docs/runtime.md): same
prompt depth, same token count, same threads. Every ratio is the median of paired
per-round ratios, with its min-max spread.

    .venv/bin/python benchmarks/local.py [--tokens 64] [--rounds 15] [--model-dir DIR] [--no-doc]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime_genai as og
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import (
    RATIO_DEFINITION,
    headline,
    paired_ratio,
    ratio_cell,
    ratio_fields,
    turns,
    write_section,
)
from benchmarks.decode import llamacpp
from p2pedge.ids import ModelId
from p2pedge.node.inference import LocalInference
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.genai_model import GenaiModel

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake."}]
REAL = ROOT / ".cache" / "models" / "smollm2-135m-instruct"


@dataclass
class Timing:
    ttft_s: float
    tok_s: float
    tokens: int


def raw_loop(model: GenaiModel, ids: list[int], n: int) -> Timing:
    """The baseline: onnxruntime-genai's own loop with nothing of ours in between."""
    start = time.perf_counter()
    params = og.GeneratorParams(model.model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False, top_k=1)
    gen = og.Generator(model.model, params)
    gen.append_tokens(ids)
    count, first, last = 0, 0.0, 0.0
    while not gen.is_done():
        gen.generate_next_token()
        gen.get_next_tokens()
        last = time.perf_counter()
        first = first or last
        count += 1
    return Timing(first - start, (count - 1) / (last - first) if count > 1 else 0.0, count)


async def ours(local: LocalInference, name: str, n: int) -> Timing:
    start = time.perf_counter()
    count, first, last = 0, 0.0, 0.0
    async for _ in local.stream(name, messages=PROMPT, max_tokens=n):
        last = time.perf_counter()
        first = first or last
        count += 1
    return Timing(first - start, (count - 1) / (last - first) if count > 1 else 0.0, count)


async def bench_model(
    label: str, path: Path, tokens: int, rounds: int, with_llamacpp: bool = False
) -> tuple[dict[str, Any], str]:
    """Medians for ``label``, and what ran llama.cpp beside it (or why it did not)."""
    local = LocalInference(lambda mid: path, RuntimeConfig())
    info = await local.warm(label)
    lease = local.cache.try_acquire(path)
    assert lease is not None
    model = lease.model
    lease.release()
    assert isinstance(model, GenaiModel)
    ids = model.encode_prompt(messages=PROMPT)
    llama_how, llama_round = llamacpp(ids, tokens) if with_llamacpp else ("", None)
    raw_loop(model, ids, 4)  # warm-up both paths once
    await ours(local, label, 4)
    raws: list[Timing] = []
    mine: list[Timing] = []
    llama: list[float] = []
    sides = ["raw", "ours", *(["llama.cpp"] if llama_round is not None else [])]
    for r in range(rounds):  # interleave so machine-load drift hits every side alike
        for side in turns(sides, r):
            if side == "raw":
                raws.append(raw_loop(model, ids, tokens))
            elif side == "ours":
                mine.append(await ours(local, label, tokens))
            elif llama_round is not None:
                llama.append(await trio.to_thread.run_sync(llama_round))
    assert [t.tokens for t in mine] == [t.tokens for t in raws], "paths decoded differently"
    local.close()
    hop_start = time.perf_counter()
    for _ in range(200):  # what one empty worker-thread hop costs on this machine, now
        await trio.to_thread.run_sync(lambda: None)
    hop_us = (time.perf_counter() - hop_start) / 200 * 1e6
    med = statistics.median
    vs_llama: dict[str, Any] = {}
    if llama:
        vs_llama = {
            "llamacpp_tok_s": med(llama),
            "vs_llamacpp": paired_ratio([m.tok_s for m in mine], llama),
        }
    return {
        **vs_llama,
        "raw_tok_s": med(t.tok_s for t in raws),
        "tok_s": med(t.tok_s for t in mine),
        "raw_ttft_ms": med(t.ttft_s for t in raws) * 1e3,
        "ttft_ms": med(t.ttft_s for t in mine) * 1e3,
        "tokens": float(mine[0].tokens),
        "rss_mb": info.size_bytes / 2**20,
        "load_s": info.load_s,
        "hop_us": hop_us,
        # Rounds run back to back, so each pair shares the machine's load of the moment.
        "ratio": paired_ratio([m.tok_s for m in mine], [r.tok_s for r in raws]),
    }, llama_how


async def run(args: argparse.Namespace) -> int:
    from p2pedge.testing import build_tiny_model

    models: list[tuple[str, Path]] = []
    real: Path = args.model_dir
    if (real / "model.onnx").is_file():
        models.append(("smollm2 (default: lossless4, int8 activations)", real))
    else:
        print(f"missing {real}; run `make model` (real model skipped)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="bench-local-"))
    models.append(("tiny", build_tiny_model(tmp / "tiny")))

    rows = []
    llama_note = "llama.cpp: not measured (no real model)"
    for label, path in models:
        ModelId.parse(label)  # labels double as model names
        with_llama = path == real
        result, how = await bench_model(label, path, args.tokens, args.rounds, with_llama)
        rows.append((label, result))
        if with_llama:
            llama_note = how
    if "llamacpp_tok_s" in rows[0][1]:
        r = rows[0][1]
        llama_note = (
            f"llama.cpp via {llama_note}, same GGUF, same rounds: "
            f"{r['llamacpp_tok_s']:.1f} tok/s; generate / llama.cpp = "
            f"{ratio_cell(r['vs_llamacpp'], 3)}"
        )

    header = (
        "| model | tokens | raw tok/s | generate tok/s | generate / raw (min-max) | raw TTFT ms | "
        "generate TTFT ms | RSS per warm model MB | load s | empty hop µs |"
    )
    lines = [header, "|" + "---|" * 10]
    for label, r in rows:
        lines.append(
            f"| {label} | {r['tokens']:.0f} | {r['raw_tok_s']:.1f} | {r['tok_s']:.1f} | "
            f"{ratio_cell(r['ratio'], 3)} | {r['raw_ttft_ms']:.1f} | {r['ttft_ms']:.1f} | "
            f"{r['rss_mb']:.1f} | {r['load_s']:.2f} | {r['hop_us']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    print(llama_note)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    load = os.getloadavg()[0]
    if not args.no_doc:
        body = (
            f"## Local inference (`benchmarks/local.py`)\n\n"
            f"{datetime.date.today()}, {machine}, onnxruntime-genai {og.__version__}, "
            f"{args.tokens} greedy tokens, median of {args.rounds} interleaved rounds; "
            f"{RATIO_DEFINITION} "
            f"TTFT of generate counts from the call (template, tokenize, queue, prefill). "
            f"Load average {load:.1f} when it finished (the box is shared): the tiny "
            f"model's ~1 ms tokens are dominated by the cost of a thread hop, the real "
            f"model's are not.\n\n"
            f"{table}\n\n{llama_note}.\n"
        )
        write_section("local", body, ROOT / "docs" / "benchmarks.md")
    head = rows[0][1]
    fields = {**ratio_fields("generate_vs_raw", head["ratio"], 3), "tok_s": f"{head['tok_s']:.1f}"}
    if "llamacpp_tok_s" in head:
        fields["llamacpp_tok_s"] = f"{head['llamacpp_tok_s']:.1f}"
        fields |= ratio_fields("vs_llamacpp", head["vs_llamacpp"], 3)
    print(headline(fields))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per round")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per model")
    ap.add_argument("--model-dir", type=Path, default=REAL, help="the real model's directory")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    return trio.run(run, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
