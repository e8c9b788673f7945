"""Figure 5, app: seconds in the real browser from an upload to the rollout overlay on screen, and a page switch.

`streamlit run app.py` is started on a free port (its own runs and cache folders) and driven by Playwright in
the system Chromium. The model is chosen in the URL (`/rollout?model=timm:<name>`), loaded and used once
(the first visit computes the sample image and one warm-up upload is explained), so the model is warm.

Upload to overlay: on a freshly opened /rollout (a new session, so the uploader is empty and the sample
image is shown), a new image (distinct pixels every time, so no cached result can answer) is set on the
page's file input; the clock stops when the rollout overlay's heatmap in the page differs from the one
shown before, i.e. the new overlay has been drawn by Plotly in the browser. Median over the uploads.

Cached page switch: a click on the sidebar link to a page already shown with this model (attention distance,
then back to rollout, alternately); the clock stops when that page's heading and its first chart are on
screen and the script has finished running. Median over the switches.

Studio latency (`studio_figures`, the bundled default checkpoint, a second server of its own):
- the floor: `bench/floor_app.py` (no vitviz) on a server of its own, a page with a heading and a page with
  one Plotly chart, each opened in a new browser session, and `import torch, timm` in a fresh interpreter
  (each the median of the plan's `studio_repeats`): what any Streamlit page, and any model, costs here before
  a line of the studio runs. The studio's figures are ratios to it;
- first visit of `/` on a fresh server: from the page request (server healthy, nothing loaded or cached) until
  the overview is drawn and the script has stopped running, in a fresh browser; the median of `studio_repeats`
  fresh servers, against the floor's heading page visited the same way (fresh server, fresh browser: both pay
  Streamlit's JavaScript into an empty browser cache), the two alternated. Target ≤ 2×;
- every page by the sidebar on a warm server: after a first visit, a click on each page's link in the
  sidebar (as a user walks the studio), from the click until the page's heading is on screen and the page is
  idle; the first time each page runs on this server (its analyses are computed, nothing comes from a cache);
  against the floor's chart page in a new session, target ≤ 2×;
- every page in a new session on a warm server: each page's URL opened in a new tab (a link someone shared),
  its analyses cached by the walk before; this pays Streamlit's front end and, on a page with a chart,
  Plotly's JavaScript again, which is what the floor measures; the same ratio and target;
- /compare bundled comparisons warm: on /compare, a click on each ready-made comparison's button until the
  page has stopped running; the first time each comparison is computed on this (warm) server.
"Stopped running" is the last moment the page was seen busy (`bench.browser.busy`: its script running, or a
chart still a skeleton), not the end of the quiet checks after it.
"""

from __future__ import annotations

import io
import logging
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.browser import BUSY_JS, busy, launch_chromium, streamlit_server, wait_idle
from bench.common import LOWER, Figure, Plan
from vitviz.ui.compare import READY_MADE

logger = logging.getLogger(__name__)

UPLOAD_TARGET_S = 1.5
SWITCH_TARGET_S = 0.5
STARTUP_TIMEOUT_S = 180
STEP_TIMEOUT_MS = 300_000  # one step on a very busy machine; a hang fails instead of waiting forever
UPLOAD_INPUT = '[data-testid="stMain"] [data-testid="stFileUploaderDropzoneInput"]'
TINY_RUN_ID = "bench-tiny"
FIRST_VISIT_TARGET = 2.0  # × the heading-only floor page, both the first page of a fresh server in a fresh browser
PAGE_TARGET = 2.0  # × the one-chart floor page in a new session, for every page (by the sidebar or a new tab)
COMPARE_TARGET_S = 5.0
# (url path, heading) of every page of app.py, the overview first.
STUDIO_PAGES = (
    ("", "vitviz studio"),
    ("filters", "Patch-embedding filters"),
    ("position", "Position embeddings"),
    ("distance", "Mean attention distance"),
    ("rollout", "Attention rollout"),
    ("tokens", "What tokens carry"),
    ("analyses", "Every analysis"),
    ("trust", "Which map to trust?"),
    ("compare", "Compare models"),
    ("train", "Train"),
)
# The floor app's pages (bench/floor_app.py): url path and heading.
FLOOR_PAGES = (("text", "Floor: text"), ("plotly", "Floor: one Plotly chart"))
QUIET_CHECKS = 4  # not busy this many checks in a row: the script has stopped and the page is drawn

