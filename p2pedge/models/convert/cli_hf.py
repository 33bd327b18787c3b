"""``import-hf``: turn a Hugging Face model directory into a p2pedge model directory.

``python -m p2pedge.models import-hf DIR --name NAME [--quant Q4_1|Q4_0|Q8_0|F16|F32]
[--out DIR]`` (dispatched by ``p2pedge.models.__main__``). Families: llama, mistral, qwen2,
qwen3, phi3, gemma2, gemma3_text (``p2pedge.models.convert.hf_reader``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from p2pedge.errors import ConfigError, ModelLoadError

QUANTS = ("Q4_1", "Q4_0", "Q8_0", "F16", "F32")  # hf_reader.QUANTS, without importing gguf


def add_import_hf_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``import-hf`` on an ``argparse`` sub-parser set; sets ``func``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "import-hf", help="import a Hugging Face directory (safetensors)", description=__doc__
    )
    parser.add_argument("directory", type=Path, help="config.json + *.safetensors + tokenizer")
    parser.add_argument("--name", required=True, help="model name in the local store")
    parser.add_argument(
        "--quant",
        choices=QUANTS,
        default="Q4_1",
        help="block matrices as this GGUF type, embedding Q8_0 (default Q4_1); F16/F32 dense",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default .cache/models/NAME)"
    )
    parser.add_argument(
        "--fp32-activations",
        action="store_true",
        help="keep activations in fp32 (the exact variant: slower; the default rounds them "
        "to 8 bits per block, as llama.cpp does)",
    )
    parser.set_defaults(func=main_import_hf)
    return parser


def main_import_hf(args: argparse.Namespace) -> int:
    """Run the import described by ``args``; returns a process exit status."""
    from p2pedge.models.convert.importer import import_hf  # heavy: onnx, gguf

    out = args.out if args.out is not None else Path(".cache") / "models" / args.name
    started = time.perf_counter()
    try:
        path = import_hf(
            args.directory,
            out,
            args.name,
            quant=args.quant,
            int8_activations=not args.fp32_activations,
            report=print,
        )
    except (ModelLoadError, ConfigError) as exc:
        print(f"import-hf: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    print(
        f"imported {args.directory} as {args.name!r} ({args.quant}) into {path} in {elapsed:.1f} s"
    )
    return 0
