"""Shared test fixtures."""

from __future__ import annotations

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
