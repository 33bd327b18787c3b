"""``python -m p2pedge.models``: pull, list, verify, gc, keygen, import-gguf, import-hf.

``pull NAME[@VERSION] --registry URL [--store DIR] --trust KEY.pub|DIR`` fetches a model
into the local store with resumable, verified, parallel downloads and prints the
materialized directory. ``import-gguf`` is the converter's (``p2pedge.models.cli_import``),
``import-hf`` imports a Hugging Face directory (``p2pedge.models.convert.cli_hf``).
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from p2pedge.errors import ConfigError, P2PEdgeError
from p2pedge.ids import ModelId

DEFAULT_HOME = Path.home() / ".local" / "share" / "p2pedge"


def _home() -> Path:
    return Path(os.environ.get("P2PEDGE_HOME", DEFAULT_HOME))


def _store_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", type=Path, default=None, help="store root (default ~/.local/share/p2pedge/store)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pedge models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    pull = commands.add_parser("pull", help="pull a model from a registry into the store")
    pull.add_argument("model", help="NAME or NAME@VERSION")
    pull.add_argument("--registry", required=True, help="registry URL")
    _store_arg(pull)
    pull.add_argument(
        "--trust", type=Path, action="append", default=[], help="publisher .pub file or dir"
    )
    pull.add_argument("--trust-key", action="append", default=[], help="publisher key (hex)")
    pull.add_argument("--files", default=None, help="comma-separated subset of files (a shard)")
    pull.add_argument("--parallel", type=int, default=4, help="concurrent chunk downloads")
    pull.add_argument("--no-progress", action="store_true")
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


async def _pull(args: argparse.Namespace) -> int:
    from p2pedge.models.keys import TrustStore
    from p2pedge.models.pull import pull
    from p2pedge.models.store import Store
    from p2pedge.registry.client import RegistryClient

    trust_paths = list(args.trust) or (
        [_home() / "trusted"] if (_home() / "trusted").is_dir() else []
    )
    trust = TrustStore.load(trust_paths, args.trust_key)
    if not len(trust):
        raise ConfigError("no trusted publisher keys: pass --trust KEY.pub|DIR or --trust-key HEX")
    store = Store(args.store or _home() / "store")
    files = [f for f in args.files.split(",") if f] if args.files else None
    async with RegistryClient(args.registry) as registry:
        result = await pull(
            ModelId.parse(args.model), store, [registry], trust,
            files=files, per_source=args.parallel, progress=False if args.no_progress else None,
        )  # fmt: skip
    mb = result.fetched_bytes / 1e6
    rate = mb / result.seconds if result.seconds else 0.0
    summary = f"{mb:.1f} MB in {result.seconds:.2f} s ({rate:.1f} MB/s)"
    resumed = f"{result.reused_chunks} chunks resumed"
    print(f"pulled {result.manifest.model}: {summary}, {resumed}", file=sys.stderr)
    print(store.materialize(result.manifest.model, files))
    return 0


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
        if args.command == "pull":
            import trio

            return trio.run(partial(_pull, args))
        if args.command == "keygen":
            from p2pedge.models.keys import generate_key, public_key_hex, save_private_key

            key = generate_key()
            save_private_key(key, args.out)
            print(public_key_hex(key))
            return 0
        from p2pedge.models.store import Store

        store = Store(args.store or _home() / "store")
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
