"""Shared test fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small models run fastest on one thread; several threads on a busy 2-core machine spin against each other.

    Modules that train or evaluate small models use it with `pytestmark = pytest.mark.usefixtures(...)`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _runs_started_here_are_each_tests_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The studio remembers the training processes it started in module globals (vitviz.ui.runs, one server's
    memory); each test starts with none, so a run one test left behind never shows in another's runs table."""
    runs = sys.modules.get("vitviz.ui.runs")
    if runs is not None:
        monkeypatch.setattr(runs, "_PROCESSES", {})
        monkeypatch.setattr(runs, "_STARTED_AT", {})


@pytest.fixture(scope="module")
def module_app_folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A runs folder and a cache folder of the module's own for the studio (read from the environment), shared by
    the module's tests so one disk cache serves them all."""
    runs, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITVIZ_RUNS_DIR", str(runs))
        patch.setenv("VITVIZ_CACHE_DIR", str(cache))
        yield
