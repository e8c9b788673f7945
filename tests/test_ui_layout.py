"""The shape of the studio's code under vitviz/ui, read with `ast`: helpers defined once and imported, not
copied from module to module; no function longer than a screenful or two; no page reaching past the pipeline
into the command line or the capture hooks."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from vitviz.ui.pages import PAGES

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "vitviz" / "ui"


def _modules() -> list[Path]:
    files = sorted(UI.glob("*.py"))
    assert len(files) > 5, "no app modules found"
    return files


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_no_class_or_shared_helper_is_defined_in_two_app_modules() -> None:
    """A copy of a class, or of a helper of the modules pages share (analyses, caches, widgets), in a second
    module drifts from the first; import it instead. Pages keep their own private section functions (each page
    its `_controls`, `_downloads`), and vitviz/ui/cached.py wraps analyses under their own public names."""
    pages = {Path(page.path).name for page in PAGES}
    where: dict[str, list[str]] = defaultdict(list)
    for path in _modules():
        for node in _tree(path).body:
            if isinstance(node, ast.ClassDef) or (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_")
            ):
                where[node.name].append(path.name)
    copies = {
        name: files
        for name, files in where.items()
        if len(files) > 1 and (name.lstrip("_")[:1].isupper() or any(file not in pages for file in files))
    }
    assert copies == {}


MAX_FUNCTION_LINES = 120


def _function_lengths(tree: ast.Module) -> dict[str, int]:
    """Every function's length in lines, from its `def` to its last line (nested functions counted too)."""
    return {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None
    }


def test_no_app_function_is_longer_than_120_lines() -> None:
    """Pages only draw: a page's `render` reads its controls and calls well-named section functions."""
    too_long = {
        f"{path.name}:{name}": lines
        for path in _modules()
        for name, lines in _function_lengths(_tree(path)).items()
        if lines > MAX_FUNCTION_LINES
    }
    assert too_long == {}


def test_the_length_rule_counts_a_whole_function() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    lengths = _function_lengths(ast.parse(f"def long():\n{body}\n\ndef short():\n    pass\n"))
    assert lengths == {"long": MAX_FUNCTION_LINES + 1, "short": 2}


def _imports(tree: ast.Module) -> set[str]:
    """Every module imported, as dotted names: `from vitviz import cli` gives vitviz and vitviz.cli."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: from vitviz.ui, `..` is vitviz
            base = "vitviz" if node.level == 2 else "vitviz.ui"
            module = f"{base}.{node.module}" if node.module else base
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _forbidden(names: set[str]) -> set[str]:
    return {n for n in names for m in ("vitviz.cli", "vitviz.capture") if n == m or n.startswith(m + ".")}


def test_no_app_module_imports_the_command_line_or_capture() -> None:
    """The studio reaches models through `vitviz.pipeline`, never through the command line or the hooks."""
    offenders = {path.name: sorted(found) for path in _modules() if (found := _forbidden(_imports(_tree(path))))}
    assert offenders == {}


def test_the_import_rule_sees_every_spelling() -> None:
    for source in (
        "import vitviz.cli",
        "from vitviz.cli import IMAGE_SUFFIXES",
        "from vitviz import cli",
        "from vitviz import capture, pipeline",
        "from .. import cli",
        "def f():\n    from vitviz.capture import capture_attention\n",
    ):
        assert _forbidden(_imports(ast.parse(source))), source
    assert not _forbidden(_imports(ast.parse("from vitviz import pipeline\nfrom vitviz.ui import cached")))
