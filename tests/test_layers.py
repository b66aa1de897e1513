"""The package's imports: no circle, and the floors import downwards only.

Every ``import`` of a ``bgevl`` module counts, at module level, inside a function or under ``if
TYPE_CHECKING:`` (annotations only: they never run, but a type that only a higher floor can name is a
circle in the design all the same). Importing ``a.b.c`` also runs
``a/b/__init__``, which is not counted as an edge (a package importing its own submodules is not a
circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import bgevl

PACKAGE_DIR = Path(bgevl.__file__).parent

#: The floors, top-down; a module is on the floor of the longest prefix listed.
FLOORS = {
    "drivers": ("bgevl.export", "bgevl.benchmarks", "bgevl.api", "bgevl.corpus", "bgevl.quality",
                "bgevl.serving.cli", "bgevl.runtime.demo"),
    "families": ("bgevl.families",),
    "services": ("bgevl.runtime", "bgevl.graphs", "bgevl.serving", "bgevl.checkpoints", "bgevl.reference"),
    "core": ("bgevl.core", "bgevl"),
}
ORDER = list(FLOORS)  # index 0 is the top


def modules(root: Path = PACKAGE_DIR) -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imports(tree: ast.AST):
    """Import nodes, ``if TYPE_CHECKING:`` bodies included."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(known: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        while name:
            if name in known:
                return name
            name = name.rpartition(".")[0]
        return None

    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, (path, is_package) in known.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [resolve(alias.name) for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [resolve(f"{base}.{alias.name}") for alias in node.names]
            edges[name].update(t for t in targets if t and t != name)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
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
                    work.append((child, iter(sorted(edges[child]))))
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


def floor_of(module: str) -> str:
    best, best_len = "core", -1
    for floor, prefixes in FLOORS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = floor, len(prefix)
    return best


def test_there_is_no_import_circle_in_bgevl():
    found = circles(import_graph(modules()))
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_go_down_the_floors_only():
    upward = [f"{source} ({floor_of(source)}) imports {target} ({floor_of(target)})"
              for source, targets in import_graph(modules()).items() for target in sorted(targets)
              if ORDER.index(floor_of(target)) < ORDER.index(floor_of(source))]
    assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(upward)


def test_the_checks_catch_what_they_are_meant_to(tmp_path):
    """A circle through a function-level import, one through a type-only import, and an upward import, in a
    throwaway package."""
    root = tmp_path / "bgevl"
    (root / "core").mkdir(parents=True)
    (root / "runtime").mkdir()
    (root / "__init__.py").write_text("")
    (root / "core" / "__init__.py").write_text("")
    (root / "runtime" / "__init__.py").write_text("")
    (root / "core" / "a.py").write_text("def f():\n    from bgevl.runtime import b\n")
    (root / "runtime" / "b.py").write_text("from bgevl.core.a import f\n")
    (root / "core" / "c.py").write_text("if TYPE_CHECKING:\n    from bgevl.runtime.d import D\n")
    (root / "runtime" / "d.py").write_text("from bgevl.core import c\n")
    edges = import_graph(modules(root))
    assert sorted(circles(edges)) == [["bgevl.core.a", "bgevl.runtime.b"], ["bgevl.core.c", "bgevl.runtime.d"]]
    assert edges["bgevl.runtime.b"] == {"bgevl.core.a"}
    assert edges["bgevl.core.c"] == {"bgevl.runtime.d"}  # a type-only import counts
    assert floor_of("bgevl.core.a") == "core" and floor_of("bgevl.runtime.b") == "services"
    assert floor_of("bgevl.serving.cli") == "drivers" and floor_of("bgevl.serving.server") == "services"


def test_no_function_is_longer_than_80_lines():
    """Long functions hide steps that deserve names (the export, the API app and the benchmark were 114-195)."""
    long = []
    for name, (path, _) in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
