"""vitviz.allocator: vitviz's programs fix glibc's malloc thresholds, never an import and never the library's
code; it can be turned off."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

import vitviz.allocator
from tests.test_imports import import_graph, project_modules
from vitviz.allocator import tune_malloc

ROOT = Path(__file__).resolve().parents[1]
GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _fresh(monkeypatch: pytest.MonkeyPatch, value: str | None) -> bool:
    if value is None:
        monkeypatch.delenv("VITVIZ_MALLOC", raising=False)
    else:
        monkeypatch.setenv("VITVIZ_MALLOC", value)
    return vitviz.allocator.tune_malloc.__wrapped__()


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc's mallopt only")
def test_thresholds_are_set_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _fresh(monkeypatch, None) is True


def test_vitviz_malloc_default_leaves_the_allocator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _fresh(monkeypatch, "default") is False


def test_importing_vitviz_does_not_touch_the_allocator() -> None:
    """Only the programs call it: a library user's process keeps its own malloc settings."""
    code = (
        "import vitviz.allocator, vitviz.pipeline, vitviz.capture, vitviz.cli;"
        "print(vitviz.allocator.tune_malloc.cache_info().currsize)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0"


def test_once_per_process() -> None:
    first = tune_malloc()
    assert tune_malloc() is first and tune_malloc.cache_info().currsize == 1


def test_only_the_programs_import_the_allocator() -> None:
    """The setting belongs to the entry points; no library module (capture, pipeline, analyses) reads it, so a
    library call behaves the same whatever the process's malloc settings."""
    graph = import_graph(project_modules())
    importers = {module for module, targets in graph.items() if "vitviz.allocator" in targets}
    programs = {"vitviz.cli", "vitviz.ui.startup", "bench.__main__"}  # the CLI, the studio's server start, the bench
    assert importers <= programs | {"bench.memory", "bench.tokens", "bench.finetune"}, importers  # + memory probes
    assert "vitviz.cli" in importers and "bench.__main__" in importers  # the programs do call it
    assert "from vitviz.allocator import tune_malloc" in (ROOT / "app.py").read_text()
