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


def test_a_data_set_run_releases_freed_memory_every_so_many_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """`releasing` passes every update on and releases once each time another `every` units are done, however
    the units come in batches."""
    released, updates = [], []
    monkeypatch.setattr(vitviz.allocator, "release_free_memory", lambda: released.append(sum(updates)) or True)
    progress = vitviz.allocator.releasing(updates.append, every=10)
    for units in (4, 4, 4, 16, 1, 30):
        progress(units)
    assert updates == [4, 4, 4, 16, 1, 30]
    assert released == [12, 28, 59]  # past 10, past 20 (28 crosses it once), past 30, 40 and 50 (once)


def test_releasing_freed_memory_runs_on_glibc_and_not_when_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VITVIZ_MALLOC", raising=False)
    assert vitviz.allocator.release_free_memory() is GLIBC_LINUX
    monkeypatch.setenv("VITVIZ_MALLOC", "default")
    assert vitviz.allocator.release_free_memory() is False


@pytest.mark.parametrize(
    ("argv", "releases"),
    [
        (["analyze", "--analyses", "distance"], 2),  # 8 images, a release every 4
        (["faithfulness", "--methods", "random", "--steps", "4"], 2),  # 8 maps
        (["compare", "--methods", "none"], 2),  # 2 batches of 4 images, 12 units each: once a batch
    ],
)
def test_the_clis_data_set_runs_release_freed_memory(
    argv: list[str], releases: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitviz.cli import main

    released = []
    monkeypatch.setattr(vitviz.allocator, "RELEASE_EVERY", 4)
    monkeypatch.setattr(vitviz.allocator, "release_free_memory", lambda: released.append(1) or True)
    model = str(ROOT / "assets" / "checkpoints" / "shapes-default.safetensors")
    models = [model, model] if argv[0] == "compare" else [model]
    command = [argv[0], *models, *argv[1:], "--dataset", "shapes", "--limit", "8", "--batch-size", "4"]
    assert main([*command, "--json", str(tmp_path / "out.json")]) == 0
    assert len(released) == releases
