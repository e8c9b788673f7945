"""Page /analyses: every registered analysis through the registry, with the numbers the CLI writes. An analysis
registered at run time shows there with no change to the studio."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from vitviz import analyses as registry
from vitviz.analyses import Analysis, FigureContext, Stream, StreamContext
from vitviz.cli import main
from vitviz.ui.catalog import discover_sample_sets

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
PAGE = "vitviz/ui/explore.py"


@pytest.fixture(autouse=True)
def app_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITVIZ_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("VITVIZ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _page() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=240)
    at.run()
    at.switch_page(PAGE).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _section(at: AppTest) -> Any:
    return json.loads(at.json[0].value)


def _captions(at: AppTest) -> list[str]:
    return [img.caption for image in at.get("image") for img in image.proto.imgs]


def test_the_page_offers_every_registered_analysis_and_shows_the_clis_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    at = _page()
    assert list(at.selectbox(key="explore.analysis").options) == [f"{a.name}: {a.summary}" for a in registry.analyses()]
    at.selectbox(key="explore.analysis").set_value("distance").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = _section(at)
    assert _captions(at) == ["distance"]
    # The same four sample images through the command line.
    files = discover_sample_sets()[0].files[:4]
    out = tmp_path / "cli.json"
    argv = ["analyze", str(DEFAULT), "--images", *map(str, files), "--analyses", "distance", "--json", str(out)]
    assert main(argv) == 0
    cli = json.loads(out.read_text(encoding="utf-8"))["distance"]
    assert shown["num_images"] == cli["num_images"] == 4
    np.testing.assert_allclose(shown["pixels"], cli["pixels"], rtol=1e-6)


class _Ones(Stream):
    def __init__(self, context: StreamContext) -> None:
        self.count = 0
        self.features = self._count

    def _count(self, features: Any) -> None:
        self.count += int(features.shape[0])

    def result(self, blocks_unfit: str | None) -> int:
        return self.count


def _figures(result: int, context: FigureContext) -> Iterator[tuple[str, Any]]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 2))
    axes = figure.add_subplot()
    axes.bar([0], [result])
    yield "image-count", figure


@pytest.fixture
def toy() -> Iterator[Analysis]:
    analysis = registry.register(
        Analysis(
            name="image-count",
            section="image_count",
            summary="how many images went through the forward",
            order=1000,
            stream=_Ones,
            to_json=lambda result, images: {"count": result, "images": list(images)},
            figures=_figures,
        )
    )
    yield analysis
    registry.unregister(analysis.name)


def test_an_analysis_registered_later_shows_on_the_page(toy: Analysis) -> None:
    at = _page()
    at.selectbox(key="explore.analysis").set_value("image-count").run()
    assert not at.exception, [e.value for e in at.exception]
    assert _section(at)["count"] == 4
    assert _captions(at) == ["image-count"]


def test_an_option_that_does_not_apply_is_one_visible_line() -> None:
    at = _page()
    at.selectbox(key="explore.analysis").set_value("filters").run()
    widget = next(w for w in at.number_input if w.key.endswith(".components"))
    widget.set_value(0).run()
    assert not at.exception
    assert [e.value.replace("\\", "") for e in at.error] == ["--components must be at least 1, got 0"]
