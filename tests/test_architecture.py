"""The engine's shape, checked from its source: data flows down (no import cycle in `s3t_ops` or `pipelines`, lazy
imports inside functions and type-only imports included: a module that names another's type depends on it), the
engine never imports dagster, the facade stays small, and a module over 500 lines says at its top why it is long."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("s3t_ops", "pipelines")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere: at the top, inside a function, under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            for alias in node.names:
                out.add(f"{base}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    resolved = set()
    for target in out:
        while target and target not in known:
            target = target.rsplit(".", 1)[0] if "." in target else ""
        if target and target != name:
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {name: imports_of(path, name, known) for name, path in mods.items()}
    # importing a.b.c runs a/__init__ and a/b/__init__ first: a package's __init__ is not an edge of its own children
    return {n: {t for t in deps if not n.startswith(t + ".")} for n, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle_in_the_engine_or_the_pipeline():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_engine_never_imports_dagster():
    graph_files = {n: p for n, p in _modules().items() if n.startswith("s3t_ops")}
    for name, path in graph_files.items():
        assert "import dagster" not in path.read_text() and "from dagster" not in path.read_text(), name


def test_the_facade_is_small_and_long_modules_say_why():
    assert len((ROOT / "s3t_ops" / "engine.py").read_text().splitlines()) <= 200
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > 500:
            head = "\n".join(lines[:30]).lower()
            assert "long because" in head, f"{name} has {len(lines)} lines and does not say at its top why"
