"""The studio in a real browser: `streamlit run app.py` driven through Playwright and the system Chromium.

Visits every page, uploads an image on /rollout, compares two checkpoints, starts a tiny training run on
/train and watches its curve appear. Any element with data-testid="stException" fails the test.
Screenshots go to test-output/screenshots/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

from bench.browser import (
    CHROMIUM,
    ServerDidNotStart,
    launch_chromium,
    streamlit_server,
    wait_idle,
)

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "test-output" / "screenshots"
PAGE_TITLES = {
    "": "vitviz studio",
    "filters": "Patch-embedding filters",
    "position": "Position embeddings",
    "distance": "Mean attention distance",
    "rollout": "Attention rollout",
    "tokens": "What tokens carry",
    "analyses": "Every analysis",
    "trust": "Which map to trust?",
    "compare": "Compare models",
    "train": "Train",
}
PAGE_CONTENT = {  # an element each page shows once its analysis is drawn
    "": "[data-testid='stMarkdown'] table",
    "filters": ".js-plotly-plot",
    "position": ".js-plotly-plot",
    "distance": ".js-plotly-plot",
    "rollout": ".js-plotly-plot",
    "tokens": "[data-testid='stImage']",
    "analyses": "[data-testid='stImage']",
    "trust": "[data-testid='stDataFrame']",
    "compare": "[data-testid='stDataFrame']",
    "train": "[data-testid='stMain'] [data-testid='stForm']",  # the sidebar's add-model form is folded
}
STARTUP_TIMEOUT_S = 120
PAGE_TIMEOUT_MS = 120_000
TRAINING_TIMEOUT_MS = 300_000  # a tiny run is seconds of training, plus starting Python and torch on a busy machine

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs the system Chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """The app served by `streamlit run` on a free port, with its own runs and cache folders."""
    folder = tmp_path_factory.mktemp("studio")
    try:
        with streamlit_server(folder, startup_timeout_s=STARTUP_TIMEOUT_S) as url:
            yield {"url": url, "runs": folder / "runs"}
    except ServerDidNotStart as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        try:
            yield chromium
        finally:
            chromium.close()


LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    """A browser tab that records the host of every request it makes; none may leave this machine."""
    context = browser.new_context(viewport={"width": 1400, "height": 1800})
    hosts: set[str] = set()
    context.on(
        "request",
        lambda request: (
            hosts.add(urlparse(request.url).hostname or "")
            if urlparse(request.url).scheme in ("http", "https", "ws", "wss")
            else None
        ),
    )
    tab = context.new_page()
    tab.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        yield tab
        assert hosts and hosts <= LOCAL_HOSTS, f"requests left the machine: {sorted(hosts - LOCAL_HOSTS)}"
    finally:
        context.close()


def _wait_idle(page: object) -> None:
    """Until the script has stopped running and no element is a skeleton, for several checks in a row."""
    wait_idle(page, timeout_s=PAGE_TIMEOUT_MS / 1000, quiet_checks=4, interval_ms=400)


def _assert_no_exception(page: object) -> None:
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, exceptions.first.inner_text()


def _shot(page: object, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _open(page: object, url: str, title: str) -> None:
    page.goto(url)
    page.get_by_role("heading", name=title, exact=True).first.wait_for()
    _wait_idle(page)
    _assert_no_exception(page)


def _choose(page: object, selectbox: object, option: str) -> None:
    """Pick an option of a selectbox."""
    selectbox.click()
    page.get_by_role("option", name=option, exact=True).click()


def test_every_page_opens_on_the_default_checkpoint(server: dict, page: object) -> None:
    for path, title in PAGE_TITLES.items():
        _open(page, f"{server['url']}/{path}", title)
        page.locator(PAGE_CONTENT[path]).first.wait_for()
        _wait_idle(page)
        assert "model=bundled%3Ashapes-default" in page.url or "model=bundled:shapes-default" in page.url
        _shot(page, path or "overview")


def test_rollout_explains_an_uploaded_image(server: dict, page: object, tmp_path: Path) -> None:
    picture = Image.new("RGB", (120, 90), (235, 235, 235))
    for x in range(30, 90):
        for y in range(20, 70):
            picture.putpixel((x, y), (30, 90, 200))
    path = tmp_path / "blue-box.png"
    picture.save(path)
    _open(page, f"{server['url']}/rollout", "Attention rollout")
    page.locator('[data-testid="stMain"] [data-testid="stFileUploaderDropzoneInput"]').first.set_input_files(str(path))
    page.get_by_text("Input: blue-box.png").wait_for()
    _wait_idle(page)
    _assert_no_exception(page)
    overlays = page.locator('[data-testid="stPlotlyChart"]')
    assert overlays.count() >= 3  # rollout, gradient rollout, the layers x heads grid
    page.locator(".js-plotly-plot .heatmaplayer, .js-plotly-plot .imagelayer image").first.wait_for()
    _shot(page, "rollout-upload")


def test_rollout_gallery_keeps_aspect_ratio_and_draws_token_blocks(server: dict, page: object, tmp_path: Path) -> None:
    paths = []
    for name, size in (("wide.png", (320, 240)), ("small.png", (100, 80))):
        path = tmp_path / name
        Image.new("RGB", size, (128, 128, 128)).save(path)  # uniform: any colour variety comes from the map
        paths.append(str(path))
    _open(page, f"{server['url']}/rollout", "Attention rollout")
    page.locator('[data-testid="stMain"] [data-testid="stFileUploaderDropzoneInput"]').first.set_input_files(paths)
    page.get_by_text("All uploads").wait_for()
    _wait_idle(page)
    _assert_no_exception(page)
    pictures = page.locator('[data-testid="stImage"] img')
    assert pictures.count() == 2
    measured = pictures.first.evaluate(
        """img => {
            const canvas = document.createElement("canvas");
            canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
            const context = canvas.getContext("2d");
            context.drawImage(img, 0, 0);
            const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
            const colours = new Set();
            for (let i = 0; i < data.length; i += 4) colours.add(data[i] + "," + data[i + 1] + "," + data[i + 2]);
            return [img.naturalWidth, img.naturalHeight, colours.size];
        }"""
    )
    width, height, colours = measured
    assert width * 3 == height * 4  # 320 x 240 stays 4:3
    assert colours <= 64  # the bundled default's 8 x 8 tokens as flat blocks on a uniform picture, no smoothing


def test_compare_two_checkpoints(server: dict, page: object) -> None:
    others = sorted(
        p.stem for p in (ROOT / "assets" / "checkpoints").glob("*.safetensors") if p.stem != "shapes-default"
    )
    if not others:
        pytest.skip("needs a second bundled checkpoint")
    query = f"compare=bundled:shapes-default&compare=bundled:{others[0]}"
    _open(page, f"{server['url']}/compare?{query}", "Compare models")
    summary = page.locator('[data-testid="stDataFrame"]').first
    summary.wait_for()
    _shot(page, "compare-summary")
    for tab in ("Filters", "Position embeddings", "Attention distance", "Rollout"):
        page.get_by_role("tab", name=tab).click()
        _wait_idle(page)
        _assert_no_exception(page)
        assert page.locator('[data-testid="stMain"] .js-plotly-plot .main-svg').count(), f"no chart on {tab}"
        _shot(page, f"compare-{tab.lower().replace(' ', '-')}")
    assert page.get_by_text("Differences in rollout").count() == 1


def test_train_a_tiny_run_and_watch_its_curve(server: dict, page: object) -> None:
    _open(page, f"{server['url']}/train", "Train")
    _choose(page, page.locator('[data-testid="stSelectbox"]').filter(has_text="Preset").first, "tiny")
    page.get_by_label("Run id (optional)").fill("browser-tiny")
    page.get_by_role("button", name="Start").click()
    page.get_by_text("Started run browser-tiny.").wait_for()
    ended = page.get_by_role(
        "heading", name=re.compile(r"^Run browser-tiny: (finished|failed|stopped|interrupted|exited)")
    )
    ended.wait_for(timeout=TRAINING_TIMEOUT_MS)
    _wait_idle(page)
    log = page.locator('[data-testid="stExpander"]').filter(has_text="Log")
    assert ended.inner_text().endswith("finished"), log.inner_text() if log.count() else ended.inner_text()
    _assert_no_exception(page)
    curve = page.locator('[data-testid="stPlotlyChart"] .scatterlayer .trace')
    curve.first.wait_for()
    assert curve.count() >= 2  # loss and accuracy at least
    _shot(page, "train-finished")
    assert (server["runs"] / "browser-tiny" / "best.safetensors").is_file()
    # The finished run's checkpoint is offered by the model picker and goes into the URL when chosen.
    _choose(
        page, page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first, "run browser-tiny · best"
    )
    _wait_idle(page)
    assert "model=run%3Abrowser-tiny" in page.url or "model=run:browser-tiny" in page.url
    _assert_no_exception(page)
