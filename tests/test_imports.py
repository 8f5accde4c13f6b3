"""No import circles in the package: every `import` of every module under src/effnet, those inside
functions included (a deferred import hides a circle, it does not remove it), read with `ast`
without importing anything, form a graph that must have no cycle.

An edge goes to the module an import names (`from effnet.search import report` names the module
effnet.search.report, `from effnet.search import search` the package effnet.search), not to the
parent packages Python initialises on the way: those would make every module a neighbour of
effnet/__init__.py. Imports under `if TYPE_CHECKING:` count too: a type-only circle still ties two
layers together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "effnet"

# Circles someone is removing right now, each as the exact set of modules in it. A circle listed
# here turns the test into an expected failure while it is still there; any other circle fails.
# (Empty: export <-> inference went when export became a package.)
KNOWN_CIRCLES: set[frozenset[str]] = set()


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (packages by __init__.py)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module `name` (source `path`) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(_longest_known_prefix(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, name, is_package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in known else _longest_known_prefix(base, known))
    targets.discard(None)
    targets.discard(name)  # `from effnet.search import grid` inside effnet/search/__init__ is not a loop
    return targets


def _absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module or ""
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _longest_known_prefix(dotted: str, known: set[str]) -> str | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None  # a module outside the package


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm): each is a
    set of modules that all reach one another through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: frozenset[str], graph: dict[str, set[str]]) -> str:
    """A circle as its modules and the imports between them, e.g. 'a -> b, b -> a'."""
    edges = [f"{a} -> {b}" for a in sorted(component) for b in sorted(graph[a] & component)]
    return "{" + ", ".join(sorted(component)) + "}: " + ", ".join(edges)


def test_the_graph_sees_imports_inside_functions_and_relative_imports(tmp_path: Path) -> None:
    package = tmp_path / "effnet"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from effnet.sub import b\n")
    (package / "a.py").write_text("def later():\n    from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("import os\n\nif True:\n    import effnet.a as a\n")
    (package / "sub" / "c.py").write_text("from .. import a\nfrom . import b\n")
    graph = import_graph(package)
    assert graph == {
        "effnet": {"effnet.sub.b"},
        "effnet.a": {"effnet.sub.b"},
        "effnet.sub": set(),
        "effnet.sub.b": {"effnet.a"},
        "effnet.sub.c": {"effnet.a", "effnet.sub.b"},
    }
    assert circles(graph) == [frozenset({"effnet.a", "effnet.sub.b"})]
    assert circles({"x": {"y"}, "y": {"z"}, "z": set()}) == []


def test_no_import_circles_in_the_package() -> None:
    graph = import_graph()
    assert len(graph) > 30 and graph["effnet.cli.search"], "the graph should hold every module and its imports"
    found = circles(graph)
    unexpected = [c for c in found if c not in KNOWN_CIRCLES]
    assert not unexpected, "import circles:\n" + "\n".join(describe(c, graph) for c in unexpected)
    remaining = [c for c in found if c in KNOWN_CIRCLES]
    if remaining:
        pytest.xfail("known circle, being removed: " + "; ".join(describe(c, graph) for c in remaining))