# A short hash of the first heatmap in the page's charts (the rollout overlay's map; the input beside it is a
# chart without one), or "" while there is none.
_OVERLAY_FINGERPRINT_JS = """() => {
  const plots = document.querySelectorAll('[data-testid="stMain"] [data-testid="stPlotlyChart"] .js-plotly-plot');
  const heat = Array.from(plots)
    .flatMap((plot) => plot.data || [])
    .find((trace) => trace.type === "heatmap");
  if (!heat) return "";
  const text = JSON.stringify(heat.z);
  let hash = 0;
  for (let i = 0; i < text.length; i++) hash = (hash * 31 + text.charCodeAt(i)) | 0;
  return String(hash) + ":" + text.length;
}"""

# Whether the page titled `heading` shows a chart and the script has stopped running.
_PAGE_READY_JS = """(heading) => {
  const main = document.querySelector('[data-testid="stMain"]');
  if (!main) return false;
  const titles = Array.from(main.querySelectorAll("h1")).map((h) => h.textContent.trim());
  if (!titles.some((t) => t.startsWith(heading))) return false;
  if (!main.querySelector('[data-testid="stPlotlyChart"] .js-plotly-plot .main-svg')) return false;
  return !(BUSY_JS)();
}""".replace("BUSY_JS", BUSY_JS)


def upload_image(index: int, size: tuple[int, int] = (640, 480)) -> bytes:
    """A photo-sized JPEG whose pixels differ for every index (so every upload is new to the app's caches)."""
    rng = np.random.default_rng(index)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [128 + 100 * np.sin(x / (37 + 7 * c) + rng.uniform(0, 6)) * np.cos(y / (53 + 5 * c)) for c in range(3)], axis=-1
    )
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    base[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, 3)  # an object
    pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _model_key(source: str, folder: Path) -> str:
    """The app's URL key for a bench model: timm names as they are, a checkpoint file as a run folder."""
    if source.startswith("timm:"):
        return source
    run = folder / "runs" / TINY_RUN_ID
    run.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, run / "best.safetensors")
    return f"run:{TINY_RUN_ID}"


def _open_rollout(page: Any, url: str) -> None:
    """A fresh session of /rollout (empty uploader, the sample explained from the cache), drawn and idle."""
    page.goto(url)
    page.wait_for_function(_PAGE_READY_JS, arg="Attention rollout", polling=50, timeout=STEP_TIMEOUT_MS)
    wait_idle(page, timeout_s=STEP_TIMEOUT_MS / 1000)
    _check_no_exception(page)


def _upload(page: Any, url: str, folder: Path, index: int) -> float:
    """On a fresh /rollout, upload image `index`; returns the seconds until its rollout overlay is drawn."""
    _open_rollout(page, url)  # one upload per session: further uploads would join a gallery instead
    path = folder / f"upload-{index:03d}.jpg"
    path.write_bytes(upload_image(index))
    before = page.evaluate(_OVERLAY_FINGERPRINT_JS)
    start = time.perf_counter()
    page.locator(UPLOAD_INPUT).first.set_input_files(str(path))
    page.wait_for_function(
        f"(before) => ({_OVERLAY_FINGERPRINT_JS})() !== before && ({_OVERLAY_FINGERPRINT_JS})() !== ''",
        arg=before,
        polling=10,
        timeout=STEP_TIMEOUT_MS,
    )
    seconds = time.perf_counter() - start
    page.get_by_text(f"Input: {path.name}").wait_for(timeout=STEP_TIMEOUT_MS)  # the overlay was this image's
    wait_idle(page, timeout_s=STEP_TIMEOUT_MS / 1000)
    _check_no_exception(page)
    return seconds


def _switch(page: Any, link_text: str, heading: str) -> float:
    """Click a sidebar link and return the seconds until that page is drawn and idle."""
    link = page.locator('[data-testid="stSidebarNav"] a').filter(has_text=link_text).first
    start = time.perf_counter()
    link.click()
    page.wait_for_function(_PAGE_READY_JS, arg=heading, polling=10, timeout=STEP_TIMEOUT_MS)
    seconds = time.perf_counter() - start
    wait_idle(page, timeout_s=STEP_TIMEOUT_MS / 1000)
    _check_no_exception(page)
    return seconds


def _check_no_exception(page: Any) -> None:
    errors = page.locator('[data-testid="stException"]')
    if errors.count():
        raise RuntimeError(f"the app showed an exception: {errors.first.inner_text()[:300]}")


