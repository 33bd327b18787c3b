"""Per architecture: import time, decode speed against llama.cpp on the same GGUF, top-1
agreement with llama.cpp.

For each architecture the importer takes (llama, qwen2, qwen3, phi3, gemma2, gemma3) it
writes a random-weight GGUF of the chosen shape (``1b``: Llama-3.2-1B's blocks, 16 x 2048,
ffn 8192, 32/8 heads; ``tiny`` for a smoke run) as a Q4_K_M-like mix (Q4_K, with V and the
MLP's down projection Q6_K; ``p2pedge.testing.synthetic_gguf``), imports it with the default
variant (lossless4, int8 activations), then in each round decodes ``--tokens`` greedy
tokens after a 48-token prompt through onnxruntime-genai and through llama.cpp's Python
binding (``make llamacpp``; repacking off, so AMX-faulting CPUs survive), order rotating,
both on ``--threads`` threads. Harness shortcut: the synthetic vocabulary has ~300 tokens,
so the head is far cheaper than a real model's; the blocks are full size.
Agreement: teacher-forced top-1 over the prompt, our graph against llama.cpp's logits.
Every ratio is the median of paired per-round ratios with its min-max spread.

``python benchmarks/archs.py [--shape 1b|tiny] [--rounds R] [--tokens N] [--no-doc]``;
the last line is ``archs=<n> qtypes=<n> min_top1_vs_llamacpp=<x>
decode_vs_llamacpp_median=<r> decode_vs_llamacpp_min=<r>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import (  # noqa: E402
    RATIO_DEFINITION,
    machine,
    paired_ratio,
    ratio_cell,
    table,
    turns,
    write_section,
)
from p2pedge.models.convert.importer import import_gguf  # noqa: E402
from p2pedge.testing.llamacpp_fixtures import LLAMA_PY, PROMPT  # noqa: E402
from p2pedge.testing.synthetic_gguf import (  # noqa: E402
    SyntheticShape,
    SyntheticSpec,
    write_synthetic_gguf,
)

SHAPES = {
    "1b": SyntheticShape(n_layers=16, hidden=2048, n_heads=32, n_kv_heads=8, ffn=8192,
                         context_length=512),
    "tiny": SyntheticShape(context_length=256),
}  # fmt: skip
TOKENIZERS: dict[str, Any] = {
    "llama": "llama-bpe",
    "qwen2": "qwen2",
    "qwen3": "qwen2",
    "phi3": "llama-spm",
    "gemma2": "llama-spm",
    "gemma3": "llama-spm",
}
Q4_K_M = {"attn_v": "Q6_K", "ffn_down": "Q6_K"}
CLEAR_MARGIN = 0.6  # as tests/models/test_llamacpp_agreement.py


def _llama(path: Path, n_ctx: int, threads: int) -> Any:
    """llama.cpp's binding on ``path``, weight repacking off (AMX-faulting CPUs)."""
    if LLAMA_PY.is_dir() and str(LLAMA_PY) not in sys.path:
        sys.path.append(str(LLAMA_PY))
    import llama_cpp  # type: ignore[import-not-found]
    import llama_cpp.llama_cpp as low  # type: ignore[import-not-found]

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
            n_batch=len(PROMPT),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            verbose=False,
        )
    finally:
        low.llama_model_default_params = defaults


def _ours(model_dir: Path, threads: int) -> Any:
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
    return og.Model(config)


def _decode_ours(model: Any, n_tokens: int) -> float:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(PROMPT) + n_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(PROMPT)
    gen.generate_next_token()
    first, count = time.perf_counter(), 1
    while not gen.is_done():
        gen.generate_next_token()
        count += 1
    return (count - 1) / (time.perf_counter() - first)


def _decode_llama(llm: Any, n_tokens: int) -> float:
    llm.reset()
    count, first = 0, 0.0
    for _ in llm.generate(PROMPT, top_k=1, temp=0.0, reset=True):
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count == n_tokens:
            break
    return (count - 1) / (time.perf_counter() - first)


