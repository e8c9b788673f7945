"""Regenerate the README's screenshots: every studio page on the bundled models, in headless Chromium.

    python docs/screenshots.py            # writes docs/images/<page>.png (1400 x 900, palette PNG)
    python docs/screenshots.py --size 1000x800 --out /tmp/narrow   # the same pages in a narrower window, to look at

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
SIZE = "1400x900"
PAGES = {  # file name -> URL path and query (the bundled checkpoints)
    "overview": "",
    "filters": "filters",
    "position": "position",
    "distance": "distance",
    "rollout": "rollout",
    "compare": "compare?compare=bundled:shapes-default&compare=bundled:shapes-sincos",
    "changed": "compare?compare=bundled:shapes-default&compare=bundled:shapes-finetune-hires",
    "tokens": "tokens?model=bundled:shapes-reg4",
    "trust": "trust",
    "train": "train",
}
READY = {
    "overview": "[data-testid='stMarkdown'] table",
    "compare": "[data-testid='stDataFrame']",
    "changed": "[data-testid='stDataFrame']:visible",
    "tokens": "[data-testid='stImage']",
    "trust": "[data-testid='stDataFrame']",
    "train": "[data-testid='stMain'] [data-testid='stForm']",
}
TAB = {"changed": "What changed"}  # shots of a tab: clicked once the page is drawn
SCROLL = {"changed": "Linear CKA, every block"}  # shots scrolled to put this text at the top of the window
TIMEOUT_S = 900.0  # "What changed" computes a comparison over 64 images first


def optimise(path: Path) -> int:
    """Rewrite a screenshot as a 256-colour optimised PNG; returns its size in bytes."""
    with Image.open(path) as picture:
        reduced = picture.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    reduced.save(path, format="PNG", optimize=True)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    import argparse

    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description="Regenerate the README's screenshots of the studio.")
    parser.add_argument("--size", default=SIZE, help=f"window WIDTHxHEIGHT in CSS pixels ({SIZE})")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the PNG files (docs/images)")
    parser.add_argument("--pages", help=f"comma-separated subset of {','.join(PAGES)}")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    chosen = args.pages.split(",") if args.pages else list(PAGES)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder, streamlit_server(Path(folder)) as url, sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_S * 1000)
            for name in chosen:
                page.goto(f"{url}/{PAGES[name]}")
                page.locator("h1").first.wait_for()
                if name in TAB:
                    wait_idle(page, timeout_s=TIMEOUT_S, quiet_checks=4, interval_ms=400)
                    page.get_by_role("tab", name=TAB[name]).click()
                page.locator(READY.get(name, ".js-plotly-plot")).first.wait_for()
                wait_idle(page, timeout_s=TIMEOUT_S, quiet_checks=4, interval_ms=400)
                if name in SCROLL:
                    page.get_by_text(SCROLL[name]).first.evaluate("e => e.scrollIntoView({block: 'start'})")
                    page.wait_for_timeout(500)
                target = args.out / f"{name}.png"
                page.screenshot(path=str(target))
                logger.info("%s: %.0f kB", target, optimise(target) / 1024)
        finally:
            browser.close()
    total = sum(p.stat().st_size for p in args.out.glob("*.png"))
    logger.info("total %.2f MB", total / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
