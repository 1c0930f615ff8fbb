"""The package's layers: every module sits below the modules that use it (issue 17).

An import circle means two modules each need the other, so neither can be read, tested or moved
alone, and which one Python finishes first decides what a half-initialised module holds. The
circles once in flyp were hidden behind imports inside functions (``recipe`` <-> ``methods``,
``train`` <-> ``predict``, ``data.benchmarks`` <-> ``data.paper``), so the graph here counts
every import of a flyp module, at the top of a file, inside a function or under TYPE_CHECKING.
(That is stronger than importing each module alone in a fresh interpreter, which sees only the
circles at import time, and costs a torch import per module.)
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((SRC / "flyp").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The flyp modules ``name`` imports, anywhere in its file. ``from flyp.data import check``
    names the module flyp.data.check, not the package; a package's own ``__init__`` is an edge
    only when something is taken from it (``from flyp.data import build_benchmark``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            subs = {f"{base}.{a.name}" for a in node.names}
            modules = subs & known
            found.update(modules)
            if base in known and len(modules) < len(subs):
                found.add(base)  # a name defined in the package (or module) itself
    found.discard(name)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circles():
    files = module_files()
    graph = {name: imported(name, path, set(files)) for name, path in files.items()}
    assert circles(graph) == []


def test_the_graph_reader_sees_circles_hidden_in_functions(tmp_path):
    """The reader above must see an import inside a function, a relative import and a package
    edge, and find a circle, or the test above would pass on any code."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    path = tmp_path / "x.py"
    path.write_text(
        "def f():\n    from flyp.recipe import RecipeError\n\n"
        "from . import folders\nfrom flyp.data import build_benchmark\n"
    )
    known = {"flyp.recipe", "flyp.data.folders", "flyp.data"}
    assert imported("flyp.data.x", path, known) == known
