"""``python -m p2pedge.registry serve|pull|publish``: run a registry, pull from one, publish.

``pull NAME[@VERSION] --registry URL [--store DIR] --trust KEY.pub|DIR`` fetches a model
into the local store with resumable, verified, parallel downloads and prints the
materialized directory.

``serve --root DIR --listen HOST:PORT [--token T] [--trust DIR] [--grants FILE]`` (token
also from ``$P2PEDGE_REGISTRY_TOKEN``; the grants file adds publisher keys to names, one
``NAME KEYHEX`` per line); ``publish DIR --name N --version V --category C --key KEY``
signs and stores locally into ``--root``, or uploads to ``--registry URL --token T``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from functools import partial
from pathlib import Path

import trio

from p2pedge.errors import ConfigError, OneLineParser, P2PEdgeError
from p2pedge.ids import ModelId
from p2pedge.models.keys import TrustStore
from p2pedge.models.manifest import DEFAULT_CHUNK_SIZE
from p2pedge.models.store import Store, store_home
from p2pedge.registry.app import is_reserved_version
from p2pedge.registry.client import RegistryClient
from p2pedge.registry.owners import Grants, load_grants
from p2pedge.registry.server import TOKEN_ENV, parse_listen, serve_registry


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="p2pedge registry", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a registry root over HTTP")
    serve.add_argument("--root", type=Path, required=True)
    serve.add_argument("--listen", default="127.0.0.1:8080")
    serve.add_argument("--token", default=None, help=f"bearer token for publishing (${TOKEN_ENV})")
    serve.add_argument("--trust", type=Path, default=None, help="only accept these publishers")
    serve.add_argument(
        "--grants",
        type=Path,
        default=None,
        help="file of 'NAME KEYHEX' lines: keys that may publish a name besides its owner",
    )
    pull = commands.add_parser("pull", help="pull a model from a registry into the store")
    pull.add_argument("model", help="NAME or NAME@VERSION")
    pull.add_argument("--registry", required=True, help="registry URL")
    pull.add_argument(
        "--store", type=Path, default=None, help="store root (default ~/.local/share/p2pedge/store)"
    )
    pull.add_argument(
        "--trust", type=Path, action="append", default=[], help="publisher .pub file or dir"
    )
    pull.add_argument("--trust-key", action="append", default=[], help="publisher key (hex)")
    pull.add_argument("--files", default=None, help="comma-separated subset of files (a shard)")
    pull.add_argument("--parallel", type=int, default=4, help="concurrent chunk downloads")
    pull.add_argument("--no-progress", action="store_true")
    publish = commands.add_parser("publish", help="sign a model dir and publish it")
    publish.add_argument("dir", type=Path)
    publish.add_argument("--name", required=True)
    publish.add_argument("--version", required=True)
    publish.add_argument("--category", required=True)
    publish.add_argument("--key", type=Path, required=True, help="ed25519 PEM private key")
    publish.add_argument("--tags", default="", help="comma-separated tags")
    publish.add_argument("--license", default="unknown")
    publish.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    publish.add_argument("--registry", default=None, help="registry URL (default: local --root)")
    publish.add_argument("--root", type=Path, default=None, help="local registry root")
    publish.add_argument("--token", default=None)
    return parser


async def _pull(args: argparse.Namespace) -> int:
    from p2pedge.models.pull import pull

    trust_paths = list(args.trust) or (
        [store_home() / "trusted"] if (store_home() / "trusted").is_dir() else []
    )
    trust = TrustStore.load(trust_paths, args.trust_key)
    if not len(trust):
        raise ConfigError("no trusted publisher keys: pass --trust KEY.pub|DIR or --trust-key HEX")
    store = Store(args.store or store_home() / "store")
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


async def _publish(args: argparse.Namespace) -> None:
    tags = [t for t in args.tags.split(",") if t]
    with tempfile.TemporaryDirectory() as scratch:
        store = Store(args.root if args.registry is None else Path(scratch))
        manifest = await trio.to_thread.run_sync(
            partial(
                store.add_model_dir,
                args.dir,
                args.name,
                args.version,
                args.category,
                args.key,
                tags=tags,
                license=args.license,
                chunk_size=args.chunk_size,
            )
        )
        if args.registry is not None:
            token = args.token or os.environ.get(TOKEN_ENV)
            async with RegistryClient(args.registry, token=token) as client:
                await client.publish(store, manifest.model)
    where = args.registry or args.root
    print(f"published {manifest.model} ({manifest.total_size} bytes) to {where}")


async def _serve(args: argparse.Namespace, trust: TrustStore | None, grants: Grants | None) -> None:
    """Serve until SIGINT or SIGTERM, then shut hypercorn down gracefully.

    Catching the signals as a shutdown trigger (rather than letting ``KeyboardInterrupt``
    tear through trio and hypercorn) is what keeps Ctrl-C free of a traceback.
    """
    host, port = parse_listen(args.listen)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def stop() -> None:
            async for _ in signals:
                return

        serve = partial(
            serve_registry,
            args.root,
            host,
            port,
            token=args.token,
            trust=trust,
            grants=grants,
            shutdown_trigger=stop,
        )
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve)
            where = f"[{host}]" if ":" in host else host
            print(f"registry serving {args.root} on http://{where}:{bound}", file=sys.stderr)


def _os_error(group: BaseException) -> OSError | None:
    """The first ``OSError`` in ``group`` (a bind failure arrives wrapped by trio)."""
    if isinstance(group, OSError):
        return group
    if isinstance(group, BaseExceptionGroup):
        for exc in group.exceptions:
            found = _os_error(exc)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "pull":
            return trio.run(_pull, args)
        if args.command == "serve":
            trust = TrustStore.from_dir(args.trust) if args.trust else None
            grants = load_grants(args.grants) if args.grants else None
            try:
                trio.run(_serve, args, trust, grants)
            except (OSError, BaseExceptionGroup) as exc:
                # Only a bind failure (port taken, address not ours) becomes one line.
                bind_error = _os_error(exc)
                if bind_error is None:
                    raise
                print(
                    f"error: cannot listen on {args.listen}: {bind_error.strerror}", file=sys.stderr
                )
                return 2
        else:
            if args.registry is None and args.root is None:
                raise SystemExit("publish needs --root DIR or --registry URL")
            model = ModelId(args.name, args.version)
            if is_reserved_version(model.version):
                raise ValueError(f"{model.version!r} is not a version: it names the newest one")
            if args.registry is None and model.version in Store(args.root).versions(model.name):
                raise ValueError(f"{model} is already published; versions are immutable")
            trio.run(_publish, args)
    except (P2PEdgeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0 if args.command == "serve" else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
