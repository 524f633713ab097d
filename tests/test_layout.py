"""The project's shape: no import circles, the layering jobs -> pipeline -> conflayers, a room per use.

Imports are read from the source (every ``import`` / ``from ... import`` statement, at module level
or inside a function), so an import deferred into a function to dodge a circle still counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("conflayers", "pipeline", "jobs")
USES = ("summarize", "cost", "serve")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:  # pipeline.run.run -> pipeline.run
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    g = {n: imports_of(n, p, known) for n, p in mods.items()}
    # a package's __init__ runs before any of its modules: importing pkg.mod imports pkg
    for n in list(g):
        g[n] = {d for d in g[n] if not n.startswith(d + ".")}
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert cycles(graph()) == []


def test_layering():
    g = graph()
    for name, deps in g.items():
        top = name.split(".")[0]
        if top == "conflayers":
            assert not {d for d in deps if d.split(".")[0] in ("pipeline", "jobs")}, name
        if top == "pipeline":
            assert not {d for d in deps if d.startswith("jobs")}, name
    for path in (ROOT / "conflayers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for n in names:
                assert n.split(".")[0] not in ("ray", "pyarrow", "s3fs", "omegaconf"), f"{path}: imports {n}"


@pytest.mark.parametrize("use", USES)
def test_a_room_per_use(use):
    """Each use is a sub-package whose docstring names its entry point and every file in it; the core
    (pipeline's top level) never imports a use."""
    pkg = ROOT / "pipeline" / use
    doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text())) or ""
    assert f"jobs/{use}.py" in doc and f"python -m jobs.{use}" in doc
    for f in pkg.glob("*.py"):
        if f.name != "__init__.py":
            assert f"``{f.stem}``" in doc, f"pipeline/{use}/__init__.py does not name {f.name}"
    g = graph()
    core = [n for n in g if n.startswith("pipeline.") and n.count(".") == 1 and n not in
            {f"pipeline.{u}" for u in USES}]
    for n in core:
        assert not {d for d in g[n] if d.split(".")[:2][-1] in USES and d.startswith("pipeline.")}, n


ROOMS = ("drafts", "search", "costs")
# the engine core: conflayers' top-level modules but its entry points (the public API, the CLI)
ENTRIES = {"conflayers", "conflayers.__main__", "conflayers.cli"}


@pytest.mark.parametrize("room", ROOMS)
def test_a_room_per_concern_in_the_engine(room):
    """Each room under conflayers/ is a sub-package whose docstring names every file in it and the
    one a reader enters by."""
    pkg = ROOT / "conflayers" / room
    doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text())) or ""
    assert "Enter by" in doc, f"conflayers/{room}/__init__.py does not say where to enter"
    files = [f for f in pkg.glob("*.py") if f.name != "__init__.py"]
    assert files
    for f in files:
        assert f"``{f.stem}``" in doc, f"conflayers/{room}/__init__.py does not name {f.name}"


def test_the_engine_core_reaches_drafts_only_through_the_seam():
    g = graph()
    core = [n for n in g if n.startswith("conflayers.") and n.count(".") == 1
            and n.split(".")[1] not in ROOMS and n not in ENTRIES]
    assert "conflayers.engine" in core and "conflayers.kv" in core
    for n in core:
        rooms = {d for d in g[n] if d.split(".")[1:2] and d.split(".")[1] in ROOMS}
        assert rooms <= {"conflayers.drafts.seam"}, f"{n} imports {sorted(rooms)}"

