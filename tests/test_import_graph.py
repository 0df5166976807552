"""dlengine's internal imports form a DAG, and the engine never imports models.

Every module of the package is parsed with `ast` (nothing is imported), and each `import` /
`from ... import` naming a dlengine module becomes an edge of a graph; a DFS then looks for
cycles. Imports anywhere in a file count, function-level ones included: a lazy import defers a
cycle to run time rather than removing it (the design guide asks for cycles to be fixed, not
hidden in a lazy import), so it is as much a dependency as a module-level one. Not counted: the
implicit import of a module's parent packages (`import dlengine.a.b` runs dlengine/__init__.py,
which imports the builder, which imports everything: every module would depend on everything).
`from pkg import name` is an edge to pkg.name when that is a module, else to pkg.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "dlengine"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The dlengine modules `name` (at `path`) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, one level up per extra dot
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import dlengine.a.b.c` where c is an attribute
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("dlengine"):
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first search (iterative: no recursion limit)."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    cycles: list[list[str]] = []
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        color[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                color[node] = BLACK
                stack.pop()
                path.pop()
            elif color[child] == GREY:
                cycles.append(path[path.index(child):] + [child])
            elif color[child] == WHITE:
                color[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return cycles


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "dlengine.builder" in graph and "dlengine.kernels.selection" in graph
    assert "dlengine.kernels.context" in graph["dlengine.engine.runner"]
    # a function-level import counts: the selection imports the triton backend only when asked for
    assert "dlengine.kernels.attention.triton_backend" in graph["dlengine.kernels.selection"]


def test_find_cycles_reports_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles_in_dlengine():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_engine_never_imports_models():
    bad = {m: sorted(t for t in targets if t == "dlengine.models" or t.startswith("dlengine.models."))
           for m, targets in import_graph().items() if m.startswith("dlengine.engine")}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"dlengine.engine imports from dlengine.models: {bad}"


def test_kernels_import_neither_models_nor_engine():
    bad = {m: sorted(t for t in targets if t.startswith(("dlengine.models", "dlengine.engine")))
           for m, targets in import_graph().items() if m.startswith("dlengine.kernels")}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"dlengine.kernels imports upwards: {bad}"