def measure_app(source: str, uploads: int, folder: Path) -> dict[str, Any]:
    """Upload and page-switch timings (seconds) of the real app in Chromium."""
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    key = _model_key(source, folder)
    with streamlit_server(folder, startup_timeout_s=STARTUP_TIMEOUT_S) as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1800}).new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            rollout_url = f"{url}/rollout?model={key}"
            started = time.perf_counter()
            _open_rollout(page, rollout_url)
            first_view_s = time.perf_counter() - started
            logger.info("app: model %s loaded and the sample explained in %.1f s", key, first_view_s)
            _upload(page, rollout_url, folder, 0)  # warm-up: the first upload's code paths
            upload_s = [_upload(page, rollout_url, folder, index) for index in range(1, uploads + 1)]
            # Both pages once with this model (their results are cached from here on), then timed switches.
            _switch(page, "Attention distance", "Mean attention distance")
            _switch(page, "Attention rollout", "Attention rollout")
            switch_s = []
            for index in range(uploads):
                target = (
                    ("Attention distance", "Mean attention distance")
                    if index % 2 == 0
                    else ("Attention rollout", "Attention rollout")
                )
                switch_s.append(_switch(page, *target))
        finally:
            browser.close()
    return {"model": key, "first_view_s": first_view_s, "upload_s": upload_s, "switch_s": switch_s}


def app_figures(plan: Plan, scratch: Path) -> list[Figure]:
    """Upload-to-overlay and cached page-switch seconds."""
    logger.info("app: %s, %d uploads", plan.app_source, plan.app_uploads)
    timings = measure_app(plan.app_source, plan.app_uploads, scratch / "app")
    name = timings["model"].removeprefix("timm:")
    detail = {"model": timings["model"], "first_view_s": round(timings["first_view_s"], 2)}
    return [
        Figure(
            name=f"app {name}: upload to rollout overlay on screen",
            value=statistics.median(timings["upload_s"]),
            target=UPLOAD_TARGET_S,
            better=LOWER,
            unit="s",
            baseline="absolute: seconds in Chromium, model warm, a new image each time",
            detail={**detail, "runs_s": [round(s, 3) for s in timings["upload_s"]]},
        ),
        Figure(
            name=f"app {name}: cached page switch",
            value=statistics.median(timings["switch_s"]),
            target=SWITCH_TARGET_S,
            better=LOWER,
            unit="s",
            baseline="absolute: seconds in Chromium from the click to the page drawn and idle",
            detail={**detail, "runs_s": [round(s, 3) for s in timings["switch_s"]]},
        ),
    ]


# --- studio latency on the bundled default ----------------------------------------------------------------------

# Whether the main area shows an h1 starting with `heading`.
_HEADING_JS = """(heading) => {
  const main = document.querySelector('[data-testid="stMain"]');
  if (!main) return false;
  return Array.from(main.querySelectorAll("h1")).some((h) => h.textContent.trim().startsWith(heading));
}"""


def _stopped_at(page: Any, start: float, *, interval_ms: int = 50) -> float:
    """Seconds from `start` to the last moment the page was seen busy (its script running or an element still
    a skeleton), once it has been idle QUIET_CHECKS checks in a row (the check's own time is not counted)."""
    deadline = time.monotonic() + STEP_TIMEOUT_MS / 1000
    last_busy, quiet = time.perf_counter(), 0
    while quiet < QUIET_CHECKS:
        if busy(page):
            last_busy, quiet = time.perf_counter(), 0
        else:
            quiet += 1
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not finish running")
        page.wait_for_timeout(interval_ms)
    return last_busy - start


def _visit(page: Any, url: str, heading: str) -> float:
    """Open `url` in the page (a new session) and return the seconds until `heading` is shown and idle."""
    start = time.perf_counter()
    page.goto(url)
    page.wait_for_function(_HEADING_JS, arg=heading, polling=20, timeout=STEP_TIMEOUT_MS)
    shown = time.perf_counter() - start
    seconds = max(shown, _stopped_at(page, start))
    _check_no_exception(page)
    return seconds


def _compared(page: Any) -> list[str]:
    """The model keys in the page's URL query (`compare=`), as /compare writes them."""
    return urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query).get("compare", [])


