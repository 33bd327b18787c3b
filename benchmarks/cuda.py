"""CUDA check: the tiny model and the real SmolLM2 through ``p2pedge.runtime`` on the CUDA
execution provider and on CPU, in the same run on the same machine.

Needs ``onnxruntime-gpu`` and ``onnxruntime-genai-cuda`` (the CPU wheels have no CUDA
provider); the provider the runtime actually picked is printed next to every figure, so a
silent CPU fallback shows. This machine has no GPU: it was run once on a lent GPU machine and
its figures were copied into docs/benchmarks.md by hand (``--out`` writes the section).

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

from benchmarks._report import machine, table
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
    name: str, model_dir: Path, providers: tuple[str, ...], threads: int, args: argparse.Namespace
) -> dict[str, object]:
    model = load_model(model_dir, RuntimeConfig(providers=providers, intra_op_threads=threads))
    assert isinstance(model, GenaiModel)
    if model.provider != providers[0]:
        print(f"{name}: asked {providers[0]}, got {model.provider}: {why_not(model_dir)}")
    ids = model.encode_prompt(messages=STORY)
    timed_run(model, ids, args.tokens)  # warm-up: allocations, kernel selection
    runs = [timed_run(model, ids, args.tokens) for _ in range(args.rounds)]
    text = answer(model, FRANCE, 24)
    model.close()
    return {
        "model": name,
        "asked": providers[0],
        "used": model.provider,
        "threads": threads,
        "ttft_ms": statistics.median(r[0] for r in runs) * 1000,
        "tok_s": statistics.median(r[1] for r in runs),
        "tokens": runs[0][2],
        "france": text.strip().replace("\n", " ")[:60],
    }


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
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_model(Path(tmp) / "tiny", variant="lossless4", n_layers=4)
        models = [("tiny (4 layers)", tiny)]
        if args.real is not None:
            models.append(("SmolLM2-135M lossless4", args.real))
        for name, path in models:
            rows.append(measure(name, path, (CUDA, CPU), 1, args))
            rows.append(measure(name, path, (CPU,), args.cpu_threads, args))
    headers = ["model", "asked", "used", "threads", "TTFT ms", "decode tok/s", "tokens", "France"]
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
                r["tokens"],
                r["france"],
            ]
            for r in rows
        ],
    )
    print(body)
    section = (
        f"### CUDA check (`benchmarks/cuda.py`, {machine()})\n\n"
        f"onnxruntime {ort.__version__}, onnxruntime-genai {og.__version__}; greedy, "
        f"{args.tokens}-token story, median of {args.rounds} after a warm-up.\n\n{body}\n"
    )
    if args.out is not None:
        args.out.write_text(section)
    real = [r for r in rows if r["model"] != rows[0]["model"]] or rows
    cuda_row, cpu_row = real[0], real[1]
    ratio = float(cuda_row["tok_s"]) / float(cpu_row["tok_s"])  # type: ignore[arg-type]
    print(
        f"cuda_used={cuda_row['used'] == CUDA} cuda_tok_s={cuda_row['tok_s']:.1f} "
        f"cpu_tok_s={cpu_row['tok_s']:.1f} cuda_vs_cpu={ratio:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
