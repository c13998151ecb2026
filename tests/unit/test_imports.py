"""The package's dependencies point one way: config <- model <- (train, decoding, data), and there
are no import cycles, between layers or between single modules. Walks every import statement
(function-level ones too) with ast."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mtp_megatron"

FORBIDDEN = {
    "config": {"*"},
    "parallel": {"model", "data", "train", "decoding", "recipe", "bench", "report", "sweep", "hf"},
    "consolidated": {"model", "data", "train", "decoding", "recipe", "parallel", "bench", "hf"},
    "model": {
        *("train", "decoding", "data", "recipe", "bench", "report", "sweep", "consolidated"),
        "hf",
    },
    "data": {"model", "train", "decoding", "recipe", "bench", "report", "sweep", "hf"},
    "decoding": {"train", "recipe", "bench", "report", "sweep", "hf"},
    "train": {"decoding", "bench", "report", "sweep"},
    "report": {"model", "train", "decoding", "data", "bench", "hf"},
    "hf": {"train", "decoding", "recipe", "bench", "report", "sweep"},
    # bench/ may draw with report/ (the GPU check's loss curve); report/ never imports bench/
    "bench": {"sweep"},
}
# the reproductions (research/) sit on top, the command line (cli/) above everything but them
for _forbidden in FORBIDDEN.values():
    if "*" not in _forbidden:
        _forbidden |= {"research", "cli"}
"""unit -> units it must not import ('*': any of ours other than the config package, the bottom
layer)."""

ALLOWED_MODULE_CYCLES: set[frozenset[str]] = set()
"""Module cycles accepted with a reason (none today: add one only with a comment saying why)."""


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, package: str) -> set[str]:
    """The modules of ``package`` that ``path`` imports (names relative to the package), at any
    nesting level: ``from a.b import C`` names ``a.b.C`` (a submodule or not, resolved later)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == package or name.startswith(package + "."):
                found.add(name.removeprefix(package).lstrip("."))
    return found


def _module_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> modules it imports, by dotted name relative to the package ('' the package's own
    __init__); self-imports dropped."""
    paths = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        deps = graph.setdefault(name, set())
        for target in _imports(path, root.name):
            while target and target not in paths:  # `from a.b import C`: C is not a module
                target = target.rpartition(".")[0]
            if target != name:
                deps.add(target)
    return graph


def _unit(module: str) -> str:
    """The layer a module belongs to: its top-level module / package."""
    return module.split(".")[0] if module else "__init__"


def _graph() -> dict[str, set[str]]:
    """unit -> units it imports (imports inside a unit dropped)."""
    graph: dict[str, set[str]] = {}
    for module, deps in _module_graph().items():
        src = _unit(module)
        graph.setdefault(src, set()).update(d for d in map(_unit, deps) if d != src)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _without_package_api(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without the package's own ``__init__`` (its lazy API imports ``model`` and
    ``decoding`` on first use; package code never imports it back)."""
    return {m: deps - {""} for m, deps in graph.items() if m != ""}


def test_dependencies_point_one_way():
    graph = _graph()
    bad = []
    for src, banned in FORBIDDEN.items():
        for dst in sorted(graph.get(src, ())):
            if dst in banned or ("*" in banned and dst != "config"):
                bad.append(f"{src} -> {dst}")
    users = sorted(src for src, deps in graph.items() if "cli" in deps and src != "__main__")
    assert not bad, "forbidden imports: " + ", ".join(bad)
    assert not users, f"only __main__ may import the command line (cli/): {users}"


def test_only_tests_import_the_test_helpers():
    users = sorted(src for src, deps in _graph().items() if "testing" in deps and src != "testing")
    assert not users, f"package code imports mtp_megatron.testing: {users}"


def test_no_import_cycles_between_layers():
    graph = _graph()
    graph.pop("__init__", None)  # the package's lazy API re-exports; nothing imports it back
    for deps in graph.values():
        deps.discard("__init__")
    assert not _cycles(graph), _cycles(graph)


def test_no_import_cycles_between_modules():
    cycles = _cycles(_without_package_api(_module_graph()))
    unexplained = [c for c in cycles if frozenset(c) not in ALLOWED_MODULE_CYCLES]
    assert not unexplained, f"module import cycles: {unexplained}"


def test_a_planted_module_cycle_is_found(tmp_path):
    """The module check sees a cycle closed by a function-level import inside one layer."""
    pkg = tmp_path / "pkg"
    (pkg / "data").mkdir(parents=True)
    for init in (pkg / "__init__.py", pkg / "data" / "__init__.py"):
        init.write_text("")
    (pkg / "data" / "writer.py").write_text("from pkg.data.reader import read\n")
    (pkg / "data" / "reader.py").write_text("def read():\n    from pkg.data import writer\n")
    (pkg / "data" / "other.py").write_text("import pkg.data.reader\n")
    graph = _module_graph(pkg)
    assert graph["data.other"] == {"data.reader"}
    assert _cycles(_without_package_api(graph)) == [["data.reader", "data.writer"]]


def test_the_walker_sees_what_it_should():
    # the rules above are only as good as the graph: check it against known edges
    graph = _graph()
    assert {"config", "parallel"} <= graph["model"]
    assert "model" in graph["decoding"] and "model" in graph["train"]
    assert "train" not in graph["recipe"]  # recipe reads config/train.py, a config module
    assert {"train", "decoding", "hf"} <= graph["cli"]  # (__main__ names cli's by string)
    modules = _module_graph()
    assert "model.objective" in modules["model.mtp_model"]  # a `from ... import` of a module
    assert "decoding.plain" in modules["decoding.calibrate"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
