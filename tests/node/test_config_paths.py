"""Paths in the configuration expand ``~``, and the node CLI's --help lists every
subcommand (it used to show only `run`'s options)."""

from pathlib import Path

import pytest

from p2pedge.errors import ConfigError
from p2pedge.node.cli import main
from p2pedge.node.config import ApiConfig, NodeConfig, PrivateSwarm, Reach, Tuning


def test_tilde_means_the_home_directory_in_every_path() -> None:
    config = NodeConfig(
        data_dir="~/p2pedge-data",  # type: ignore[arg-type]
        models_dir=Path("~/models"),
        private=PrivateSwarm(psk_file=Path("~/swarm.key")),
        trusted_publishers=(Path("~/pub.pub"),),
        model_dirs=(("m", Path("~/m")),),
        api=ApiConfig(":0", key_file=Path("~/api.key")),
    )
    home = Path.home()
    assert config.data_dir == home / "p2pedge-data"
    assert config.models_dir == home / "models"
    assert config.private is not None and config.private.psk_file == home / "swarm.key"
    assert config.api is not None and config.api.key_file == home / "api.key"
    assert config.trusted_publishers == (home / "pub.pub",)
    assert config.model_dirs == (("m", home / "m"),)


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "peers" in out


def test_a_toml_file_sets_the_config_and_flags_override_it(tmp_path: Path) -> None:
    from p2pedge.node.cli import _config, build_parser

    path = tmp_path / "node.toml"
    path.write_text(
        'listen = ["/ip4/127.0.0.1/tcp/4001"]\n'
        'serve = ["smollm2:0-10"]\n'
        "direct_lane = false\n"
        f'data_dir = "{tmp_path / "data"}"\n'
        "[tuning]\n"
        "announce_interval = 120.0\n"
        "shard_ring = false\n"
        "[limits.blob]\n"
        "idle_timeout = 7.5\n"
        "[model_dirs]\n"
        f'smollm2 = "{tmp_path}"\n'
    )
    args = build_parser().parse_args(["run", "--config", str(path), "--announce-interval", "30"])
    config = _config(args)
    assert config.listen == ("/ip4/127.0.0.1/tcp/4001",)
    assert config.tuning.announce_interval == 30.0  # the flag wins
    assert config.tuning.shard_ring is False  # the rest of the file's [tuning] holds
    assert config.limits.blob.idle_timeout == 7.5
    assert config.limits.dht == NodeConfig().limits.dht
    assert [(s.model, str(s.layers)) for s in config.serve] == [("smollm2", "0-10")]
    assert config.direct_lane is None  # false in the file: no lane
    assert config.data_dir == tmp_path / "data"
    assert config.model_dirs == (("smollm2", tmp_path),)
    assert config.tuning.threads == Tuning().threads  # unset anywhere: the default
    assert config.private is None and config.api is None and config.reach == Reach()


def test_a_config_file_with_an_unknown_or_mistyped_setting_is_a_usage_error(
    tmp_path: Path,
) -> None:
    from p2pedge.errors import ConfigError
    from p2pedge.node.cli import read_config_file

    path = tmp_path / "node.toml"
    path.write_text("annouce_interval = 30\n")
    with pytest.raises(ConfigError, match="annouce_interval"):
        read_config_file(path)
    path.write_text('serve = "smollm2:0-10"\n')
    with pytest.raises(ConfigError, match="must be a list"):
        read_config_file(path)
    path.write_text("[tuning]\nannouce_interval = 30\n")
    with pytest.raises(ConfigError, match=r"tuning\.annouce_interval"):
        read_config_file(path)
    path.write_text("[limits.blob]\nidle_timeout = -1\n")
    with pytest.raises(ConfigError, match=r"limits\.blob"):
        read_config_file(path)


