"""Rules of the test suite that hold whether or not a test can run here: a test that spawns a
process world carries the ``distributed`` marker even where it is skipped (a GPU test skipped on
every CPU machine would otherwise fail the first time a GPU runs it)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _marks(node: ast.AST) -> set[str]:
    """``pytest.mark.NAME`` names in decorators or a ``pytestmark`` value."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute):
            if sub.value.attr == "mark":
                found.add(sub.attr)
    return found


def _spawns(test: ast.FunctionDef) -> bool:
    """Whether ``test`` calls ``run_distributed`` outside a ``pytest.raises`` block (inside one,
    it checks the refusal)."""
    refused = {
        id(n)
        for w in ast.walk(test)
        if isinstance(w, ast.With)
        and any(
            isinstance(i.context_expr, ast.Call)
            and isinstance(i.context_expr.func, ast.Attribute)
            and i.context_expr.func.attr == "raises"
            for i in w.items
        )
        for n in ast.walk(w)
    }
    return any(
        isinstance(n, ast.Call)
        and isinstance(n.func, ast.Name)
        and n.func.id == "run_distributed"
        and id(n) not in refused
        for n in ast.walk(test)
    )


def _spawning_tests_without_marker(path: Path) -> list[str]:
    """Names of the test functions of ``path`` that call ``run_distributed`` unmarked."""
    tree = ast.parse(path.read_text())
    module_marks: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            module_marks |= _marks(node.value)
    bad = []
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test")):
            continue
        marks = module_marks | set().union(*(_marks(d) for d in node.decorator_list))
        if _spawns(node) and "distributed" not in marks:
            bad.append(node.name)
    return bad


def test_every_spawning_test_is_marked_distributed():
    bad = [
        f"{path.relative_to(TESTS)}::{name}"
        for path in sorted(TESTS.rglob("test_*.py"))
        for name in _spawning_tests_without_marker(path)
    ]
    assert not bad, f"tests that call run_distributed without @pytest.mark.distributed: {bad}"


def test_the_rule_sees_an_unmarked_spawning_test(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text(
        "import pytest\npytestmark = pytest.mark.gpu\n\n"
        "def test_a(tmp_path):\n    run_distributed(print, 1)\n\n"
        "@pytest.mark.distributed\ndef test_b(tmp_path):\n    run_distributed(print, 1)\n"
    )
    assert _spawning_tests_without_marker(planted) == ["test_a"]


def test_spawning_tests_must_be_marked_distributed():
    import pytest

    from mtp_megatron.testing.distributed import run_distributed

    with pytest.raises(RuntimeError, match="mark it @pytest.mark.distributed"):
        run_distributed(print, 2)  # this test is not marked: refused before any spawn