def _click_comparison(page: Any, label: str, keys: list[str]) -> float:
    """Click a ready-made comparison; seconds until its models (`keys`) are in the URL and the page is idle."""
    button = page.locator('[data-testid="stMain"] [class*="st-key-compare-ready-"] button').filter(has_text=label)
    start = time.perf_counter()
    button.first.click()
    page.wait_for_function(
        "(keys) => new URLSearchParams(location.search).getAll('compare').join(',') === keys",
        arg=",".join(keys),
        polling=20,
        timeout=STEP_TIMEOUT_MS,
    )
    seconds = max(time.perf_counter() - start, _stopped_at(page, start))
    _check_no_exception(page)
    return seconds


def _follow_link(page: Any, path: str, heading: str) -> float:
    """Click the sidebar link to `/path`; seconds until its heading is on screen and the page is idle."""
    link = page.locator(f'[data-testid="stSidebarNav"] a[href$="/{path}"]').first
    start = time.perf_counter()
    link.click()
    page.wait_for_function(_HEADING_JS, arg=heading, polling=20, timeout=STEP_TIMEOUT_MS)
    seconds = max(time.perf_counter() - start, _stopped_at(page, start))
    _check_no_exception(page)
    return seconds


def _new_session(context: Any, url: str, heading: str) -> float:
    """`url` opened in a new tab (a new Streamlit session): seconds until `heading` is shown and idle."""
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    try:
        return _visit(page, url, heading)
    finally:
        page.close()


def import_floor_s(runs: int) -> float:
    """Median wall seconds of a fresh interpreter importing torch and timm: what a fresh server's first page
    imports before it can build a model (timm imports torchvision, which imports torch._dynamo)."""
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, timm"], check=True)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_floor(folder: Path, repeats: int) -> dict[str, float]:
    """Median seconds of `bench/floor_app.py`'s pages, each opened `repeats` times in a new session, and of
    importing torch and timm (`import_floor_s`)."""
    from playwright.sync_api import sync_playwright

    with (
        streamlit_server(folder, startup_timeout_s=STARTUP_TIMEOUT_S, script="bench/floor_app.py") as url,
        sync_playwright() as playwright,
    ):
        browser = launch_chromium(playwright)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1800})
            for path, heading in FLOOR_PAGES:  # the server's first run of each page (imports) is not timed
                _new_session(context, f"{url}/{path}", heading)
            pages = {
                path: statistics.median(_new_session(context, f"{url}/{path}", heading) for _ in range(repeats))
                for path, heading in FLOOR_PAGES
            }
        finally:
            browser.close()
    return {**pages, "imports": import_floor_s(repeats)}


def fresh_visit_s(folder: Path, script: str, path: str, heading: str) -> float:
    """Seconds of the first visit of `/path` of `script` on a fresh server (empty caches) in a fresh browser,
    from the request (the server has reported healthy) until `heading` is drawn and the page is idle."""
    from playwright.sync_api import sync_playwright

    with (
        streamlit_server(folder, startup_timeout_s=STARTUP_TIMEOUT_S, script=script) as url,
        sync_playwright() as playwright,
    ):
        browser = launch_chromium(playwright)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1800}).new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            return _visit(page, f"{url}/{path}", heading)
        finally:
            browser.close()


def first_visits(folder: Path, repeats: int) -> tuple[list[float], list[float]]:
    """(the studio's first visit of `/`, the floor app's heading page's first visit), each on a fresh server in
    a fresh browser, alternately `repeats` times: the floor pays what any first page pays (Streamlit's JavaScript
    in an empty browser cache, a new session), the studio its own part on top."""
    studio, floor = [], []
    for index in range(repeats):
        studio.append(fresh_visit_s(folder / f"first-{index}", "app.py", "", STUDIO_PAGES[0][1]))
        floor.append(fresh_visit_s(folder / f"floor-{index}", "bench/floor_app.py", *FLOOR_PAGES[0]))
    return studio, floor


