"""A shard's decode step with its KV cache appended in place against the plain
copy-per-step path, on SmolLM2-135M-Instruct (lossless 4-bit) shards, in one process.

Both sessions run the same shard graph on the same inputs, taking turns to go first, and
their outputs are checked to be bit-identical. The plain path hands onnxruntime the whole
cache as inputs and gets a new, longer copy back every step (O(length) per token); the
in-place path binds one buffer per block as both past and present, which GroupQueryAttention
appends to, as onnxruntime-genai does for whole models.

Run ``make model`` first, then ``python benchmarks/kv_in_place.py [--steps N] [--no-doc]``;
shard graphs are built on first use under ``.cache/bench-sharded`` (shared with sharded.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import (  # noqa: E402
    RATIO_DEFINITION,
    Ratio,
    headline,
    machine,
    paired_ratio,
    ratio_cell,
    ratio_fields,
    table,
    write_section,
)
from p2pedge.ids import LayerRange  # noqa: E402
from p2pedge.protocols.pipeline.serving import ensure_shard_dir  # noqa: E402
from p2pedge.runtime.config import RuntimeConfig  # noqa: E402
from p2pedge.runtime.shard_session import ShardModel  # noqa: E402
from p2pedge.testing.tiny import REAL_MODEL_NAME, models_dir  # noqa: E402

SHARDS = {"10-20": "shard1", "0-30": "whole"}  # where sharded.py keeps them
PROMPT = 40
WINDOW = 60  # steps per reported window


def load(layers: str, in_place: bool) -> ShardModel:
    shard_dir = ensure_shard_dir(
        models_dir() / REAL_MODEL_NAME,
        LayerRange.parse(layers),
        ROOT / ".cache" / "bench-sharded" / SHARDS[layers] / "shards",
    )
    model = ShardModel.from_dir(shard_dir, RuntimeConfig(intra_op_threads=1))
    if not model.shares_kv:
        raise RuntimeError(f"{layers}: the shard cannot append its KV in place")
    model.shares_kv = in_place
    return model


def paired(layers: str, steps: int) -> tuple[list[float], list[float]]:
    """Per-step seconds, in place and plain, position by position."""
    in_place, plain = load(layers, True), load(layers, False)
    a, b = in_place.new_session(PROMPT + steps), plain.new_session(PROMPT + steps)
    rng = np.random.default_rng(0)
    first = in_place.info.first

    def inputs(n: int) -> np.ndarray:
        if first:
            return rng.integers(0, 1000, (1, n)).astype(np.int64)
        return rng.standard_normal((1, n, in_place.info.hidden)).astype(np.float32)

    x = inputs(PROMPT)
    a.step(x, 0)
    b.step(x, 0)
    took: dict[int, list[float]] = {0: [], 1: []}
    for i in range(steps):
        x = inputs(1)
        outs = {}
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            began = time.perf_counter()
            outs[k] = (a, b)[k].step(x, PROMPT + i)
            took[k].append(time.perf_counter() - began)
        if not np.array_equal(outs[0], outs[1]):
            raise RuntimeError(f"{layers}: outputs differ at position {PROMPT + i}")
    return took[0], took[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="decode steps per shard")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    began = time.perf_counter()
    rows = []
    ratios: dict[str, Ratio] = {}
    for layers, steps in (("10-20", args.steps), ("0-30", min(args.steps, 200))):
        in_place, plain = paired(layers, steps)
        for lo in (0, steps - WINDOW):
            window = slice(lo, lo + WINDOW)
            ip, pl = statistics.median(in_place[window]), statistics.median(plain[window])
            pairs = list(zip(plain[window], in_place[window], strict=True))
            saved = statistics.median(p - q for p, q in pairs)
            ratio = paired_ratio(plain[window], in_place[window])
            where = f"{PROMPT + lo}-{PROMPT + lo + WINDOW}"
            rows.append(
                [
                    f"blocks {layers}, positions {where} (random inputs)",
                    f"{ip * 1000:.2f}",
                    f"{pl * 1000:.2f}",
                    f"{saved * 1000:.2f}",
                    ratio_cell(ratio, 3),
                ]
            )
            ratios[f"{layers}@{PROMPT + lo + WINDOW}"] = ratio
    body = "\n\n".join(
        [
            "## KV cache appended in place (benchmarks/kv_in_place.py)",
            f"Measured {machine()}.",
            table(
                [
                    "shard, decode positions",
                    "in place ms",
                    "copy per step ms",
                    "saved per step ms (paired median)",
                    "speed-up (min-max)",
                ],
                rows,
            ),
            "- One process, 1 onnxruntime thread, the same random inputs for both sessions, "
            "taking turns to go first; every output was bit-identical. Medians over "
            f"{WINDOW}-step windows at the start and end of the run; a round is one decode "
            "step of both sessions, and saved is the median of the per-step differences. "
            f"{RATIO_DEFINITION}\n"
            "- Shard servers use the in-place path for GroupQueryAttention graphs on CPU "
            "(`ShardModel.shares_kv`); other graphs and providers keep the copy.\n"
            f"- (took {time.perf_counter() - began:.0f} s)",
        ]
    )
    print(body)
    if not args.no_doc:
        write_section("kv_in_place", body)
    long_key = f"10-20@{PROMPT + args.steps}"
    short_key = f"10-20@{PROMPT + WINDOW}"
    fields = ratio_fields("kv_in_place_short", ratios[short_key], 3)
    print(headline(fields | ratio_fields("kv_in_place_long", ratios[long_key], 3)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
