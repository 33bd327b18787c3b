"""``python -m p2pedge.node``: join a swarm, serve, or list peers.

Bad addresses or key files give a one-line error and exit code 2; SIGINT and SIGTERM
shut the node down cleanly with exit code 0 and no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from p2pedge.errors import ConfigError, OneLineParser, P2PEdgeError
from p2pedge.node.config import (
    ApiConfig,
    NodeConfig,
    PrivateSwarm,
    Reach,
    ServeSpec,
    Tuning,
    default_data_dir,
)
from p2pedge.node.limits import Limits
from p2pedge.reach.relay import RelayPolicy
from p2pedge.records.card import CapabilityCard

EXIT_USAGE = 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", action="append", default=None, help="multiaddr to listen on (repeatable)"
    )
    parser.add_argument(
        "--bootstrap", action="append", default=[], help="full multiaddr of a peer (repeatable)"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="identity and caches")
    parser.add_argument("--psk-file", type=Path, default=None, help="private swarm pre-shared key")
    parser.add_argument(
        "--allow-peer", action="append", default=[], help="only these peer ids (repeatable)"
    )
    parser.add_argument("--mdns", action="store_true", help="discover peers on the LAN")
    parser.add_argument(
        "--announce-interval", type=float, default=None, help="seconds between announces (60)"
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML file of settings; flags override it"
    )
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="p2pedge node", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="join the swarm and stay (default)")
    _common(run)
    run.add_argument(
        "--serve", action="append", default=[], help="MODEL[:START-END] shard to serve"
    )
    run.add_argument("--models-dir", type=Path, default=None, help="model store root")
    run.add_argument(
        "--registry", default=None, help="registry URL to fetch a served model's files from"
    )
    run.add_argument(
        "--trust",
        dest="trusted",
        action="append",
        default=[],
        type=Path,
        metavar="KEY.pub",
        help="publisher key whose signed manifests are trusted (repeatable)",
    )
    run.add_argument(
        "--model",
        dest="model_dirs",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="use an imported model directory",
    )
    run.add_argument(
        "--threads", type=int, default=None, help="onnxruntime threads (default: all cores)"
    )
    run.add_argument(
        "--inline-step-ms",
        type=float,
        default=None,
        help="serve decode steps up to this long without a worker-thread hop (50; 0: never)",
    )
    run.add_argument(
        "--lane-port",
        type=int,
        default=None,
        help="TCP port of the direct lane for shard traffic (default: the OS picks)",
    )
    run.add_argument(
        "--memory-budget",
        type=_bytes,
        default=None,
        metavar="SIZE",
        help="bytes the served shards may take, weights and KV caches (e.g. 2G, 512M)",
    )
    run.add_argument(
        "--relay",
        action="store_true",
        help="lend relay slots to peers behind NAT (circuit relay v2; a public node's role)",
    )
    run.add_argument(
        "--reserve",
        action="append",
        default=[],
        metavar="RELAY_ADDR",
        help="behind NAT: hold a slot on this relay (.../p2p/ID) and announce it (repeatable)",
    )
    run.add_argument(
        "--upnp",
        action="store_true",
        help="ask the home router to forward the listen port (UPnP) and announce its address",
    )
    run.add_argument(
        "--no-hole-punch",
        dest="hole_punch",
        action="store_const",
        const=False,
        default=None,
        help="keep relayed connections relayed (no DCUtR)",
    )
    run.add_argument(
        "--no-direct-lane",
        action="store_true",
        help="carry shard traffic over libp2p streams only",
    )
    run.add_argument(
        "--api",
        default=None,
        metavar="HOST:PORT",
        help="serve the OpenAI-compatible API (PORT alone binds 127.0.0.1)",
    )
    run.add_argument(
        "--api-key-file", type=Path, default=None, help="require this bearer key (first line)"
    )
    run.add_argument(
        "--api-cors",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="browser origin allowed to call the API (repeatable; * for any)",
    )
    peers = sub.add_parser("peers", help="join, print the verified cards, exit")
    _common(peers)
    peers.add_argument("--model", default=None, help="only peers with this model cached")
    return parser


# what a --config TOML file may set: NodeConfig's fields, by the same names. The grouped
# ones are tables of their dataclass's fields: [private], [reach] (its relay true, false or
# a table), [api] (or api = "HOST:PORT"), [tuning] and [limits] (nesting: [limits.blob], ...)
FILE_FIELDS = frozenset(
    {
        "data_dir", "listen", "bootstrap", "private", "reach", "serve", "models_dir",
        "registry", "trusted_publishers", "model_dirs", "memory_budget", "direct_lane",
        "api", "tuning", "limits",
    }
)  # fmt: skip
# flags that set a Tuning field, and a Reach field
TUNING_FLAGS = ("announce_interval", "inline_step_ms", "threads")
REACH_FLAGS = ("mdns", "relay", "reserve", "hole_punch", "upnp")
API_FLAGS = {"api": "listen", "api_key_file": "key_file", "api_cors": "cors_origins"}


def read_config_file(path: Path) -> dict[str, Any]:
    """NodeConfig fields from a TOML file (``model_dirs`` as a table of NAME = DIR; the
    grouped settings as tables of their dataclasses' fields)."""
    try:
        data = tomllib.loads(path.expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    unknown = sorted(set(data) - FILE_FIELDS)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    fields: dict[str, Any] = {}
    for key, value in data.items():
        if key == "serve":
            value = [ServeSpec.parse(str(s)) for s in _list(path, key, value)]
        elif key == "model_dirs":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: model_dirs must be a table of NAME = DIR")
            value = [(str(name), Path(str(d))) for name, d in value.items()]
        elif key == "direct_lane" and value is False:
            value = None
        elif key == "reach":
            if isinstance(value, dict) and isinstance(value.get("relay"), bool | dict):
                relay = value.pop("relay")
                if isinstance(relay, bool):
                    value["relay"] = RelayPolicy() if relay else None
                else:
                    value["relay"] = _table(path, "reach.relay", RelayPolicy(), relay)
            value = _table(path, key, Reach(), value)
        elif key == "api":
            value = (
                ApiConfig(str(value)) if isinstance(value, str) else _table(path, key, None, value)
            )
        elif key == "private":
            value = _table(path, key, None, value)
        elif key in ("tuning", "limits"):
            value = _table(path, key, Tuning() if key == "tuning" else Limits(), value)
        elif isinstance(value, list):
            value = _list(path, key, value)
        fields[key] = tuple(value) if isinstance(value, list) else value
    return fields


def _table(path: Path, where: str, default: Any, value: Any) -> Any:
    """``default`` (a frozen dataclass) with the TOML table's fields replaced; nested
    dataclasses take nested tables. ``default`` None builds the group's dataclass from the
    table alone (``private``, ``api``)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a table")
    if default is None:
        kind = {"private": PrivateSwarm, "api": ApiConfig}[where]
        known_names = {f.name for f in dataclasses.fields(kind)}
        if unknown := sorted(set(value) - known_names):
            raise ConfigError(f"{path}: unknown setting {where}.{unknown[0]}")
        try:
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        except (TypeError, ValueError, P2PEdgeError) as exc:
            raise ConfigError(f"{path}: bad {where}: {exc}") from exc
    known = {f.name: f for f in dataclasses.fields(default)}
    changes: dict[str, Any] = {}
    for name, item in value.items():
        if name not in known:
            raise ConfigError(f"{path}: unknown setting {where}.{name}")
        current = getattr(default, name)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            item = _table(path, f"{where}.{name}", current, item)
        elif isinstance(item, list):
            item = tuple(item)
        changes[name] = item
    try:
        return dataclasses.replace(default, **changes)
    except (TypeError, ValueError, P2PEdgeError) as exc:  # a limit's own check, too
        raise ConfigError(f"{path}: bad {where}: {exc}") from exc


def _list(path: Path, key: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: {key} must be a list")
    return value


def _config(args: argparse.Namespace, *, throwaway: bool = False) -> NodeConfig:
    """The config file's settings (``--config``), overridden by the flags given."""
    fields = read_config_file(args.config) if args.config is not None else {}
    lane_off, lane_port = getattr(args, "no_direct_lane", False), getattr(args, "lane_port", None)
    flags: dict[str, Any] = {
        "data_dir": args.data_dir,
        "listen": tuple(args.listen or ()),
        "bootstrap": tuple(args.bootstrap),
        "serve": tuple(ServeSpec.parse(s) for s in getattr(args, "serve", [])),
        "models_dir": getattr(args, "models_dir", None),
        "registry": getattr(args, "registry", None),
        "trusted_publishers": tuple(getattr(args, "trusted", [])),
        "model_dirs": tuple(_model_dir(m) for m in getattr(args, "model_dirs", [])),
        "memory_budget": getattr(args, "memory_budget", None),
        "direct_lane": None if lane_off else lane_port,
    }
    fields.update({key: value for key, value in flags.items() if value not in (None, ())})
    if lane_off:
        fields["direct_lane"] = None
    private = {"psk_file": args.psk_file, "allow_peers": tuple(args.allow_peer)}
    private = {k: v for k, v in private.items() if v not in (None, ())}
    if private:
        current = fields.get("private")
        fields["private"] = (
            dataclasses.replace(current, **private) if current else PrivateSwarm(**private)
        )
    _group(fields, "tuning", Tuning(), {k: getattr(args, k, None) for k in TUNING_FLAGS})
    reach = {k: getattr(args, k, None) for k in REACH_FLAGS}
    reach["mdns"] = True if reach["mdns"] else None
    reach["upnp"] = True if reach["upnp"] else None
    reach["relay"] = RelayPolicy() if reach["relay"] else None
    reach["reserve"] = tuple(reach["reserve"] or ())
    _group(fields, "reach", Reach(), reach)
    api = {field: getattr(args, flag, None) for flag, field in API_FLAGS.items()}
    api["cors_origins"] = tuple(api["cors_origins"] or ())
    if api["listen"] is None and fields.get("api") is None:
        if any(v not in (None, ()) for v in api.values()):
            raise ConfigError("--api-key-file and --api-cors need --api HOST:PORT")
    else:
        _group(fields, "api", fields.get("api") or ApiConfig(str(api["listen"])), api)
    if "data_dir" not in fields:
        fields["data_dir"] = (
            Path(tempfile.mkdtemp(prefix="p2pedge-")) if throwaway else default_data_dir()
        )
    try:
        return NodeConfig(**fields)
    except (TypeError, ValueError) as exc:  # a wrongly typed setting in the file
        raise ConfigError(f"bad setting: {exc}") from exc


def _group(fields: dict[str, Any], key: str, default: Any, changes: dict[str, Any]) -> None:
    """``fields[key]`` (or ``default``) with the flags given (not None, not empty) set."""
    changes = {k: v for k, v in changes.items() if v not in (None, ())}
    if changes or key in fields:
        fields[key] = dataclasses.replace(fields.get(key) or default, **changes)


def _bytes(text: str) -> int:
    """``2G``, ``512M``, ``300K`` or plain bytes (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = (text[:-1], units[text[-1].upper()]) if text[-1:].upper() in units else (text, 1)
    try:
        value = int(float(number) * unit)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return value


def _model_dir(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not Path(path).is_dir():
        raise ConfigError(f"--model needs NAME=DIR with an existing directory, got {text!r}")
    return name, Path(path)


class Printer:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def event(self, name: str, text: str, **fields: Any) -> None:
        if self.as_json:
            print(json.dumps({"event": name, **fields}), flush=True)
        else:
            print(text, flush=True)


def card_summary(card: CapabilityCard) -> dict[str, Any]:
    data = asdict(card)
    data["public_key"] = card.public_key.hex()
    return data


async def run_node(args: argparse.Namespace, printer: Printer) -> None:
    from p2pedge.node.node import Node

    async with Node(_config(args)) as node:
        for layers in node.card.layers_served:
            printer.event(
                "serving",
                f"serving {layers.model} blocks {layers.start}-{layers.end}",
                model=layers.model,
                start=layers.start,
                end=layers.end,
            )
        printer.event(
            "listening",
            "\n".join(f"listening {a}" for a in node.addrs),
            peer_id=node.peer_id,
            addrs=node.addrs,
        )
        if node.api_port is not None and node.config.api is not None:
            from p2pedge.api.server import parse_api_listen

            url = f"http://{parse_api_listen(node.config.api.listen)[0]}:{node.api_port}/v1"
            printer.event("api", f"api {url}", url=url)
        await node.announced()
        printer.event("announced", "card announced", peer_id=node.peer_id)
        await trio.sleep_forever()


async def list_peers(args: argparse.Namespace, printer: Printer) -> None:
    from p2pedge.node.node import Node

    config = _config(args, throwaway=True)
    async with Node(config) as node:
        if not node.network.known_peers():
            raise ConfigError("could not join the swarm: no bootstrap peer answered")
        cards = [c for c in await node.find_peers(args.model) if c.peer_id != node.peer_id]
        for card in cards:
            models = ",".join(m.id for m in card.models) or "-"
            printer.event(
                "peer",
                f"{card.peer_id}  {card.os}/{card.arch} cores={card.cpu_cores} "
                f"gflops={card.compute_gflops:.1f} models={models} addrs={' '.join(card.addrs)}",
                card=card_summary(card),
            )
        printer.event("done", f"{len(cards)} peer(s)", count=len(cards))


async def _unwrapped(
    command: Callable[[argparse.Namespace, Printer], Any],
    args: argparse.Namespace,
    printer: Printer,
) -> None:
    """Run ``command`` until it ends or a signal arrives; surface a lone error as itself.

    The signal receiver stays open for the whole run, so a second Ctrl-C during
    shutdown is absorbed instead of raising KeyboardInterrupt mid-cleanup.
    """
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as watcher:
                work = trio.CancelScope()

                async def cancel_on_signal() -> None:
                    async for _ in signals:
                        work.cancel()

                watcher.start_soon(cancel_on_signal)
                with work:
                    await command(args, printer)
                watcher.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        errors = group.exceptions
        while len(errors) == 1 and isinstance(errors[0], BaseExceptionGroup):
            errors = errors[0].exceptions
        if len(errors) == 1:
            raise errors[0] from None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")  # `run` is the default; plain --help lists every subcommand
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    printer = Printer(args.json)
    command = run_node if args.command == "run" else list_peers
    try:
        trio.run(_unwrapped, command, args, printer)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except P2PEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
