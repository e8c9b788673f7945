"""/distance on a data-set slice through Streamlit's AppTest: the page shows what `vitviz.pipeline.dataset_analyses`
computes for the first images of the chosen split, the numbers of `python -m vitviz analyze --dataset`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from vitviz.cli import main

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
TIMEOUT = 180

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def app_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own runs folder and cache folder (the app reads both from the environment)."""
    (tmp_path / "runs").mkdir()
    monkeypatch.setenv("VITVIZ_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("VITVIZ_CACHE_DIR", str(tmp_path / "cache"))


def _distance_page() -> AppTest:
    assert DEFAULT.is_file(), f"the bundled default checkpoint {DEFAULT} is missing"
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    at.switch_page("vitviz/ui/distance.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _cli_distance(tmp_path: Path, *arguments: str) -> np.ndarray:
    out = tmp_path / "cli.json"
    assert main(["analyze", str(DEFAULT), "--analyses", "distance", *arguments, "--json", str(out)]) == 0
    return np.asarray(json.loads(out.read_text())["distance"]["pixels"])


def test_a_data_set_slice_shows_the_cli_numbers(tmp_path: Path) -> None:
    at = _distance_page()
    at.segmented_control(key="distance.source").set_value("Data set").run()
    at.selectbox(key="distance.dataset.name").set_value("shapes").run()
    at.selectbox(key="distance.dataset.split").set_value("val").run()
    at.number_input(key="distance.dataset.limit").set_value(12).run()
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] == []
    table = at.dataframe[0].value
    pixels = _cli_distance(tmp_path, "--dataset", "shapes", "--split", "val", "--limit", "12")
    np.testing.assert_allclose(table["mean px"].to_numpy(), pixels.mean(axis=1).round(1), atol=1e-9)
    np.testing.assert_allclose(table["max px"].to_numpy(), pixels.max(axis=1).round(1), atol=1e-9)

    # Another slice, another answer; the renormalised mode can only lengthen distances (prefix attention kept).
    at.number_input(key="distance.dataset.limit").set_value(3).run()
    assert not at.exception
    fewer = at.dataframe[0].value["mean px"].to_numpy()
    np.testing.assert_allclose(
        fewer, _cli_distance(tmp_path, "--dataset", "shapes", "--split", "val", "--limit", "3").mean(axis=1).round(1)
    )
    assert not np.array_equal(fewer, table["mean px"].to_numpy())
    at.segmented_control(key="distance.mode").set_value("renormalised").run()
    assert not at.exception
    renormalised = at.dataframe[0].value["mean px"].to_numpy()
    assert (renormalised >= fewer - 0.05).all() and (renormalised > fewer).any()


def test_grey_digits_reach_an_rgb_model_and_the_samples_stay_the_default() -> None:
    at = _distance_page()
    assert at.selectbox(key="distance.set").value is not None  # the sample sets are still the default source
    samples = at.dataframe[0].value["mean px"].to_numpy()
    at.segmented_control(key="distance.source").set_value("Data set").run()
    at.selectbox(key="distance.dataset.name").set_value("digits").run()
    at.number_input(key="distance.dataset.limit").set_value(4).run()
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] == []
    digits = at.dataframe[0].value["mean px"].to_numpy()
    assert digits.shape == samples.shape and np.isfinite(digits).all()
    assert any("digits test: 4 images" in json.dumps(json.loads(c.proto.spec)) for c in at.get("plotly_chart"))
