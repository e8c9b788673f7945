"""The shape of the studio's code under vitviz/ui, read with `ast`: helpers defined once and imported, not
copied from module to module."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "vitviz" / "ui"


def _modules() -> list[Path]:
    files = sorted(UI.glob("*.py"))
    assert len(files) > 5, "no app modules found"
    return files


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_no_class_or_private_helper_is_defined_in_two_app_modules() -> None:
    """A copy of a class or of a private helper in a second module drifts from the first; import it instead.
    (Pages share the name `render`, and vitviz/ui/cached.py wraps analyses under their own names: both public.)"""
    where: dict[str, list[str]] = defaultdict(list)
    for path in _modules():
        for node in _tree(path).body:
            if isinstance(node, ast.ClassDef) or (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_")
            ):
                where[node.name].append(path.name)
    assert {name: files for name, files in where.items() if len(files) > 1} == {}
