"""Regenerate the README's screenshots: every studio page on the bundled models, in headless Chromium.

    python docs/screenshots.py            # writes docs/images/<page>.png (1280 x 800, palette PNG)

Runs `streamlit run app.py` on a free port with empty runs and cache folders (bench/browser.py), opens each
page, waits until its script has finished, and saves the visible window. The pictures are reduced to a
256-colour palette so that all of them together stay well under 2 MB.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.browser import launch_chromium, streamlit_server, wait_idle  # noqa: E402

logger = logging.getLogger(__name__)
OUT = ROOT / "docs" / "images"
VIEWPORT = {"width": 1280, "height": 800}
PAGES = {  # file name -> URL path and query (the bundled checkpoints)
    "overview": "",
    "filters": "filters",
    "position": "position",
    "distance": "distance",
    "rollout": "rollout",
    "compare": "compare?compare=bundled:shapes-default&compare=bundled:shapes-sincos",
    "tokens": "tokens?model=bundled:shapes-reg4",
    "trust": "trust",
    "train": "train",
}
READY = {
    "overview": "[data-testid='stMarkdown'] table",
    "compare": "[data-testid='stDataFrame']",
    "tokens": "[data-testid='stImage']",
    "trust": "[data-testid='stDataFrame']",
    "train": "[data-testid='stMain'] [data-testid='stForm']",
}
TIMEOUT_S = 180.0


def optimise(path: Path) -> int:
    """Rewrite a screenshot as a 256-colour optimised PNG; returns its size in bytes."""
    with Image.open(path) as picture:
        reduced = picture.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    reduced.save(path, format="PNG", optimize=True)
    return path.stat().st_size


def main() -> int:
    from playwright.sync_api import sync_playwright

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder, streamlit_server(Path(folder)) as url, sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_S * 1000)
            for name, path in PAGES.items():
                page.goto(f"{url}/{path}")
                page.locator("h1").first.wait_for()
                page.locator(READY.get(name, ".js-plotly-plot")).first.wait_for()
                wait_idle(page, timeout_s=TIMEOUT_S, quiet_checks=4, interval_ms=400)
                target = OUT / f"{name}.png"
                page.screenshot(path=str(target))
                logger.info("%s: %.0f kB", target.relative_to(ROOT), optimise(target) / 1024)
        finally:
            browser.close()
    total = sum(p.stat().st_size for p in OUT.glob("*.png"))
    logger.info("total %.2f MB", total / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
