"""The package's rooms (README, Development): one direction of imports, small modules, empty __init__ files."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

ORDER = [
    "errors",
    "progress",
    "data",
    "models",
    "pruning",
    "measuring",
    "training",
    "latency_service",
    "study",
    "shipping",
    "serving",
    "cli",
]
"""The rooms as README lists them: each may import only from those before it."""
PACKAGE = ROOT / "search"


def _room(module: str) -> str:
    return module.split(".")[1]


def _modules() -> list[tuple[str, ast.Module, int]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        found.append((".".join(path.relative_to(ROOT).with_suffix("").parts), ast.parse(text), len(text.splitlines())))
    return found


def test_rooms_import_only_from_the_rooms_before_them() -> None:
    upward = []
    for name, tree, _ in _modules():
        if name.count(".") < 1 or name == "search.__init__":
            continue
        me = _room(name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("search."):
                if me != _room(node.module) and ORDER.index(_room(node.module)) > ORDER.index(me):
                    upward.append(f"{name} imports {node.module}")
    assert {_room(n) for n, _, _ in _modules() if n.count(".") >= 1 and n != "search.__init__"} <= set(ORDER)
    assert not upward, upward


def test_modules_are_small_and_subpackage_init_files_import_nothing() -> None:
    for name, tree, lines in _modules():
        assert lines <= 420, f"{name} has {lines} lines"
        if name.endswith(".__init__"):
            imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
            assert all(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in imports), f"{name} imports"
