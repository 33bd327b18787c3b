"""``import-gguf``: turn a llama.cpp GGUF file into a p2pedge model directory.

``python -m p2pedge.models import-gguf FILE --name NAME [--variant lossless4|fp32] [--out DIR]``
(dispatched by ``p2pedge.models.__main__``); this module also runs on its own as
``python -m p2pedge.models.cli_import FILE --name NAME ...``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from p2pedge.errors import ConfigError, ModelLoadError

VARIANTS = ("lossless4", "fp32")


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "gguf", type=Path, help="llama.cpp GGUF file (llama, qwen2, qwen3, phi3, gemma2 or gemma3)"
    )
    parser.add_argument("--name", required=True, help="model name in the local store")
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="lossless4",
        help="lossless4: the file's quantised blocks as MatMulNBits, no weight rounded "
        "(default); fp32: dequantised",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default .cache/models/NAME)"
    )
    parser.add_argument(
        "--fp32-activations",
        action="store_true",
        help="lossless4 only: keep activations in fp32 (the exact variant: slower; the "
        "default rounds them to 8 bits per block, as llama.cpp does)",
    )
    parser.add_argument(
        "--int8-limbs",
        action="store_true",
        help="lossless4 only: fp32-exact activations as three int8 limbs (implies "
        "--fp32-activations; faster on x86, see docs/model-format.md)",
    )
    parser.set_defaults(func=main_import)
    return parser


def add_import_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``import-gguf`` on an ``argparse`` sub-parser set; sets ``func=main_import``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "import-gguf", help="import a GGUF file as an ONNX model directory", description=__doc__
    )
    return _configure(parser)


def main_import(args: argparse.Namespace) -> int:
    """Run the import described by ``args``; returns a process exit status."""
    from p2pedge.models.convert.importer import import_gguf  # heavy: onnx, gguf

    out = args.out if args.out is not None else Path(".cache") / "models" / args.name
    started = time.perf_counter()
    try:
        path = import_gguf(
            args.gguf,
            out,
            args.name,
            variant=args.variant,
            int8_activations=not (args.fp32_activations or args.int8_limbs),
            int8_limbs=args.int8_limbs,
            report=print,
        )
    except (ModelLoadError, ConfigError) as exc:
        print(f"import-gguf: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    print(f"imported {args.gguf} as {args.name!r} ({args.variant}) into {path} in {elapsed:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="import-gguf", description=__doc__))
    return main_import(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
