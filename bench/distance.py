"""Figure 3, distance: mean attention distance over a set of images vs plain forwards of the same images.

Measured: `vitviz.pipeline.image_analyses(..., ["distance"])` over all images in the pipeline's batches
(what `python -m vitviz analyze --analyses distance` runs). Baseline: the model's forward under
`torch.inference_mode()` over the same batches, fused attention on.
"""

from __future__ import annotations

import logging

import torch

from bench.common import LOWER, Figure, paired_timing, random_images
from vitviz.models import load_model
from vitviz.pipeline import AnalysisOptions, image_analyses

logger = logging.getLogger(__name__)

TARGET = 1.10


def distance_figure(
    source: str, num_images: int, batch: int, *, warmup: int, repeats: int, clock: str = "wall"
) -> Figure:
    """Ratio of mean attention distance over `num_images` images to plain forwards of them."""
    loaded = load_model(source)
    model = loaded.model
    images = random_images(num_images, loaded.meta, seed=1)
    options = AnalysisOptions(batch_size=batch)

    def plain() -> None:
        with torch.inference_mode():
            for start in range(0, num_images, batch):
                model(images[start : start + batch])

    def distance() -> None:
        results = image_analyses(loaded, images, ["distance"], options)
        assert results.distance is not None and results.distance.num_images == num_images

    logger.info("distance: %s, %d images in batches of %d", source, num_images, batch)
    timing = paired_timing(plain, distance, warmup=warmup, repeats=repeats, clock=clock)
    return Figure(
        name=f"distance {loaded.meta.arch} {num_images} images",
        value=timing.ratio,
        target=TARGET,
        better=LOWER,
        unit="ratio",
        baseline=(
            f"plain forwards of the same {num_images} images in batches of {batch}: "
            f"{timing.baseline_s:.2f} s {timing.clock} time"
        ),
        detail={**timing.detail(), "batch_size": batch, "source": source},
    )
