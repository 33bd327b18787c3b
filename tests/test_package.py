"""The package as a user gets it: the wheel ``python -m build`` makes, in a fresh venv.

One wheel is built per run, from a copy of the repository without its caches and build
outputs (so a stale build/ cannot leak in, and simnet/ is there to be left out), and
installed twice into venvs that see no site-packages but their own:
- with the newest dependencies, where the ``p2pedge`` command must list and run every
  subcommand and ``simnet`` must not be importable;
- with every ``>=`` bound pinned to its lowest version, where a slice of the test suite
  that touches each such dependency runs, so a bound we declare is a bound we have tested.
uv installs (its cache makes a repeat run take seconds); the package index must be reachable
on a first run. The docs (``make docs``) build here too, with warnings as errors.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("node", "models", "registry")
LEFT_BEHIND = (
    ".git",
    ".venv",
    ".cache",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
)

# Test files that exercise every dependency with a lower bound: trio, libp2p, multiaddr,
# varint, msgpack, cryptography and psutil (a real node); numpy, onnx, onnxruntime (tensor
# models); gguf, tokenizers, jinja2 (the GGUF import); hypercorn, httpx, tqdm (the registry).
LOWER_BOUND_TESTS = (
    "tests/wire",
    "tests/records",
    "tests/node/test_node.py",
    "tests/runtime/test_tensor_model.py",
    "tests/models/test_gguf_reader.py",
    "tests/models/test_tokenizer.py",
    "tests/registry",
)

slow = pytest.mark.slow


def _run(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None, stderr: bool = False
) -> str:
    """stdout of a command that must succeed (with its stderr after it when asked)."""
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr if stderr else done.stdout


def _uv(*args: str | Path, cwd: Path, stderr: bool = False) -> str:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is in the test extra: pip install -e '.[test]'"
    return _run(uv, *args, cwd=cwd, stderr=stderr)


def _fresh_venv(where: Path) -> Path:
    """A venv of this interpreter that sees only its own site-packages."""
    _uv("venv", "-q", "--python", sys.executable, where, cwd=where.parent)
    config = (where / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in config
    return where / "bin"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    src = tmp_path_factory.mktemp("build") / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*LEFT_BEHIND))
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, src, cwd=src)  # sdist, then wheel
    wheels = sorted(out.glob("p2pedge-*.whl"))
    assert len(wheels) == 1, wheels
    yield wheels[0]


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


@slow
def test_wheel_holds_only_p2pedge_and_declares_its_extras(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        tops = {n.split("/")[0] for n in zf.namelist()}
        entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt")))
    assert tops == {"p2pedge", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    assert b"p2pedge = p2pedge.cli:main" in entry_points
    requires = [Requirement(r) for r in _metadata(wheel).get_all("Requires-Dist") or []]
    names = {r.name for r in requires}
    assert "quart-trio" not in names
    cuda = {r.name for r in requires if r.marker and r.marker.evaluate({"extra": "cuda"})}
    assert {"onnxruntime-gpu", "onnxruntime-genai-cuda"} <= cuda


@slow
def test_wheel_installs_into_a_fresh_venv_and_runs(wheel: Path, tmp_path: Path) -> None:
    bin_dir = _fresh_venv(tmp_path / "venv")
    _uv("pip", "install", "-q", "--python", bin_dir / "python", wheel, cwd=tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    help_text = _run(bin_dir / "p2pedge", "--help", cwd=tmp_path, env=env)
    for command in COMMANDS:
        assert f"    {command} " in help_text, (command, help_text)
        usage = _run(bin_dir / "p2pedge", command, "--help", cwd=tmp_path, env=env)
        assert usage.startswith("usage:"), usage
    probe = (
        "import importlib.util as u, p2pedge, p2pedge.node.node, p2pedge.registry.server;"
        "print(u.find_spec('simnet') is None, p2pedge.__file__)"
    )
    absent, where = _run(bin_dir / "python", "-c", probe, cwd=tmp_path, env=env).split()
    assert absent == "True"
    assert where.startswith(str(tmp_path / "venv")), where
    # the cuda extra resolves here (installing it would download its GPU wheels)
    cuda = _uv("pip", "install", "--dry-run", "--python", bin_dir / "python", f"{wheel}[cuda]",
               cwd=tmp_path, stderr=True)  # fmt: skip
    assert "+ onnxruntime-gpu==" in cuda and "+ onnxruntime-genai-cuda==0.18." in cuda, cuda


def lowest_versions(wheel: Path) -> list[str]:
    """``name==X`` for each ``name>=X`` the wheel needs, test extra included."""
    pins = []
    for line in _metadata(wheel).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": "test"}):
            continue
        pins += [f"{req.name}=={s.version}" for s in req.specifier if s.operator == ">="]
    return pins


@slow
def test_lowest_declared_versions_pass_the_tests_that_use_them(wheel: Path, tmp_path: Path) -> None:
    pins = lowest_versions(wheel)
    assert any(p.startswith("numpy==") for p in pins), pins
    constraints = tmp_path / "lowest.txt"
    constraints.write_text("\n".join(pins) + "\n")
    bin_dir = _fresh_venv(tmp_path / "venv")
    _uv(
        "pip", "install", "-q", "--python", bin_dir / "python", "-c", constraints,
        f"{wheel}[test]", cwd=tmp_path,
    )  # fmt: skip
    installed = _uv("pip", "freeze", "--python", bin_dir / "python", cwd=tmp_path).lower()
    for pin in pins:
        name, version = pin.split("==")
        assert any(
            line.startswith(f"{name.lower()}==") and _same(line.split("==")[1], version)
            for line in installed.splitlines()
        ), (pin, installed)
    args = ("-m", "pytest", "-q", "-p", "no:randomly", "-m", "not real_model and not slow")
    _run(bin_dir / "python", *args, *LOWER_BOUND_TESTS, cwd=ROOT)


def _same(installed: str, bound: str) -> bool:
    """'1.26.0' satisfies the pin '1.26'."""
    a, b = installed.split("."), bound.split(".")
    return a[: len(b)] == b and all(x == "0" for x in a[len(b) :])


def test_docs_build_with_no_warnings_and_reference_the_api(tmp_path: Path) -> None:
    site = tmp_path / "site"
    config = ROOT / "mkdocs.yml"
    args = ("-m", "mkdocs", "build", "--strict", "--config-file", config, "--site-dir", site)
    _run(sys.executable, *args, cwd=tmp_path)
    api = (site / "api" / "index.html").read_text()
    for name in ("Node.generate", "Node.find_peers", "NodeConfig.bootstrap", "errors.Busy"):
        assert f'id="p2pedge.{name}"' in api, name  # generated from the docstrings
    for page in ("quickstart", "concepts", "cli", "operations", "sharding"):
        assert (site / page / "index.html").is_file(), page


def test_the_command_dispatches_the_rest_of_the_line_unchanged(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from p2pedge import cli

    seen: list[tuple[str, list[str]]] = []
    for name, (_, summary) in list(cli.COMMANDS.items()):

        def program(argv: list[str], name: str = name) -> int:
            seen.append((name, argv))
            return 7

        monkeypatch.setitem(cli.COMMANDS, name, (program, summary))
    assert cli.main(["node", "peers", "--json"]) == 7
    assert cli.main(["registry", "--help"]) == 7
    assert seen == [("node", ["peers", "--json"]), ("registry", ["--help"])]
    assert cli.main([]) == cli.EXIT_USAGE
    with pytest.raises(SystemExit) as bad:
        cli.main(["serve"])
    assert bad.value.code == cli.EXIT_USAGE
    assert "invalid choice: 'serve'" in capsys.readouterr().err