def test_reach_and_budget_settings_from_file_and_flags(tmp_path: Path) -> None:
    from p2pedge.node.cli import _config, build_parser
    from p2pedge.reach.relay import RelayPolicy

    relay = "/ip4/127.0.0.2/tcp/4001/p2p/12D3KooWNFwc4penELYz1XBF9kREKeRwo4UHx4bpQ9LEd1yyh6V9"
    path = tmp_path / "node.toml"
    path.write_text(
        f'memory_budget = 1000\n[reach]\nreserve = ["{relay}"]\n'
        "[reach.relay]\ncircuit_bytes = 4096\n"
    )
    parser = build_parser()
    config = _config(parser.parse_args(["run", "--config", str(path)]))
    assert config.reach.reserve == (relay,) and config.memory_budget == 1000
    assert config.reach.relay == RelayPolicy(circuit_bytes=4096)
    assert config.reach.hole_punch is True
    # a flag replaces one field of the file's [reach] and keeps the rest
    config = _config(parser.parse_args(["run", "--config", str(path), "--no-hole-punch"]))
    assert config.reach.hole_punch is False and config.reach.reserve == (relay,)
    flags = ["run", "--relay", "--memory-budget", "2G", "--no-hole-punch", "--data-dir", "d"]
    config = _config(parser.parse_args(flags))
    assert config.reach.relay == RelayPolicy() and config.memory_budget == 2 << 30
    assert config.reach.hole_punch is False and config.reach.reserve == ()
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--memory-budget", "lots"])
    with pytest.raises(ConfigError, match="memory_budget"):
        NodeConfig(memory_budget=0)
    with pytest.raises(ConfigError):
        NodeConfig(reach=Reach(reserve=("not-an-address",)))


def test_grouped_settings_from_file_and_flags(tmp_path: Path) -> None:
    """The API, a private swarm and the onnxruntime threads: a file's table, a flag
    overriding one field of it, and the mistakes that are usage errors."""
    from p2pedge.node.cli import _config, build_parser

    key = tmp_path / "api.key"
    path = tmp_path / "node.toml"
    path.write_text(
        '[api]\nlisten = "127.0.0.1:8123"\ncors_origins = ["http://ui.local"]\n'
        f'[private]\npsk_file = "{tmp_path / "swarm.key"}"\n'
        "[tuning]\nthreads = 3\n"
    )
    parser = build_parser()
    base = ["run", "--config", str(path)]
    config = _config(parser.parse_args([*base, "--api-key-file", str(key), "--threads", "1"]))
    assert config.api == ApiConfig("127.0.0.1:8123", key, ("http://ui.local",))
    assert config.private == PrivateSwarm(psk_file=tmp_path / "swarm.key")
    assert config.tuning.threads == 1  # the flag wins over the file's 3
    config = _config(parser.parse_args([*base, "--allow-peer", "12D3KooWx", "--api", ":9"]))
    assert config.private is not None and config.private.allow_peers == ("12D3KooWx",)
    assert config.private.psk_file == tmp_path / "swarm.key"  # kept from the file
    assert config.api is not None and config.api.listen == ":9"
    assert config.api.cors_origins == ("http://ui.local",)
    path.write_text('api = "8000"\n')
    assert _config(parser.parse_args(base)).api == ApiConfig("8000")
    with pytest.raises(ConfigError, match="need --api"):
        _config(parser.parse_args(["run", "--data-dir", "d", "--api-key-file", str(key)]))
    with pytest.raises(ConfigError, match="private swarm needs"):
        PrivateSwarm()
    with pytest.raises(ConfigError, match="HOST:PORT"):
        ApiConfig("127.0.0.1:http")
    path.write_text("[private]\npsk = 1\n")
    with pytest.raises(ConfigError, match=r"private\.psk"):
        _config(parser.parse_args(base))
    with pytest.raises(ConfigError, match="direct_lane"):
        NodeConfig(direct_lane=70000)
    with pytest.raises(ConfigError, match="threads"):
        Tuning(threads=-1)
