"""Paths in the configuration expand ``~``, and the node CLI's --help lists every
subcommand (it used to show only `run`'s options)."""

from pathlib import Path

import pytest

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
