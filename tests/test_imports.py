"""The package's import graph: no cycles, no private names imported across modules.

Imports inside functions and under ``if TYPE_CHECKING:`` count too: Python tolerates
a cycle hidden in a function, the design does not (each module is a layer that
depends only on the layers below it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "autoprune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported autoprune module, names taken from it, line) for every import anywhere in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "autoprune"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "autoprune":
                continue
            names = [a.name for a in node.names]
            if node.module is None:  # from . import x: x is a module
                found += [(f"{target}.{n}", [], node.lineno) for n in names]
            else:
                found.append((target, names, node.lineno))
    return found


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        # "from .x import y" where y is a module is an edge to x.y; the package itself is no edge
        graph[name] = {t for t, _, _ in imports(path) if t in modules and t not in (name, "autoprune")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search, in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_see_function_bodies_type_checking_and_relative_levels(tmp_path, monkeypatch):
    pkg = tmp_path / "autoprune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .errors import E\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "m.py").write_text(
        "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..pick import _x\n"
        "def f():\n    from . import n\n    import autoprune.search\n    from .. import model\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert imports(pkg / "sub" / "m.py") == [("autoprune.pick", ["_x"], 4), ("autoprune.sub.n", [], 6),
                                            ("autoprune.search", [], 7), ("autoprune.model", [], 8)]
    assert imports(pkg / "__init__.py") == [("autoprune.errors", ["E"], 1)]


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_is_imported_across_modules():
    bad = [f"{module_name(path)} line {line}: from {target} import {n}"
           for path in package_modules().values() for target, names, line in imports(path)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == [], "private names imported across modules:\n" + "\n".join(bad)
