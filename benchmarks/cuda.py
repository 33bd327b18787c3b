"""CUDA check: the tiny model and the real SmolLM2 through ``p2pedge.runtime`` on the CUDA
execution provider and on CPU, in the same run on the same machine.

Needs ``onnxruntime-gpu`` and ``onnxruntime-genai-cuda`` (the CPU wheels have no CUDA
provider); the provider the runtime actually picked is printed next to every figure, so a
silent CPU fallback shows. This machine has no GPU: it was run once on a lent GPU machine and
its figures were copied into docs/benchmarks.md by hand (``--out`` writes the section).
CUDA and CPU decode in the same rounds, taking turns; CUDA / CPU is the median of the
per-round ratios, with its min-max.

``python benchmarks/cuda.py --real DIR [--tokens N] [--rounds R] [--out FILE]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import (
    RATIO_DEFINITION,
    Ratio,
    headline,
    machine,
    paired_ratio,
    ratio_cell,
    ratio_fields,
    table,
    turns,
)
from p2pedge.runtime.config import RuntimeConfig
from p2pedge.runtime.genai_model import GenaiModel
from p2pedge.runtime.loader import load_model
from p2pedge.runtime.providers import available_execution_providers, genai_available
from p2pedge.runtime.sampling import SamplingParams
from p2pedge.testing.tiny import build_tiny_model

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def timed_run(model: GenaiModel, ids: list[int], n_tokens: int) -> tuple[float, float, int]:
    """(time to first token s, decode tok/s after the first, tokens made), greedy."""
    gen = model.start(ids, SamplingParams(max_tokens=n_tokens))
    start = time.perf_counter()
    gen.step()
    first = time.perf_counter()
    while not gen.done:
        gen.step()
    end = time.perf_counter()
    made = gen.completion_tokens
    gen.close()
    return first - start, (made - 1) / (end - first) if made > 1 else float("nan"), made


def why_not(model_dir: Path) -> str:
    """The error onnxruntime-genai gives for CUDA on this directory (the runtime fell back)."""
    import onnxruntime_genai as og

    try:
        config = og.Config(str(model_dir))
        config.clear_providers()
        config.append_provider("cuda")
        og.Model(config)
    except Exception as exc:  # diagnostic only: show whatever the native loader raised
        return str(exc)
    return "no error when loading directly"


def answer(model: GenaiModel, messages: list[dict[str, str]], n_tokens: int) -> str:
    gen = model.start(model.encode_prompt(messages=messages), SamplingParams(max_tokens=n_tokens))
    pieces = []
    while not gen.done:
        pieces.append(gen.step().text)
    gen.close()
    return "".join(pieces)


def measure(
    name: str, model_dir: Path, args: argparse.Namespace
) -> tuple[list[dict[str, object]], Ratio]:
    """The model on CUDA (1 thread) and on CPU (``--cpu-threads``), both loaded, decoding
    in the same rounds (taking turns to go first): a row per side and CUDA / CPU."""
    sides = {
        "cuda": ((CUDA, CPU), 1),
        "cpu": ((CPU,), args.cpu_threads),
    }
    models: dict[str, GenaiModel] = {}
    for side, (providers, threads) in sides.items():
        config = RuntimeConfig(providers=providers, intra_op_threads=threads)
        model = load_model(model_dir, config)
        assert isinstance(model, GenaiModel)
        if model.provider != providers[0]:
            print(f"{name}: asked {providers[0]}, got {model.provider}: {why_not(model_dir)}")
        models[side] = model
    ids = models["cpu"].encode_prompt(messages=STORY)
    for model in models.values():
        timed_run(model, ids, args.tokens)  # warm-up: allocations, kernel selection
    runs: dict[str, list[tuple[float, float, int]]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in turns(list(sides), r):
            runs[side].append(timed_run(models[side], ids, args.tokens))
    rows: list[dict[str, object]] = []
    for side, (providers, threads) in sides.items():
        model = models[side]
        text = answer(model, FRANCE, 24)
        model.close()
        rows.append(
            {
                "model": name,
                "asked": providers[0],
                "used": model.provider,
                "threads": threads,
                "ttft_ms": statistics.median(r[0] for r in runs[side]) * 1000,
                "tok_s": statistics.median(r[1] for r in runs[side]),
                "tokens": runs[side][0][2],
                "france": text.strip().replace("\n", " ")[:60],
            }
        )
    rates = {side: [r[1] for r in runs[side]] for side in sides}
    return rows, paired_ratio(rates["cuda"], rates["cpu"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, help="imported SmolLM2 directory (lossless4)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, help="write the markdown section here")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import onnxruntime_genai as og

    print(f"onnxruntime {ort.__version__} providers={available_execution_providers()}")
    print(f"onnxruntime-genai {og.__version__} cuda={genai_available(CUDA)}")
    rows: list[dict[str, object]] = []
    ratios: list[Ratio] = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_model(Path(tmp) / "tiny", variant="lossless4", n_layers=4)
        models = [("tiny (4 layers)", tiny)]
        if args.real is not None:
            models.append(("SmolLM2-135M lossless4", args.real))
        for name, path in models:
            pair, ratio = measure(name, path, args)
            rows += pair
            ratios.append(ratio)
    headers = ["model", "asked", "used", "threads", "TTFT ms", "decode tok/s"]
    headers += ["CUDA / CPU (min-max)", "tokens", "France"]
    body = table(
        headers,
        [
            [
                r["model"],
                r["asked"],
                r["used"],
                r["threads"],
                f"{r['ttft_ms']:.1f}",
                f"{r['tok_s']:.1f}",
                ratio_cell(ratios[i // 2]) if i % 2 == 0 else "baseline",
                r["tokens"],
                r["france"],
            ]
            for i, r in enumerate(rows)
        ],
    )
    print(body)
    section = (
        f"### CUDA check (`benchmarks/cuda.py`, {machine()})\n\n"
        f"onnxruntime {ort.__version__}, onnxruntime-genai {og.__version__}; greedy, "
        f"{args.tokens}-token story, median of {args.rounds} interleaved rounds after a "
        f"warm-up. {RATIO_DEFINITION}\n\n{body}\n"
    )
    if args.out is not None:
        args.out.write_text(section)
    cuda_row, cpu_row = rows[-2], rows[-1]  # the real model's when it ran, else the tiny's
    fields = {
        "cuda_used": str(cuda_row["used"] == CUDA),
        "cuda_tok_s": f"{cuda_row['tok_s']:.1f}",
        "cpu_tok_s": f"{cpu_row['tok_s']:.1f}",
        **ratio_fields("cuda_vs_cpu", ratios[-1]),
    }
    print(headline(fields))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
