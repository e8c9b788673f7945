"""The project's own modules import each other without cycles, type-only imports included.

The graph is read from the source with ast, so every import counts: at the top of a module, inside a function,
and under ``if TYPE_CHECKING:``. An edge goes from a module to the project module it names: ``import a.b`` and
``from a.b import c`` point at ``a.b``, or at ``a.b.c`` when that is a module itself. A package's ``__init__``
is the package's module, so a submodule that imports its own package's ``__init__`` (which imports the
submodule back) is a cycle too. Importing a submodule also runs its parents' ``__init__`` first; those
implicit edges are left out, or every package that re-exports its submodules would be a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vitviz", "training", "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def imported_modules(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The project modules the tree's import statements name, relative imports resolved."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # "from a.b import c": the module a.b.c if there is one, else a.b
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module name -> the project modules it imports."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = imported_modules(tree, name, path.name == "__init__.py", set(modules))
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between modules: in every strongly connected component (Tarjan's algorithm), a shortest cycle
    through each of its modules, each written once, starting at its first module in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles: list[list[str]] = []
    for component in sorted(components):
        for start in component:
            cycle = _cycle_through(graph, set(component), start)[:-1]
            first = cycle.index(min(cycle))
            cycle = [*cycle[first:], *cycle[:first], min(cycle)]
            if cycle not in cycles:
                cycles.append(cycle)
    return cycles


def _cycle_through(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest cycle through `start` within its component, as a path that returns to it."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a strongly connected component always has one


def _graph_of(sources: dict[str, str], tmp_path: Path) -> dict[str, set[str]]:
    modules = {}
    for name, text in sources.items():
        path = tmp_path / Path(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        modules[name.removesuffix(".__init__")] = path
    return import_graph(modules)


def test_no_import_cycles_in_the_project() -> None:
    modules = project_modules()
    assert {"vitviz.capture", "vitviz.models.checkpoint", "bench.common", "training.engine"} <= set(modules)
    graph = import_graph(modules)
    assert "vitviz.models.factory" in graph["vitviz.models.checkpoint"]  # the graph sees real edges
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_type_checking_and_relative_imports_are_edges(tmp_path: Path) -> None:
    graph = _graph_of(
        {
            "pkg.__init__": "from pkg.a import A\n",
            "pkg.a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\nA = 1\n",
            "pkg.b": "from . import c\nB = 2\n",  # c is a module: the edge goes to it, not to pkg
            "pkg.c": "def f():\n    from .a import A\n    return A\n",
        },
        tmp_path,
    )
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"a"}}, []),  # a module importing itself is not a cycle between modules
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b", "a"]]),
        ({"x": {"y"}, "y": {"z"}, "z": {"x", "y"}}, [["x", "y", "z", "x"], ["y", "z", "y"]]),
        ({"m": {"a", "t"}, "a": {"m"}, "t": {"m"}, "c": set()}, [["a", "m", "a"], ["m", "t", "m"]]),
    ],
)
def test_find_cycles(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert find_cycles(graph) == expected


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--help"], 0),
        (["analyze", "--help"], 0),
        (["analyze", "m.safetensors", "--analyses", "nope", "--json", "-"], 2),
        (["analyze", "m.safetensors", "--components", "0", "--json", "-"], 2),
        (["info"], 2),
        (["faithfulness", "--help"], 0),
        (["faithfulness", "m.safetensors", "--methods", "saliency", "--json", "-"], 2),
        (["compare", "--help"], 0),
        (["compare", "a.safetensors", "b.safetensors", "--methods", "saliency", "--json", "-"], 2),
        (["compare", "a.safetensors", "b.safetensors", "--dataset", "shapes"], 2),
    ],
)
def test_help_and_argument_errors_import_no_torch(argv: list[str], code: int) -> None:
    """`python -m vitviz --help` and a mistake in the arguments answer before torch is imported (-X importtime
    lists every module the interpreter imported)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vitviz", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "vitviz.cli" in imported
    assert not {"torch", "timm", "torchvision"} & imported
