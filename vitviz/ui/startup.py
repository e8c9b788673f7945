"""What the studio's server does once, when it starts, before it reports healthy.

`streamlit run app.py` finds the `st.App` in app.py and serves it with uvicorn; the App's lifespan calls
`lifespan` here. A plain Streamlit script is run only when the first browser session connects, so that session
used to wait for torch, torchvision (through timm) and timm to import, seconds on a small machine; here the
server imports them before it answers `/_stcore/health`, builds the bundled default model once (timm's first
model and safetensors' first read import more) and, at the same time, reads /train's preset list (a child
process that imports the training backend: it would otherwise share the CPU with the first page).
The model itself is not cached by this: the first page still loads it through the studio's caches, only sooner.
The one thing drawn ahead is the default's training-curves picture (`overview.warm_default_curves`), into the
process-wide cache the overview reads, about a quarter of a second of matplotlib the first visit no longer waits for.

A failure here is logged and ignored: the page that needs the module imports it again and shows the error.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from vitviz.ui import pages

logger = logging.getLogger(__name__)

__all__ = ["WARM_MODULES", "lifespan", "warm_up"]

# What the first page (the default one) imports to draw itself, heaviest first; the page's own module is added.
# The overview draws its training curves with matplotlib (a picture: the browser need not load Plotly's
# JavaScript for the first page) unless asked for the interactive chart; the other pages draw with Plotly.
WARM_MODULES = ("torch", "timm", "plotly.graph_objects", "vitviz.plots.paper")


def _page_module(path: str) -> str:
    """`vitviz/ui/overview.py` -> `vitviz.ui.overview` (importing a page module draws nothing: its `render()`
    runs only under `__main__`)."""
    return path.removesuffix(".py").replace("/", ".")


def warm_up() -> float:
    """Import what the default page needs, build the bundled default model once and draw its overview's
    training-curves picture into the cache; returns the seconds taken."""
    start = time.perf_counter()
    first = next(page for page in pages.PAGES if page.default)
    for name in (*WARM_MODULES, _page_module(first.path)):
        try:
            importlib.import_module(name)
        except Exception:  # the page reports it when it needs the module
            logger.warning("start-up: importing %s failed", name, exc_info=True)
    try:
        from vitviz.models import load_model
        from vitviz.ui.catalog import DEFAULT_CHECKPOINT

        if DEFAULT_CHECKPOINT.is_file():
            loaded = load_model(str(DEFAULT_CHECKPOINT))
            from vitviz.ui.overview import warm_default_curves

            warm_default_curves(loaded)  # its overview's training-curves picture, drawn once per server
    except Exception:  # the sidebar explains a model that does not load
        logger.warning("start-up: building the default model failed", exc_info=True)
    return time.perf_counter() - start


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """The studio server's start-up: `warm_up` and the preset list, each in a worker thread, side by side."""
    from vitviz.allocator import tune_malloc
    from vitviz.ui import runs

    tune_malloc()
    seconds, _ = await asyncio.gather(asyncio.to_thread(warm_up), asyncio.to_thread(runs.available_presets))
    logger.info("start-up: imports, the default model and the training presets ready in %.1f s", seconds)
    yield
