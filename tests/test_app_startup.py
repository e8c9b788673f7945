"""What the studio's first page costs, checked in ways machine load cannot fool: which modules a fresh process
has imported once the overview is drawn (a child process per check, so this test process's own imports do not
count), and that the once-per-server work is done once.

The latency figures themselves are bench figures (`python -m bench --only app`), never timed here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from vitviz.plots import interactive, minmax_scale, tile_mosaic
from vitviz.ui import runs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
# Needed by no part of drawing the overview: pandas and pyarrow only data tables (the card's tables are
# Markdown), the others belong to other pages or to the training backend, which the app never imports.
DEFERRED = ("pandas", "pyarrow", "transformers", "captum", "sklearn", "training")
# Pages whose drawing needs no matplotlib (their downloads import it when clicked). The overview draws its
# training curves with matplotlib, as a picture, so that a first visit needs none of Plotly's JavaScript; the
# server's start-up imports it.
PLOTLY_PAGES = ("filters", "position", "rollout", "train")

_FIRST_VISIT = """
import json, sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=600)
at.run()
print(json.dumps({
    "exceptions": [str(e.value) for e in at.exception],
    "title": [t.value for t in at.title],
    "metrics": len(at.metric),
    "images": len(at.get("image")),
    "plotly_charts": len(at.get("plotly_chart")),
    "modules": sorted(sys.modules),
}))
"""

_IMPORT_PAGES = """
import importlib, json, sys
import streamlit
for page in sys.argv[1:]:
    importlib.import_module(f"vitviz.ui.{page}")
print(json.dumps(sorted(sys.modules)))
"""


def _child(code: str, *args: str, tmp_path: Path) -> str:
    (tmp_path / "runs").mkdir(exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "VITVIZ_RUNS_DIR": str(tmp_path / "runs"),
        "VITVIZ_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def _top_level(modules: list[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


_SERVER_START = """
import asyncio, json, sys
from vitviz.ui import startup
before = sorted(sys.modules)
from vitviz.ui import runs
runs._read_preset_configs = lambda: {"tiny": {}}  # the child process is another test's business

async def serve():
    async with startup.lifespan(None):
        return sorted(sys.modules), runs.available_presets()

after, presets = asyncio.run(serve())
from vitviz.ui import cached
pictures = cached.training_curves_png.cache_info().currsize
print(json.dumps({"before": before, "after": after, "presets": presets, "pictures": pictures}))
"""


def test_streamlit_run_serves_app_py_through_its_st_app() -> None:
    """`streamlit run app.py` looks for an ASGI app in the file (without running it) and serves that with
    uvicorn, so the App's lifespan runs when the server starts, before `/_stcore/health` answers."""
    from streamlit.web.server.app_discovery import discover_asgi_app

    found = discover_asgi_app(ROOT / "app.py")
    assert found.is_asgi_app and found.import_string == "app:app"


def test_the_server_start_imports_what_the_first_page_needs(tmp_path: Path) -> None:
    """Before the server reports healthy, its start-up has imported torch, timm, plotly, matplotlib and the
    overview page, drawn the default's training curves and read /train's presets; importing the start-up module
    itself costs none of that."""
    report = json.loads(_child(_SERVER_START, tmp_path=tmp_path))
    before, after = _top_level(report["before"]), _top_level(report["after"])
    assert not {"torch", "timm", "plotly", "matplotlib"} & before, sorted(before)
    assert {"torch", "timm", "torchvision", "plotly", "matplotlib"} <= after
    assert "vitviz.ui.overview" in report["after"]
    assert report["presets"] == ["tiny"]
    assert report["pictures"] == 1  # the default's training-curves picture, drawn for its first visit
    assert not after & set(DEFERRED), sorted(after & set(DEFERRED))


def test_first_visit_of_the_overview_imports_nothing_it_does_not_draw(tmp_path: Path) -> None:
    """A fresh process runs app.py's first page (the bundled default's overview) and lists its modules."""
    assert DEFAULT.is_file(), f"the bundled default checkpoint {DEFAULT} is missing"
    report = json.loads(_child(_FIRST_VISIT, str(ROOT / "app.py"), tmp_path=tmp_path))
    assert report["exceptions"] == []
    assert report["title"] == ["vitviz studio"] and report["metrics"] >= 5  # the page was really drawn
    loaded = _top_level(report["modules"])
    assert {"torch", "timm", "matplotlib"} <= loaded  # the model was loaded and the curves drawn in this process
    assert report["images"] == 1  # the training curves, as a picture
    assert report["plotly_charts"] == 0  # so the browser loads none of Plotly's JavaScript for the first page
    assert not loaded & set(DEFERRED), sorted(loaded & set(DEFERRED))


def test_plotly_pages_import_matplotlib_only_for_downloads(tmp_path: Path) -> None:
    """Importing the pages drawn with plotly (and the widgets and exports they share) brings no matplotlib."""
    loaded = _top_level(json.loads(_child(_IMPORT_PAGES, *PLOTLY_PAGES, "widgets", "exports", tmp_path=tmp_path)))
    assert {"torch", "plotly", "streamlit"} <= loaded
    assert "matplotlib" not in loaded
    # ...and a download still renders: exports.paper_figures() is vitviz.plots.paper itself.
    from vitviz.plots import paper
    from vitviz.ui import exports

    assert exports.paper_figures() is paper


