"""DESIGN.md's layering, enforced: the core and the training backend never import streamlit,
and the core never imports the training backend."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _python_files(folder: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    return [p for p in sorted(folder.rglob("*.py")) if not any(part in exclude for part in p.parts)]


def test_core_and_training_never_import_streamlit() -> None:
    files = _python_files(ROOT / "vitviz", exclude=("ui",)) + _python_files(ROOT / "training")
    assert files, "no source files found"
    offenders = [str(p.relative_to(ROOT)) for p in files if "streamlit" in _imported_modules(p)]
    assert offenders == []


def test_vitviz_never_imports_training() -> None:
    """training imports vitviz, never the reverse: the app starts `python -m training` as a subprocess."""
    offenders = [str(p.relative_to(ROOT)) for p in _python_files(ROOT / "vitviz") if "training" in _imported_modules(p)]
    assert offenders == []


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    marker = "<!-- test-command -->"
    assert marker in readme, "README must mark its test command"
    block = readme.split(marker, 1)[1].split("```", 2)[1]
    command = next(line for line in block.splitlines() if line.strip() and not line.startswith("bash")).strip()
    assert command in ci
