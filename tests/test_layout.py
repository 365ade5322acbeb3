"""The layout stays what the README says: no import cycles (imports inside functions count), no
module takes another's private names, the engine depends only on leaf modules, modules stay short.

Read from the source with ``ast``: nothing is imported, so a cycle that only bites at run time in
some order is still seen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "sdterm"
MAX_LINES = 420
LEAVES = {"sdterm", "sdterm.config", "sdterm.params", "sdterm.samplers", "sdterm.errors", "sdterm.units", "sdterm.fsutil",
          "sdterm.paths", "sdterm.prompt_syntax"}
"""Modules outside sdterm/engine/ that the engine may import: they import no other sdterm module
except each other."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported sdterm module, names taken from it) for every import statement, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "sdterm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sdterm":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            out += [(m, []) for m in submodules]
            rest = [n for n in names if f"{target}.{n}" not in known]
            if rest or not submodules:
                out.append((target, rest))
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, list[str]]]]:
    mods = modules()
    known = set(mods)
    return {name: [(t, n) for t, n in imports(name, path, known) if t in known] for name, path in mods.items()}


def cycles_of(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles(graph):
    assert cycles_of({m: {t for t, _ in deps if t != m} for m, deps in graph.items()}) == []


def test_no_private_names_cross_modules(graph):
    taken = [(m, t, n) for m, deps in graph.items() for t, names in deps for n in names
             if n.startswith("_") and not n.startswith("__") and t != m]
    assert taken == []


def test_the_engine_depends_only_on_leaves(graph):
    outside = sorted({(m, t) for m, deps in graph.items() if m.startswith("sdterm.engine")
                      for t, _ in deps if not t.startswith("sdterm.engine") and t not in LEAVES})
    assert outside == []
    leaf_deps = sorted({(m, t) for m in LEAVES for t, _ in graph.get(m, []) if t not in LEAVES and t != m})
    assert leaf_deps == []  # a leaf that grew an import of the rest would pull it into the engine


def test_modules_stay_short():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path):
    """The tests above would fail on a real cycle through a function-level import, and on a
    private name taken across modules."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from sdterm.b import _hidden\n")
    b = tmp_path / "b.py"
    b.write_text("from sdterm import a\n")
    known = {"sdterm.a", "sdterm.b"}
    deps_a = imports("sdterm.a", a, known)
    deps_b = imports("sdterm.b", b, known)
    assert deps_a == [("sdterm.b", ["_hidden"])] and deps_b == [("sdterm.a", [])]
    assert cycles_of({"sdterm.a": {"sdterm.b"}, "sdterm.b": {"sdterm.a"}, "sdterm.c": {"sdterm.a"}}) == [
        ["sdterm.a", "sdterm.b"]
    ]