def measure_studio(folder: Path) -> dict[str, Any]:
    """First visit of `/`; each page's first run reached by the sidebar; each page in a new session; each
    bundled comparison (seconds)."""
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    with streamlit_server(folder, startup_timeout_s=STARTUP_TIMEOUT_S) as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1800})
            page = context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            first_s = _visit(page, f"{url}/", STUDIO_PAGES[0][1])
            logger.info("studio: first visit of / in %.1f s", first_s)
            # The sidebar walk, as a user goes through the studio: every other page, then back to the overview.
            sidebar_s = {}
            for path, heading in (*STUDIO_PAGES[1:], STUDIO_PAGES[0]):
                sidebar_s[f"/{path}"] = _follow_link(page, path, heading)
                logger.info("studio: /%s by the sidebar, idle in %.1f s", path, sidebar_s[f"/{path}"])
            page.close()
            linked_s = {}
            for path, heading in STUDIO_PAGES:
                linked_s[f"/{path}"] = _new_session(context, f"{url}/{path}", heading)
                logger.info("studio: /%s in a new session, idle in %.1f s", path, linked_s[f"/{path}"])
            # /compare again: click every other comparison, the preselected one last (a click on what is already
            # chosen would leave the URL as it is).
            page = context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            _visit(page, f"{url}/compare", "Compare models")
            preselected = _compared(page)
            comparisons = {label: [f"bundled:{stem}" for stem in stems] for label, stems in READY_MADE.items()}
            ordered = sorted(comparisons, key=lambda label: comparisons[label] == preselected)
            compare_s: dict[str, float] = {}
            for label in ordered:
                compare_s[label] = _click_comparison(page, label, comparisons[label])
                logger.info("studio: /compare %s in %.1f s", label, compare_s[label])
        finally:
            browser.close()
    return {"first_visit_s": first_s, "sidebar_s": sidebar_s, "linked_s": linked_s, "compare_s": compare_s}


def _seconds(name: str, value: float, target: float | None, baseline: str, detail: dict | None = None) -> Figure:
    """A studio latency row in seconds, lower is better."""
    return Figure(
        name=name, value=value, target=target, better=LOWER, unit="s", baseline=baseline, detail=dict(detail or {})
    )


def _ratio(name: str, seconds: float, floor_s: float, target: float, baseline: str, detail: dict) -> Figure:
    """A studio latency row as a ratio to its floor on the same machine, lower is better."""
    return Figure(
        name=name,
        value=seconds / floor_s,
        target=target,
        better=LOWER,
        unit="ratio",
        baseline=f"{baseline}: {floor_s:.2f} s",
        detail={**detail, "seconds": round(seconds, 3)},
    )


def studio_figures(plan: Plan, scratch: Path) -> list[Figure]:
    """Studio latency rows: the floor; the first visit of `/` against the floor's first visit; every page (by
    the sidebar, and in a new session on a warm server) against the one-chart floor; the bundled comparisons."""
    repeats = plan.studio_repeats  # the first visit varies by seconds from one fresh server to the next here
    floor = measure_floor(scratch / "floor", repeats)
    first_s, floor_first_s = first_visits(scratch / "fresh", repeats)
    timings = measure_studio(scratch / "studio")
    detail = {"model": "bundled:shapes-default"}
    floor_app = f"absolute: bench/floor_app.py, no vitviz; median of {repeats} sessions"
    chart_floor = "bench/floor_app.py's page with one Plotly chart, new session"
    figures = [
        _seconds("app floor: a Streamlit page with a heading, new session", floor["text"], None, floor_app),
        _seconds("app floor: a Streamlit page with one Plotly chart, new session", floor["plotly"], None, floor_app),
        _seconds(
            "app floor: a Streamlit page with a heading, first visit of a fresh server",
            statistics.median(floor_first_s),
            None,
            f"absolute: bench/floor_app.py in a fresh browser; median of {repeats} fresh servers",
            {"runs_s": [round(v, 3) for v in floor_first_s]},
        ),
        _seconds(
            "app floor: import torch and timm in a fresh interpreter",
            floor["imports"],
            None,
            f"absolute: python -c 'import torch, timm'; median of {repeats} processes",
        ),
        _ratio(
            "app studio: first visit of / on a fresh server",
            statistics.median(first_s),
            statistics.median(floor_first_s),
            FIRST_VISIT_TARGET,
            "the floor's heading page, first visit of a fresh server in a fresh browser (median, alternated)",
            {**detail, "runs_s": [round(v, 3) for v in first_s], "imports_s": round(floor["imports"], 3)},
        ),
    ]
    for where, timed in (("by the sidebar", timings["sidebar_s"]), ("in a new session", timings["linked_s"])):
        figures += [
            _ratio(
                f"app studio: {path} {where}, warm server", seconds, floor["plotly"], PAGE_TARGET, chart_floor, detail
            )
            for path, seconds in timed.items()
        ]
    figures += [
        _seconds(
            f"app studio: /compare {label}, warm server",
            seconds,
            COMPARE_TARGET_S,
            "absolute: seconds in Chromium from the click to the comparison drawn and idle",
            detail,
        )
        for label, seconds in timings["compare_s"].items()
    ]
    return figures
