"""``python -m p2pedge.models``: list, verify, gc, keygen, import-gguf, import-hf.

Pulling from a registry is ``p2pedge pull`` (the registry's client, ``p2pedge.registry``).
``import-gguf`` is the converter's (``p2pedge.models.cli_import``),
``import-hf`` imports a Hugging Face directory (``p2pedge.models.convert.cli_hf``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from p2pedge.errors import P2PEdgeError
from p2pedge.ids import ModelId
from p2pedge.models.store import store_home


def _store_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", type=Path, default=None, help="store root (default ~/.local/share/p2pedge/store)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pedge models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list models in the store")
    _store_arg(listing)
    verify = commands.add_parser("verify", help="re-hash every blob of a stored model")
    verify.add_argument("model")
    _store_arg(verify)
    gc = commands.add_parser("gc", help="delete blobs no manifest references")
    _store_arg(gc)
    gc.add_argument("--partial", action="store_true", help="also drop unfinished pulls")
    keygen = commands.add_parser("keygen", help="write an ed25519 publisher key (+ .pub)")
    keygen.add_argument("out", type=Path)
    try:
        from p2pedge.models.cli_import import add_import_parser
    except ImportError:
        commands.add_parser("import-gguf", help="(converter not installed)")
    else:
        add_import_parser(commands)
    try:
        from p2pedge.models.convert.cli_hf import add_import_hf_parser
    except ImportError:
        commands.add_parser("import-hf", help="(converter not installed)")
    else:
        add_import_hf_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("import-gguf", "import-hf"):
        func = getattr(args, "func", None)
        if func is None:
            print("error: the model importer is not available", file=sys.stderr)
            return 2
        status: int = func(args)
        return status
    try:
        if args.command == "keygen":
            from p2pedge.models.keys import generate_key, public_key_hex, save_private_key

            key = generate_key()
            save_private_key(key, args.out)
            print(public_key_hex(key))
            return 0
        from p2pedge.models.store import Store

        store = Store(args.store or store_home() / "store")
        if args.command == "list":
            for model in store.list_models():
                info = store.describe(model)
                print(f"{model}\t{info['category']}\t{info['size']}")
        elif args.command == "verify":
            manifest = store.get_manifest(ModelId.parse(args.model))
            for entry in manifest.files:
                store.verify_blob(entry.sha256)
            print(f"{manifest.model}: {len(manifest.files)} files verified")
        elif args.command == "gc":
            print(f"freed {store.gc(drop_partial=args.partial)} bytes")
    except (P2PEdgeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
