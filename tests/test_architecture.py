"""The layering of docs/design.md, enforced: the core and the training backend never import streamlit, the core
never imports the training backend, and the app reaches the analyses only through `vitviz.pipeline` (and never
through the command line, `vitviz.cli`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


def _imports_in(source: str, package: str) -> set[str]:
    """Every module some source imports, as full dotted names ("from a.b import c" gives a.b and a.b.c),
    with relative imports resolved against `package`, the package the source lives in."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def _forbidden_for_the_app(names: set[str]) -> list[str]:
    forbidden = ("vitviz.capture", "vitviz.analysis", "vitviz.cli")
    return sorted(n for n in names if any(_within(n, module) for module in forbidden))


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


def test_the_app_reaches_analyses_only_through_the_pipeline() -> None:
    """Pages call `vitviz.pipeline`'s service and only cache and draw: no capture or analysis code of their own."""
    files = _python_files(ROOT / "vitviz" / "ui")
    assert len(files) > 5, "no app modules found"
    offenders = {
        str(p.relative_to(ROOT)): found
        for p in files
        if (found := _forbidden_for_the_app(_imports_in(p.read_text(encoding="utf-8"), "vitviz.ui")))
    }
    assert offenders == {}


@pytest.mark.parametrize(
    "source",
    [
        "import vitviz.capture",
        "import vitviz.analysis.rollout as rollout",
        "from vitviz.analysis import patch_grid",
        "from vitviz.analysis.rollout import patch_grid",
        "from vitviz import analysis",
        "from vitviz import capture, pipeline",
        "from .. import capture",
        "from ..analysis.filters import filter_pca",
        "def f():\n    from vitviz.capture import capture_attention\n",
        "from vitviz.cli import collect_images",
        "from vitviz import cli",
    ],
)
def test_the_app_rule_sees_every_spelling_of_a_forbidden_import(source: str) -> None:
    assert _forbidden_for_the_app(_imports_in(source, "vitviz.ui")) != []


@pytest.mark.parametrize(
    "source",
    [
        "import vitviz.pipeline",
        "from vitviz import pipeline",
        "from vitviz.pipeline import top_k",
        "from . import cached",
    ],
)
def test_the_app_rule_allows_the_pipeline(source: str) -> None:
    assert _forbidden_for_the_app(_imports_in(source, "vitviz.ui")) == []


@pytest.mark.parametrize("path", ["vitviz/faithfulness.py", "training/evaluate.py", "vitviz/pipeline.py"])
def test_services_get_maps_and_attention_from_the_registries_not_the_capture(path: str) -> None:
    """The faithfulness comparison and training's evaluation ask the map-method registry (vitviz/methods.py) for
    maps; the pipeline asks the analysis registry's streams; only those registries touch the capture's
    internals (the pipeline runs the one shared forward through `capture_attention`)."""
    source = (ROOT / path).read_text(encoding="utf-8")
    names = _imports_in(source, path.replace("/", ".").removesuffix(".py").rsplit(".", 1)[0])
    capture = sorted(n for n in names if _within(n, "vitviz.capture"))
    allowed = {"vitviz.capture", "vitviz.capture.QueryAttention", "vitviz.capture.capture_attention"}
    allowed |= {"vitviz.capture.attention_modules", "vitviz.capture.unreadable_reason"}
    assert set(capture) <= (allowed if path == "vitviz/pipeline.py" else set()), capture
