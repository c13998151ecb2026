"""The package's dependencies point one way: config <- model <- (train, decoding, data), and
there are no import cycles. Walks every import statement (function-level ones too) with ast."""

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
    "bench": {"sweep", "report"},
}
# the reproductions (research/) sit on top: nothing of the package imports them
for _forbidden in FORBIDDEN.values():
    if "*" not in _forbidden:
        _forbidden.add("research")
"""unit -> units it must not import ('*': any of ours other than the config package, the bottom
layer)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _unit(module: str) -> str:
    """The layer a module belongs to: its top-level module / package."""
    return module.split(".")[0] if module else "__init__"


def _imports(path: Path) -> set[str]:
    """Our modules that ``path`` imports (relative to the package), at any nesting level."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from mtp_megatron import model` imports the submodule `model`
            base = node.module
            names = [f"{base}.{a.name}" if base == "mtp_megatron" else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "mtp_megatron" or name.startswith("mtp_megatron."):
                found.add(name.removeprefix("mtp_megatron").lstrip("."))
    return found


def _graph() -> dict[str, set[str]]:
    """unit -> units it imports (self-imports dropped)."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        src = _unit(_module_name(path))
        for target in _imports(path):
            while target and target not in modules:  # `from a.b import C`: C is not a module
                target = target.rpartition(".")[0]
            dst = _unit(target)
            if dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_dependencies_point_one_way():
    graph = _graph()
    bad = []
    for src, banned in FORBIDDEN.items():
        for dst in sorted(graph.get(src, ())):
            if dst in banned or ("*" in banned and dst != "config"):
                bad.append(f"{src} -> {dst}")
    assert not bad, "forbidden imports: " + ", ".join(bad)


def test_only_tests_import_the_test_helpers():
    users = sorted(src for src, deps in _graph().items() if "testing" in deps and src != "testing")
    assert not users, f"package code imports mtp_megatron.testing: {users}"


def test_no_import_cycles():
    graph = _graph()
    graph.pop("__init__", None)  # the package's lazy API re-exports; nothing imports it back
    for deps in graph.values():
        deps.discard("__init__")
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_walker_sees_what_it_should():
    # the rules above are only as good as the graph: check it against known edges
    graph = _graph()
    assert {"config", "parallel"} <= graph["model"]
    assert "model" in graph["decoding"] and "model" in graph["train"]
    assert "train" not in graph["recipe"]  # recipe reads config/train.py, a config module
    assert {"train", "decoding"} <= graph["__main__"]
    cyclic = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert _cycle(cyclic) == ["a", "b", "c", "a"]


def test_spawning_tests_must_be_marked_distributed():
    import pytest

    from mtp_megatron.testing.distributed import run_distributed

    with pytest.raises(RuntimeError, match="mark it @pytest.mark.distributed"):
        run_distributed(print, 2)  # this test is not marked: refused before any spawn
