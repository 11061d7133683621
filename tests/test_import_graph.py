"""The import graph of our packages, read from the source: no loops, and the runtime stands on its own.

`sr_runtime` is the torch-free ground floor the other packages build on; an
import from it up into them (even a lazy one, or an `importlib.import_module`
string) would drag their dependencies into a runtime-only install. The graph is
parsed with `ast`, not imported, so lazy imports inside functions and imports
of optional extras (Ray, torch) count without needing them installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sr_runtime", "sr_export", "sr_train", "sr_cluster", "benchmarks")
#: Calls whose first argument, a string constant, names a module they import.
IMPORTING_CALLS = {"import_module", "__import__"}
#: Loops still to break: none. A new one is fixed, not listed.
KNOWN_LOOPS: set[frozenset[str]] = set()


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of our packages."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that importing `name` runs: itself, or its nearest enclosing module of ours."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that `module` imports anywhere in its source (top level, functions, TYPE_CHECKING)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in IMPORTING_CALLS:
                names = [node.args[0].value]
        for name in names:
            target = _target(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def loops(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The graph's loops: each set of modules that all reach one another (a strongly connected component > 1)."""
    reach: dict[str, set[str]] = {}
    for start in graph:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph.get(module, ()))
        reach[start] = seen
    return {
        frozenset({start, *(m for m in reach[start] if start in reach[m])})
        for start in graph
        if any(start in reach[m] for m in reach[start])
    }


def test_the_graph_sees_every_kind_of_import() -> None:
    """Relative, lazy (inside a function), `from pkg import module` and importlib-string imports are edges."""
    graph = import_graph()
    assert "sr_runtime.errors" in graph["sr_runtime"]  # from sr_runtime.errors import ...
    assert "sr_train.checkpoint" in graph["sr_train.cli"]  # `from .checkpoint import ...` inside a function
    assert "sr_cluster.batch" in graph["benchmarks.cluster_batch"]


def test_loops_are_the_mutually_reachable_sets() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"a"}}
    assert loops(graph) == {frozenset("abc"), frozenset("de")}
    assert loops({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == set()


def test_no_import_loops() -> None:
    """No loops but the listed ones; one that is gone must leave the list too, so the list only shrinks."""
    found = loops(import_graph())
    assert found == KNOWN_LOOPS, "import loops: " + "; ".join(" <-> ".join(sorted(loop)) for loop in found)


def test_the_runtime_imports_nothing_of_ours_outside_it() -> None:
    """Checks the source, importlib strings included: `sr_runtime` must run with only its own dependencies."""
    upward = {
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if module.startswith("sr_runtime")
        for target in targets
        if not target.startswith("sr_runtime")
    }
    assert not upward
