"""Node configuration: the user-facing :class:`NodeConfig` and its internal :class:`Tuning`,
frozen dataclasses validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from p2pedge.errors import ConfigError
from p2pedge.ids import LayerRange
from p2pedge.node.limits import Limits
from p2pedge.planning.slowdown import SlowdownPolicy
from p2pedge.planning.verification import VerifyPolicy
from p2pedge.reach.relay import RelayPolicy


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "p2pedge"


@dataclass(frozen=True)
class ServeSpec:
    """A shard this node serves; ``layers`` None lets placement choose."""

    model: str
    layers: LayerRange | None = None

    @classmethod
    def parse(cls, text: str) -> ServeSpec:
        model, sep, span = text.rpartition(":")
        if not sep:
            return cls(text)
        try:
            return cls(model, LayerRange.parse(span))
        except ValueError as exc:
            raise ConfigError(f"bad --serve {text!r}: {exc}") from exc


@dataclass(frozen=True)
class Tuning:
    """Internal knobs: timeouts, cadences, the sharded path's modes, and switches tests and
    simulations turn off. The defaults are what the node is built and measured for; a
    deployment sets only the user-facing :class:`NodeConfig` fields."""

    announce_interval: float = 60.0  # seconds between announces of our card
    card_ttl_factor: float = 3.0  # a card lives this many announce intervals
    dht_timeout: float = 10.0  # a DHT query, and a dial outside a private swarm
    # a dial inside a private swarm: a peer with another key never answers, so fail fast
    private_dial_timeout: float = 3.0
    self_lookup: bool = True  # look our own id up after bootstrap to fill the routing table
    announce_on_start: bool = True  # False: the caller starts the announce loop
    measure_compute: bool = True  # False: no benchmark of this machine's GFLOP/s at start
    shard_step_timeout: float = 10.0  # a shard server's decode step, before recovery
    shard_push: bool = True  # prompts and decode steps go server to server; False relays
    shard_ring: bool = True  # greedy decode goes round the chain without us (needs push)
    # leave a shard server whose decode steps turn slow mid-session for a replica; None stays
    shard_slowdown: SlowdownPolicy | None = field(default_factory=SlowdownPolicy)
    # spot-check shard servers on replicas (a hop nobody else serves stays unchecked); a
    # mismatch bans the server and replays onto an honest one; None trusts every server
    shard_verify: VerifyPolicy | None = field(default_factory=VerifyPolicy)
    inline_step_ms: float = 50.0  # decode steps this short skip the worker thread; 0: never
    hole_punch: bool = True  # DCUtR: upgrade a relayed connection to a direct one

    def __post_init__(self) -> None:
        if not 0 <= self.inline_step_ms <= 1000:
            raise ConfigError(f"inline_step_ms must be 0..1000, got {self.inline_step_ms}")
        if self.announce_interval <= 0:
            raise ConfigError("announce_interval must be positive")
        if self.card_ttl_factor < 1:
            raise ConfigError("card_ttl_factor must be at least 1")

    @property
    def card_ttl(self) -> float:
        return self.announce_interval * self.card_ttl_factor


@dataclass(frozen=True)
class NodeConfig:
    """What a user sets: where the node keeps its data, how it joins (or closes) a swarm,
    which models it holds and serves, and the API. ``limits`` bound what peers may hold of
    this node; ``tuning`` holds the internal knobs."""

    data_dir: Path = field(default_factory=default_data_dir)
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    local_only: bool = False
    mdns: bool = False
    psk_file: Path | None = None
    allow_peers: tuple[str, ...] = ()
    # behind NAT: hold a slot on these relays (.../p2p/ID) and list the circuit addresses
    # in our card; a public node may lend slots itself (a RelayPolicy; None: it does not)
    reserve: tuple[str, ...] = ()
    relay: RelayPolicy | None = None
    models_dir: Path | None = None
    model_dirs: tuple[tuple[str, Path], ...] = ()
    serve: tuple[ServeSpec, ...] = ()
    # where a shard server also fetches the files of a model it does not hold (peers first)
    registry: str | None = None
    trusted_publishers: tuple[Path, ...] = ()
    threads: int = 0  # onnxruntime threads; 0: all cores
    # bytes the shards this node serves may take (weights and KV caches); None: no bound.
    # With it, placement picks blocks that fit, and sessions past it are refused
    memory_budget: int | None = None
    direct_lane: bool = True
    direct_lane_port: int = 0  # 0: the OS picks; fix it to open one port in a firewall
    api: str | None = None  # HOST:PORT of the OpenAI-compatible API; None: off
    api_key_file: Path | None = None  # bearer key on its first line; None: no key
    api_cors_origins: tuple[str, ...] = ()  # browser origins allowed ("*": any)
    limits: Limits = field(default_factory=Limits)  # what peers may hold of this node
    tuning: Tuning = field(default_factory=Tuning)  # internal knobs

    def __post_init__(self) -> None:
        # "~" means the home directory wherever a path is given (not a directory named "~")
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        for name in ("models_dir", "psk_file", "api_key_file"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())
        for name in (
            "listen",
            "bootstrap",
            "allow_peers",
            "reserve",
            "serve",
            "trusted_publishers",
            "model_dirs",
            "api_cors_origins",
        ):
            value = getattr(self, name)
            if isinstance(value, str | Path):
                raise ConfigError(f"{name} must be a sequence, not a single {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(
            self, "trusted_publishers", tuple(Path(p).expanduser() for p in self.trusted_publishers)
        )
        object.__setattr__(
            self, "model_dirs", tuple((n, Path(p).expanduser()) for n, p in self.model_dirs)
        )
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConfigError(f"memory_budget must be positive bytes, got {self.memory_budget}")
        if not 0 <= self.direct_lane_port <= 65535:
            raise ConfigError(f"direct_lane_port must be 0..65535, got {self.direct_lane_port}")
        if self.relay is not None and not isinstance(self.relay, RelayPolicy):
            raise ConfigError(f"relay must be a RelayPolicy or None, got {self.relay!r}")
        if not isinstance(self.tuning, Tuning) or not isinstance(self.limits, Limits):
            raise ConfigError("tuning must be a Tuning and limits a Limits")
        from p2pedge.node.addresses import check_multiaddr

        for addr in (*self.listen, *self.bootstrap, *self.reserve):
            check_multiaddr(addr)
        if self.api is not None:
            from p2pedge.api.server import parse_api_listen

            parse_api_listen(self.api)  # ConfigError on a bad value
        for spec in self.serve:
            if not isinstance(spec, ServeSpec):
                raise ConfigError(f"serve entries must be ServeSpec, got {spec!r}")
