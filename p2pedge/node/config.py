"""Node configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from p2pedge.errors import ConfigError
from p2pedge.ids import LayerRange
from p2pedge.node.limits import Limits
from p2pedge.planning.slowdown import SlowdownPolicy
from p2pedge.planning.verification import VerifyPolicy


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
class NodeConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    local_only: bool = False
    psk_file: Path | None = None
    allow_peers: tuple[str, ...] = ()
    mdns: bool = False
    announce_interval: float = 60.0
    card_ttl_factor: float = 3.0
    dht_timeout: float = 10.0
    private_dial_timeout: float = 3.0
    bootstrap_timeout: float = 5.0
    self_lookup: bool = True
    announce_on_start: bool = True
    models_dir: Path | None = None
    serve: tuple[ServeSpec, ...] = ()
    threads: int = 0
    trusted_publishers: tuple[Path, ...] = ()
    # where a shard server also fetches the files of a model it does not hold (peers first)
    registry: str | None = None
    measure_compute: bool = True
    identity_seed: bytes | None = None
    model_dirs: tuple[tuple[str, Path], ...] = ()
    shard_step_timeout: float = 10.0
    shard_push: bool = True  # prompts and decode steps go server to server; False relays
    shard_ring: bool = True  # greedy decode goes round the chain without us (needs push)
    # only the last server answers us during a ring: less CPU per token, but a dead middle
    # server shows only as a late token, and recovery replays the ring's positions
    shard_ring_quiet: bool = False
    # leave a shard server whose decode steps turn slow mid-session for a replica; None stays
    shard_slowdown: SlowdownPolicy | None = field(default_factory=SlowdownPolicy)
    # spot-check shard servers on replicas (a hop nobody else serves stays unchecked); a
    # mismatch bans the server and replays onto an honest one; None trusts every server
    shard_verify: VerifyPolicy | None = field(default_factory=VerifyPolicy)
    inline_step_ms: float = 50.0  # decode steps this short skip the worker thread; 0: never
    direct_lane: bool = True
    direct_lane_port: int = 0  # 0: the OS picks; fix it to open one port in a firewall
    limits: Limits = field(default_factory=Limits)  # what peers may hold of this node
    api: str | None = None  # HOST:PORT of the OpenAI-compatible API; None: off
    api_key_file: Path | None = None  # bearer key on its first line; None: no key
    api_cors_origins: tuple[str, ...] = ()  # browser origins allowed ("*": any)

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
        if not 0 <= self.direct_lane_port <= 65535:
            raise ConfigError(f"direct_lane_port must be 0..65535, got {self.direct_lane_port}")
        if not 0 <= self.inline_step_ms <= 1000:
            raise ConfigError(f"inline_step_ms must be 0..1000, got {self.inline_step_ms}")
        if self.announce_interval <= 0:
            raise ConfigError("announce_interval must be positive")
        if self.card_ttl_factor < 1:
            raise ConfigError("card_ttl_factor must be at least 1")
        from p2pedge.node.addresses import check_multiaddr

        for addr in (*self.listen, *self.bootstrap):
            check_multiaddr(addr)
        if self.api is not None:
            from p2pedge.api.server import parse_api_listen

            parse_api_listen(self.api)  # ConfigError on a bad value
        for spec in self.serve:
            if not isinstance(spec, ServeSpec):
                raise ConfigError(f"serve entries must be ServeSpec, got {spec!r}")

    @property
    def card_ttl(self) -> float:
        return self.announce_interval * self.card_ttl_factor
