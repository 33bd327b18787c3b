"""Paths in the configuration expand ``~``, and the node CLI's --help lists every
subcommand (it used to show only `run`'s options)."""

from pathlib import Path

import pytest

from p2pedge.errors import ConfigError
from p2pedge.node.cli import main
from p2pedge.node.config import NodeConfig


def test_tilde_means_the_home_directory_in_every_path() -> None:
    config = NodeConfig(
        data_dir="~/p2pedge-data",  # type: ignore[arg-type]
        models_dir=Path("~/models"),
        psk_file=Path("~/swarm.key"),
        trusted_publishers=(Path("~/pub.pub"),),
        model_dirs=(("m", Path("~/m")),),
    )
    home = Path.home()
    assert config.data_dir == home / "p2pedge-data"
    assert config.models_dir == home / "models"
    assert config.psk_file == home / "swarm.key"
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
    assert config.direct_lane is False
    assert config.data_dir == tmp_path / "data"
    assert config.model_dirs == (("smollm2", tmp_path),)
    assert config.threads == NodeConfig().threads  # unset anywhere: the default


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
    path.write_text(f'reserve = ["{relay}"]\nmemory_budget = 1000\n[relay]\ncircuit_bytes = 4096\n')
    parser = build_parser()
    config = _config(parser.parse_args(["run", "--config", str(path)]))
    assert config.reserve == (relay,) and config.memory_budget == 1000
    assert config.relay == RelayPolicy(circuit_bytes=4096)
    assert config.tuning.hole_punch is True
    flags = ["run", "--relay", "--memory-budget", "2G", "--no-hole-punch", "--data-dir", "d"]
    config = _config(parser.parse_args(flags))
    assert config.relay == RelayPolicy() and config.memory_budget == 2 << 30
    assert config.tuning.hole_punch is False and config.reserve == ()
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--memory-budget", "lots"])
    with pytest.raises(ConfigError, match="memory_budget"):
        NodeConfig(memory_budget=0)
    with pytest.raises(ConfigError):
        NodeConfig(reserve=("not-an-address",))
