"""The package's public surface and its dependency direction, checked from the source.

Layers, lowest first (a layer may import only those below it, and never the test kit):
``errors``, ``ids`` (stdlib only) < ``wire`` < ``records`` < ``planning``, ``quota``,
``asgi`` (pure helpers) < ``models`` < ``runtime`` (no trio) < ``protocols`` (codec and
machine sans-IO) < ``dht``, ``reach``, ``registry``, ``orchestrator`` < ``node``, ``api``
(the composition root and the HTTP front door) < ``chat``, ``cli`` (entry points).
``testing`` is the public test kit: it may import anything, production code never it.
"""

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import p2pedge

PACKAGE = Path(p2pedge.__file__).parent
HEAVY = ("trio", "libp2p", "onnxruntime", "onnxruntime_genai")
ENTRY = ("p2pedge.chat", "p2pedge.cli", "p2pedge.testing")
ABOVE_PURE = (
    "p2pedge.models", "p2pedge.runtime", "p2pedge.protocols", "p2pedge.dht", "p2pedge.reach",
    "p2pedge.registry", "p2pedge.orchestrator", "p2pedge.node", "p2pedge.api", *ENTRY,
)  # fmt: skip
SERVICES = ("p2pedge.dht", "p2pedge.reach", "p2pedge.registry", "p2pedge.orchestrator")
TOP = ("p2pedge.node", "p2pedge.api", *ENTRY)

# unit (subpackage or top-level module) -> what it must never import, at any depth
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "errors": ("p2pedge", *HEAVY, "numpy", "cryptography", "msgpack"),
    "ids": ("p2pedge", *HEAVY, "numpy", "cryptography", "msgpack"),
    "wire": ("p2pedge.ids", "p2pedge.records", "p2pedge.planning", *ABOVE_PURE, *HEAVY),
    "records": ("p2pedge.planning", "p2pedge.quota", *ABOVE_PURE, *HEAVY),
    "planning": ("p2pedge.quota", "p2pedge.asgi", *ABOVE_PURE, *HEAVY),
    "quota": ("p2pedge.wire", "p2pedge.records", "p2pedge.planning", *ABOVE_PURE, *HEAVY),
    "asgi": ("p2pedge.wire", "p2pedge.records", "p2pedge.planning", *ABOVE_PURE, *HEAVY),
    "models": (
        "p2pedge.runtime",
        "p2pedge.protocols",
        *SERVICES,
        *TOP,
        "libp2p",
        "onnxruntime",
        "onnxruntime_genai",
    ),
    "runtime": ("p2pedge.protocols", *SERVICES, *TOP, "trio", "libp2p"),
    "protocols": (*SERVICES, *TOP),
    "dht": (
        "p2pedge.models",
        "p2pedge.runtime",
        "p2pedge.reach",
        "p2pedge.registry",
        "p2pedge.orchestrator",
        *TOP,
        "onnxruntime",
        "onnxruntime_genai",
    ),
    "reach": (
        "p2pedge.models",
        "p2pedge.runtime",
        "p2pedge.dht",
        "p2pedge.registry",
        "p2pedge.orchestrator",
        *TOP,
        "onnxruntime",
        "onnxruntime_genai",
    ),
    "registry": (
        "p2pedge.runtime",
        "p2pedge.protocols",
        "p2pedge.dht",
        "p2pedge.reach",
        "p2pedge.orchestrator",
        *TOP,
        "libp2p",
        "onnxruntime",
    ),
    "orchestrator": (
        "p2pedge.dht",
        "p2pedge.reach",
        "p2pedge.registry",
        *TOP,
        "libp2p",
        "onnxruntime",
        "onnxruntime_genai",
    ),
    "node": ENTRY,
    "api": (
        "p2pedge.protocols",
        "p2pedge.dht",
        "p2pedge.reach",
        *ENTRY,
        "libp2p",
        "onnxruntime",
        "onnxruntime_genai",
    ),
    "chat": ("p2pedge.testing",),
    "cli": ("p2pedge.testing",),
    "testing": (),
}
# sans-IO parts of every protocol: no event loop, no network, no model runtime
SANS_IO = ("codec.py", "machine.py", "limits.py")