def _agreement(llm: Any, model_dir: Path) -> tuple[float, float]:
    """Teacher-forced top-1 over PROMPT, our graph's against llama.cpp's: at every position,
    and where llama.cpp's top two logits differ by more than CLEAR_MARGIN (elsewhere its
    own 8-bit activation rounding decides)."""
    import onnxruntime as ort

    llm.reset()
    llm.eval(PROMPT)
    scores = np.array(llm.scores[: len(PROMPT)])
    theirs = scores.argmax(-1)
    top2 = np.sort(scores, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > CLEAR_MARGIN
    facts = json.loads((model_dir / "p2pedge_model.json").read_text())
    sess = ort.InferenceSession(str(model_dir / "model.onnx"))
    n = len(PROMPT)
    empty = np.zeros((1, facts["n_kv_heads"], 0, facts["head_dim"]), np.float32)
    feeds: dict[str, Any] = {
        "input_ids": np.array([PROMPT], np.int64),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    for i in range(facts["n_layers"]):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    ours = sess.run(["logits"], feeds)[0][0].argmax(-1)
    hits = ours == theirs
    return float(np.mean(hits)), float(np.mean(hits[clear])) if clear.any() else float("nan")


def _measure(
    gguf: Path, model_dir: Path, tokens: int, rounds: int, threads: int
) -> tuple[dict[str, list[float]], tuple[float, float]]:
    """Decode tok/s per round for both sides, and the top-1 agreement."""
    ours = _ours(model_dir, threads)
    llm = _llama(gguf, len(PROMPT) + tokens + 8, threads)
    agreement = _agreement(llm, model_dir)
    sides: dict[str, Callable[[], float]] = {
        "ours": lambda: _decode_ours(ours, tokens),
        "llama.cpp": lambda: _decode_llama(llm, tokens),
    }
    _decode_ours(ours, 4), _decode_llama(llm, 4)  # warm-up, untimed
    speed: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in turns(list(sides), r):
            speed[name].append(sides[name]())
    return speed, agreement


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--archs", default=",".join(TOKENIZERS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    shape = SHAPES[args.shape]
    rows, ratios, agreements, qtypes = [], [], [], set()
    with tempfile.TemporaryDirectory(prefix="p2pedge-archs-") as tmp:
        for arch in args.archs.split(","):
            spec = SyntheticSpec(
                arch=arch,
                qtype="Q4_K",
                embd_qtype="Q6_K",
                overrides=Q4_K_M,
                tokenizer=TOKENIZERS[arch],
                shape=dataclasses.replace(shape, n_layers=max(shape.n_layers, 6))
                if arch == "gemma3"
                else shape,
                sliding_window=64,
                softcaps=(50.0, 30.0),  # Gemma 2's own caps (the test kit's bite harder)
            )
            gguf = write_synthetic_gguf(Path(tmp) / f"{arch}.gguf", spec)
            started = time.perf_counter()
            model_dir = import_gguf(gguf, Path(tmp) / arch, arch)
            import_s = time.perf_counter() - started
            facts = json.loads((model_dir / "p2pedge_model.json").read_text())
            qtypes |= {item.split(":")[0] for item in facts["quantization"].split(",")}
            speed, agreement = _measure(gguf, model_dir, args.tokens, args.rounds, args.threads)
            ratio = paired_ratio(speed["ours"], speed["llama.cpp"])
            ratios.append(ratio)
            agreements.append(agreement)
            rows.append(
                [
                    arch,
                    facts["quantization"],
                    f"{gguf.stat().st_size / 2**20:.0f}",
                    f"{import_s:.1f}",
                    f"{statistics.median(speed['ours']):.1f}",
                    f"{statistics.median(speed['llama.cpp']):.1f}",
                    ratio_cell(ratio),
                    f"{agreement[0]:.3f}",
                    f"{agreement[1]:.3f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    headers = ["arch", "types", "GGUF MiB", "import s", "ours tok/s", "llama.cpp tok/s",
               "ours / llama.cpp", "top-1 vs llama.cpp", "top-1 where clear"]  # fmt: skip
    body = table(headers, rows)
    print(body)
    if not args.no_doc:
        write_section(
            "archs",
            f"### Architectures (`benchmarks/archs.py --shape {args.shape}`)\n\n"
            f"{machine()}. Random-weight {args.shape}-shape GGUF per architecture "
            "(Q4_K_M-like: Q4_K, V and down Q6_K, Q6_K embedding; synthetic ~300-token "
            "vocabulary, so the head is cheap), imported as the default (lossless4, int8 "
            f"activations); decode of {args.tokens} tokens after a {len(PROMPT)}-token "
            f"prompt, {args.threads} threads, onnxruntime-genai vs llama.cpp's Python "
            f"binding (repacking off), {args.rounds} rounds. {RATIO_DEFINITION} "
            "Top-1: teacher-forced over the prompt against llama.cpp's logits, at every "
            "position and where llama.cpp's top two differ by more than 0.6.\n\n" + body,
        )
    medians = [r.median for r in ratios]
    fields = {
        "archs": str(len(rows)),
        "qtypes": str(len(qtypes)),
        "min_top1_vs_llamacpp": f"{min(a for a, _ in agreements):.3f}",
        "min_top1_clear_vs_llamacpp": f"{min(c for _, c in agreements if c == c):.3f}",
        "decode_vs_llamacpp_median": f"{statistics.median(medians):.2f}",
        "decode_vs_llamacpp_min": f"{min(medians):.2f}",
        "load": f"{os.getloadavg()[0]:.1f}",
    }
    print(" ".join(f"{k}={v}" for k, v in fields.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