def _filters_figure_reference(components: np.ndarray, ratios: np.ndarray, ncols: int = 7) -> go.Figure:
    """From the definition: the mosaic image, then one add_annotation per component, left to right, top down."""
    count, channels, ph, pw = components.shape
    scaled = minmax_scale(components, over=(1, 2, 3))
    pictures = scaled.transpose(0, 2, 3, 1) if channels == 3 else np.repeat(scaled.mean(axis=1)[..., None], 3, axis=3)
    ncols = max(1, min(ncols, count))
    nrows = -(-count // ncols)
    tiles = np.ones((nrows * ncols, ph, pw, 3))
    tiles[:count] = pictures
    gap = max(2, ph // 3)
    mosaic = tile_mosaic(tiles.reshape(nrows, ncols, ph, pw, 3), gap=gap, fill=1.0)
    fig = go.Figure(go.Image(z=np.rint(mosaic * 255).astype(np.uint8), hoverinfo="skip"))
    for index in range(count):
        row, col = index // ncols, index % ncols
        fig.add_annotation(
            x=col * (pw + gap) + (pw - 1) / 2,
            y=row * (ph + gap) - 0.5,
            yanchor="bottom",
            text=f"{index + 1}: {100 * ratios[index]:.1f}%",
            showarrow=False,
            font={"size": 11},
        )
    return fig


@pytest.mark.parametrize("shape", [(28, 3, 16, 16), (9, 1, 8, 8), (3, 4, 4, 4)])
def test_filters_figure_labels_each_component_in_one_layout_update(shape: tuple[int, ...]) -> None:
    """The labels set in one update are the ones one add_annotation per component gives, in the same order."""
    rng = np.random.default_rng(sum(shape))
    components, ratios = rng.normal(size=shape), rng.dirichlet(np.ones(shape[0]))
    drawn = interactive.filters_figure(components, ratios).to_plotly_json()
    expected = _filters_figure_reference(components, ratios).to_plotly_json()
    assert drawn["layout"]["annotations"] == expected["layout"]["annotations"]
    assert len(drawn["layout"]["annotations"]) == shape[0]
    np.testing.assert_array_equal(drawn["data"][0]["z"], expected["data"][0]["z"])


def test_presets_are_read_once_per_server_in_the_background(monkeypatch: pytest.MonkeyPatch) -> None:
    """prefetch_presets starts one reader however often it is called, and a page asking meanwhile waits for
    that reader's result instead of starting a second `python -m training presets`."""
    calls: list[float] = []
    release = threading.Event()

    def slow_read() -> dict[str, dict]:
        calls.append(time.monotonic())
        release.wait(timeout=30)
        return {"tiny": {"model": {}}, "shapes-default": {"model": {}}}

    monkeypatch.setattr(runs, "_read_preset_configs", slow_read)
    monkeypatch.setattr(runs, "_PRESETS", {})
    monkeypatch.setattr(runs, "_PREFETCH", [])
    runs.prefetch_presets()
    runs.prefetch_presets()
    assert len(runs._PREFETCH) == 1
    deadline = time.monotonic() + 30
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 1  # the background reader is running
    answer: list[list[str]] = []
    page = threading.Thread(target=lambda: answer.append(runs.available_presets()))
    page.start()
    page.join(timeout=0.3)
    assert page.is_alive() and not answer  # the page waits for the reader under the lock...
    release.set()
    page.join(timeout=30)
    runs._PREFETCH[0].join(timeout=30)
    assert answer == [["tiny", "shapes-default"]]
    assert len(calls) == 1  # ...and gets the reader's result: one subprocess per server


def test_presets_that_timed_out_are_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timed-out read (None) leaves no list behind, so the next run of /train asks again; an answer is kept."""
    answers: list[dict[str, dict] | None] = [None, {"tiny": {}}]
    calls: list[int] = []

    def read() -> dict[str, dict] | None:
        calls.append(1)
        return answers[len(calls) - 1]

    monkeypatch.setattr(runs, "_read_preset_configs", read)
    monkeypatch.setattr(runs, "_PRESETS", {})
    assert runs.available_presets() == []
    assert runs.available_presets() == ["tiny"]
    assert runs.preset_config("tiny") == {}
    assert len(calls) == 2


@pytest.mark.parametrize("width_in", [4.0, 12.0])
def test_matplotlib_figures_are_saved_at_a_width_streamlit_keeps(
    width_in: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """widgets.pyplot saves a figure once into a PNG no wider than Streamlit keeps as it is (st.pyplot's 200 dpi
    makes a 12-inch figure 2400 px, which Streamlit resizes and encodes again) and hands those bytes to st.image."""
    import io

    from matplotlib.figure import Figure
    from PIL import Image

    from vitviz.ui import widgets

    fig = Figure(figsize=(width_in, 3.0), layout="constrained")
    ax = fig.subplots()
    ax.imshow(np.arange(64.0).reshape(8, 8))
    ax.set_title("a title much wider than its axes, which must not be cut at the edges of the canvas")
    saves = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saves.append(k), original(self, *a, **k))[1])
    shown: list[bytes] = []
    monkeypatch.setattr(widgets.st, "image", lambda data, **kwargs: shown.append(data))
    widgets.pyplot(fig)
    assert len(saves) == 1 and saves[0]["bbox_inches"] == "tight" and len(shown) == 1
    dpi = saves[0]["dpi"]
    assert dpi == min(widgets.FIGURE_DPI, widgets.FIGURE_FIT_PIXELS / width_in)
    with Image.open(io.BytesIO(shown[0])) as picture:
        assert picture.format == "PNG" and picture.width <= widgets.FIGURE_MAX_PIXELS
        if width_in < 6:  # the title is wider than this figure: the bounding box grew to hold all of it
            assert picture.width > width_in * dpi