def units() -> set[str]:
    found = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    found |= {p.stem for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py",)}
    return found


def files_of(unit: str) -> list[Path]:
    root = PACKAGE / unit
    return sorted(root.rglob("*.py")) if root.is_dir() else [PACKAGE / f"{unit}.py"]


def imports_of(path: Path) -> set[str]:
    """Every absolute import in ``path``, at any depth (functions, TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def banned(name: str, rules: tuple[str, ...]) -> bool:
    return any(name == rule or name.startswith(rule + ".") for rule in rules)


def test_every_unit_of_the_package_has_a_layer() -> None:
    assert units() == set(FORBIDDEN)


@pytest.mark.parametrize("unit", sorted(FORBIDDEN))
def test_layers_only_import_downward(unit: str) -> None:
    files = files_of(unit)
    assert files
    bad = [
        f"{f.relative_to(PACKAGE)} imports {name}"
        for f in files
        for name in imports_of(f)
        if banned(name, FORBIDDEN[unit])
    ]
    assert not bad, bad


def test_protocol_codecs_and_machines_are_sans_io() -> None:
    files = [f for name in SANS_IO for f in (PACKAGE / "protocols").rglob(name)]
    assert len(files) >= 6
    bad = [
        f"{f.relative_to(PACKAGE)} imports {name}"
        for f in files
        for name in imports_of(f)
        if banned(name, HEAVY)
    ]
    assert not bad, bad


# -- import cycles ---------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(body: list[ast.AST], *, everything: bool) -> Iterator[ast.AST]:
    """Statements that run on import (``everything``: also function bodies and
    ``if TYPE_CHECKING:`` blocks, i.e. every dependency the source states)."""
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and not everything:
            continue
        if isinstance(stmt, ast.If) and _is_type_checking(stmt.test) and not everything:
            yield from _statements(list(stmt.orelse), everything=everything)
            continue
        yield stmt
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(stmt, field, None)
            if isinstance(inner, list):
                yield from _statements(inner, everything=everything)


def import_graph(*, everything: bool) -> dict[str, set[str]]:
    """Module -> the p2pedge modules it imports (``from a import b`` counts ``a.b`` when
    ``b`` is a module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for stmt in _statements(list(ast.parse(path.read_text()).body), everything=everything):
            targets: list[str] = []
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names]
            elif isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
                targets = [stmt.module, *(f"{stmt.module}.{a.name}" for a in stmt.names)]
            deps |= {m for t in targets if (m := known(t)) is not None}
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules() -> None:
    """What runs on import (module level, outside TYPE_CHECKING) forms no cycle."""
    assert cycles(import_graph(everything=False)) == []


def test_no_cycles_inside_node_even_through_function_and_type_imports() -> None:
    """The node's parts get what they need passed in: none names another that names it."""
    graph = import_graph(everything=True)
    inside = {
        m: {d for d in deps if d.startswith("p2pedge.node.")}
        for m, deps in graph.items()
        if m.startswith("p2pedge.node.")
    }
    assert len(inside) >= 10
    assert cycles(inside) == []


def test_no_cycles_between_units_even_through_function_and_type_imports() -> None:
    """Subpackages and top-level modules, every import the source states (functions and
    TYPE_CHECKING too): what a unit uses never uses it back. The root package, whose lazy
    ``__getattr__`` names the public types, is the facade above them all."""
    graph = import_graph(everything=True)

    def unit(module: str) -> str:
        return module.split(".")[1] if "." in module else module

    units_graph: dict[str, set[str]] = {}
    for module, deps in graph.items():
        if module == "p2pedge":
            continue
        own = unit(module)
        units_graph.setdefault(own, set()).update(
            unit(d) for d in deps if d != "p2pedge" and unit(d) != own
        )
    assert len(units_graph) >= 15
    assert cycles(units_graph) == []


def test_node_module_is_a_thin_composition_root() -> None:
    assert len((PACKAGE / "node" / "node.py").read_text().splitlines()) <= 250


def test_node_config_stays_small() -> None:
    """About 15 fields a user sets; internal knobs live in ``Tuning``, and related settings
    are one field each (``ApiConfig``, ``PrivateSwarm``, ``Reach``)."""
    from dataclasses import fields

    from p2pedge.node.config import NodeConfig

    assert len(fields(NodeConfig)) <= 16


# -- the public surface and what importing it costs ------------------------------------


def test_public_names_resolve() -> None:
    for name in p2pedge.__all__:
        assert getattr(p2pedge, name) is not None, name
    assert p2pedge.Node.__name__ == "Node"
    with pytest.raises(AttributeError):
        p2pedge.NoSuchThing  # noqa: B018


def _third_party_loaded_by(statement: str) -> list[str]:
    code = (
        f"import sys; {statement}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [
        m
        for m in ast.literal_eval(out.stdout)
        if not m.startswith("_") and m not in ("p2pedge", "cython_runtime")
    ]


def test_importing_the_package_stays_light() -> None:
    assert _third_party_loaded_by("import p2pedge") == []


def test_importing_the_wire_format_stays_light() -> None:
    """Framing, messages and tensors: msgpack and numpy, nothing of trio, libp2p or a
    model runtime (a decoder of peers' bytes must be importable anywhere)."""
    assert _third_party_loaded_by("import p2pedge.wire") == ["msgpack", "numpy"]
