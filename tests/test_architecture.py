"""The package's public surface and its dependency direction, checked from the source."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import p2pedge

PACKAGE = Path(p2pedge.__file__).parent

# layer -> packages it must never import (directly, at any depth of its modules)
FORBIDDEN = {
    "errors": ("p2pedge.", "trio", "libp2p", "onnxruntime", "numpy"),
    "ids": ("p2pedge.", "trio", "libp2p", "onnxruntime", "numpy"),
    "wire": (
        "p2pedge.records",
        "p2pedge.node",
        "p2pedge.protocols",
        "p2pedge.runtime",
        "trio",
        "libp2p",
        "onnxruntime",
    ),
    "records": (
        "p2pedge.node",
        "p2pedge.protocols",
        "p2pedge.runtime",
        "p2pedge.dht",
        "trio",
        "libp2p",
        "onnxruntime",
    ),
    "planning": (
        "p2pedge.node",
        "p2pedge.protocols",
        "p2pedge.runtime",
        "trio",
        "libp2p",
        "onnxruntime",
    ),
    "runtime": ("p2pedge.protocols", "p2pedge.node", "p2pedge.dht", "trio", "libp2p"),
    "models": ("p2pedge.protocols", "p2pedge.node", "p2pedge.dht"),
    "api": ("libp2p", "onnxruntime", "p2pedge.protocols", "p2pedge.dht"),
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_only_import_downward(layer: str) -> None:
    root = PACKAGE / layer
    files = sorted(root.rglob("*.py")) if root.is_dir() else [PACKAGE / f"{layer}.py"]
    assert files
    bad = [
        f"{f.relative_to(PACKAGE)} imports {name}"
        for f in files
        for name in imports_of(f)
        if any(name == banned.rstrip(".") or name.startswith(banned) for banned in FORBIDDEN[layer])
    ]
    assert not bad, bad


def test_public_names_resolve() -> None:
    for name in p2pedge.__all__:
        assert getattr(p2pedge, name) is not None, name
    assert p2pedge.Node.__name__ == "Node"
    with pytest.raises(AttributeError):
        p2pedge.NoSuchThing  # noqa: B018


def test_importing_the_package_stays_light() -> None:
    heavy = "('trio', 'libp2p', 'onnxruntime')"
    code = f"import sys, p2pedge; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
