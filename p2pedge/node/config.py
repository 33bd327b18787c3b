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
    threads: int = 0  # onnxruntime's threads per session; 0: all cores

    def __post_init__(self) -> None:
        if not 0 <= self.inline_step_ms <= 1000:
            raise ConfigError(f"inline_step_ms must be 0..1000, got {self.inline_step_ms}")
        if self.announce_interval <= 0:
            raise ConfigError("announce_interval must be positive")
        if self.card_ttl_factor < 1:
            raise ConfigError("card_ttl_factor must be at least 1")
        if self.threads < 0:
            raise ConfigError(f"threads must be 0 (all cores) or more, got {self.threads}")

    @property
    def card_ttl(self) -> float:
        return self.announce_interval * self.card_ttl_factor


@dataclass(frozen=True)
class PrivateSwarm:
    """A closed swarm: a pre-shared key (libp2p pnet; a peer without it cannot even
    finish a handshake) and/or an allow-list of peer ids (every other peer's connection
    is closed on sight). Either alone is allowed."""

    psk_file: Path | None = None
    allow_peers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.psk_file is not None:
            object.__setattr__(self, "psk_file", Path(self.psk_file).expanduser())
        _as_tuple(self, "allow_peers")
        if self.psk_file is None and not self.allow_peers:
            raise ConfigError("a private swarm needs a psk_file, allow_peers, or both")


@dataclass(frozen=True)
class Reach:
    """How peers find and reach this node beyond direct dials: mDNS on the LAN, slots on
    relays (behind NAT; the circuit addresses go into our card), a relay for others (a
    public node; a :class:`RelayPolicy` bounds what it lends), DCUtR hole punching, which
    upgrades a relayed connection to a direct one, and a UPnP port mapping on the home
    router (its public address goes into our card)."""

    mdns: bool = False
    reserve: tuple[str, ...] = ()  # relays to hold a slot on, as .../p2p/ID multiaddrs
    relay: RelayPolicy | None = None
    hole_punch: bool = True
    upnp: bool = False  # ask the home router to forward the TCP listen port

    def __post_init__(self) -> None:
        _as_tuple(self, "reserve")
        if self.relay is not None and not isinstance(self.relay, RelayPolicy):
            raise ConfigError(f"relay must be a RelayPolicy or None, got {self.relay!r}")


@dataclass(frozen=True)
class ApiConfig:
    """The OpenAI-compatible HTTP API: ``listen`` is HOST:PORT (``:PORT`` binds
    127.0.0.1; port 0 lets the OS pick); ``key_file`` holds a bearer key on its first
    line; ``cors_origins`` are the browser origins allowed (``"*"``: any)."""

    listen: str = "127.0.0.1:8000"
    key_file: Path | None = None
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from p2pedge.api.server import parse_api_listen

        parse_api_listen(self.listen)  # ConfigError on a bad value
        if self.key_file is not None:
            object.__setattr__(self, "key_file", Path(self.key_file).expanduser())
        _as_tuple(self, "cors_origins")


def _as_tuple(obj: object, name: str) -> None:
    """Freeze a sequence field as a tuple; a lone string is a mistake, not a sequence."""
    value = getattr(obj, name)
    if isinstance(value, str | Path):
        raise ConfigError(f"{name} must be a sequence, not a single {type(value).__name__}")
    object.__setattr__(obj, name, tuple(value))


@dataclass(frozen=True)
class NodeConfig:
    """What a user sets: where the node keeps its data, how it joins (or closes) a swarm,
    which models it holds and serves, and the API. ``limits`` bound what peers may hold of
    this node; ``tuning`` holds the internal knobs."""

    data_dir: Path = field(default_factory=default_data_dir)
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    local_only: bool = False  # no network at all: local models only
    private: PrivateSwarm | None = None  # None: an open swarm
    reach: Reach = field(default_factory=Reach)
    models_dir: Path | None = None  # the model store; None: data_dir/store
    model_dirs: tuple[tuple[str, Path], ...] = ()  # model directories outside the store
    serve: tuple[ServeSpec, ...] = ()
    # where a shard server also fetches the files of a model it does not hold (peers first)
    registry: str | None = None
    trusted_publishers: tuple[Path, ...] = ()
    # bytes the shards this node serves may take (weights and KV caches); None: no bound.
    # With it, placement picks blocks that fit, and sessions past it are refused
    memory_budget: int | None = None
    # the direct lane's TCP port for shard traffic (0: the OS picks; fix it to open one
    # port in a firewall); None: no lane, shard traffic stays on libp2p streams
    direct_lane: int | None = 0
    api: ApiConfig | None = None  # None: no HTTP API
    limits: Limits = field(default_factory=Limits)  # what peers may hold of this node
    tuning: Tuning = field(default_factory=Tuning)  # internal knobs

    def __post_init__(self) -> None:
        # "~" means the home directory wherever a path is given (not a directory named "~")
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        if self.models_dir is not None:
            object.__setattr__(self, "models_dir", Path(self.models_dir).expanduser())
        for name in ("listen", "bootstrap", "serve", "trusted_publishers", "model_dirs"):
            _as_tuple(self, name)
        object.__setattr__(
            self, "trusted_publishers", tuple(Path(p).expanduser() for p in self.trusted_publishers)
        )
        object.__setattr__(
            self, "model_dirs", tuple((n, Path(p).expanduser()) for n, p in self.model_dirs)
        )
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConfigError(f"memory_budget must be positive bytes, got {self.memory_budget}")
        if self.direct_lane is not None and not 0 <= self.direct_lane <= 65535:
            raise ConfigError(
                f"direct_lane must be a port 0..65535 or None, got {self.direct_lane}"
            )
        for name, kind in (
            ("tuning", Tuning), ("limits", Limits), ("reach", Reach),
            ("private", PrivateSwarm | None), ("api", ApiConfig | None),
        ):  # fmt: skip
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} must be a {kind}, got {getattr(self, name)!r}")
        from p2pedge.node.addresses import check_multiaddr

        for addr in (*self.listen, *self.bootstrap, *self.reach.reserve):
            check_multiaddr(addr)
        if self.private is not None and self.private.psk_file is not None:
            from p2pedge.reach.quic import is_quic

            if any(is_quic(addr) for addr in self.listen):
                # py-libp2p's pre-shared key covers TCP only: QUIC would let anyone in
                raise ConfigError("a private swarm (psk_file) cannot listen on QUIC")
        for spec in self.serve:
            if not isinstance(spec, ServeSpec):
                raise ConfigError(f"serve entries must be ServeSpec, got {spec!r}")
