"""The studio's page list (vitviz/ui/pages.py) is the one place pages are declared: app.py's navigation and
the overview's guide both come from it, and every page it names exists."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from vitviz.ui import pages

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"


@pytest.fixture(autouse=True)
def app_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own runs and cache folders (the app reads both from the environment)."""
    (tmp_path / "runs").mkdir()
    monkeypatch.setenv("VITVIZ_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("VITVIZ_CACHE_DIR", str(tmp_path / "cache"))


def test_every_declared_page_exists_once() -> None:
    assert [page.path for page in pages.PAGES if not (ROOT / page.path).is_file()] == []
    for field in ("path", "title", "url_path"):
        values = [getattr(page, field) for page in pages.PAGES]
        assert len(set(values)) == len(values), f"two pages share a {field}"
    assert [page.path for page in pages.PAGES if page.default] == ["vitviz/ui/overview.py"]
    assert all(page.about.strip() and "\n" not in page.about for page in pages.PAGES)
    page_modules = {
        f"vitviz/ui/{path.name}"
        for path in (ROOT / "vitviz" / "ui").glob("*.py")
        if "\ndef render(" in path.read_text()
    }
    assert {page.path for page in pages.PAGES} == page_modules, "a page module is missing from the list"


def test_the_page_list_imports_only_the_standard_library() -> None:
    """Reading the list costs nothing: no torch, no streamlit, no other part of vitviz."""
    tree = ast.parse((ROOT / "vitviz" / "ui" / "pages.py").read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= set(sys.stdlib_module_names) | {"__future__"}


def test_the_app_and_the_overview_show_the_same_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """app.py registers every declared page; the overview links to every page but itself, /tokens and /trust
    included, each link resolved by the navigation to the page's own URL."""
    assert DEFAULT.is_file(), f"the bundled default checkpoint {DEFAULT} is missing"
    registered: list[tuple[str, str]] = []
    navigation = st.navigation

    def recording(app_pages, **kwargs):  # type: ignore[no-untyped-def]
        registered[:] = [(page.url_path, page.title) for page in app_pages]  # the default page's is ""
        return navigation(app_pages, **kwargs)

    monkeypatch.setattr(st, "navigation", recording)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert registered == [(page.url_path, page.title) for page in pages.PAGES]
    links = [(link.proto.page, link.value) for link in at.page_link]
    assert links == [(page.url_path, page.title) for page in pages.guide()]
    assert {"tokens", "trust"} <= {page for page, _ in links}
