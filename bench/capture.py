"""Figure 1, capture: forward + every layer's attention + rollout + mean attention distance vs a plain forward.

Measured: `vitviz.pipeline.image_analyses` with the analyses "rollout" and "distance" (what
`python -m vitviz analyze` runs per batch: one streamed forward feeding both accumulators, logits kept for
the top-5). Baseline: the same timm model called on the same batch under `torch.inference_mode()`, with
timm's fused attention (`scaled_dot_product_attention`) on, as a user of timm would run it.
"""

from __future__ import annotations

import logging

import torch

from bench.common import LOWER, Figure, paired_timing, random_images
from vitviz.capture import attention_modules
from vitviz.models import LoadedModel, load_model
from vitviz.pipeline import AnalysisOptions, image_analyses

logger = logging.getLogger(__name__)

TARGET = 1.10


def fused_attention_on(loaded: LoadedModel) -> bool:
    """Whether every block runs timm's fused attention, so the baseline is the fast path."""
    return all(getattr(module, "fused_attn", False) for module in attention_modules(loaded.model))


def capture_figure(
    source: str | LoadedModel,
    batch: int,
    *,
    warmup: int,
    repeats: int,
    clock: str = "wall",
    round_s: float = 0.0,
    plain_model: torch.nn.Module | None = None,
    name: str | None = None,
    baseline_label: str = "plain timm forward, fused attention, same batch",
) -> Figure:
    """Ratio of forward + capture + rollout + distance to a plain fused forward, for one model and batch.

    `source` is a model source or an already loaded model; `plain_model` (default: the loaded model itself)
    runs the baseline, for models whose plain form differs from the one vitviz reads (a Hugging Face model
    runs its default attention plainly and its eager attention under vitviz)."""
    loaded = load_model(source) if isinstance(source, str) else source
    model = loaded.model if plain_model is None else plain_model
    images = random_images(batch, loaded.meta)
    options = AnalysisOptions(batch_size=batch)
    analyses = ("distance", "rollout")

    def plain() -> None:
        with torch.inference_mode():
            model(images)

    def analysed() -> None:
        results = image_analyses(loaded, images, analyses, options)
        assert results.rollout_maps is not None and results.distance is not None

    logger.info("capture: %s batch %d", loaded.source, batch)
    timing = paired_timing(plain, analysed, warmup=warmup, repeats=repeats, clock=clock, min_round_s=round_s)
    size = "x".join(str(s) for s in loaded.meta.input_size)
    return Figure(
        name=name or f"capture {loaded.meta.arch} {size} batch {batch}",
        value=timing.ratio,
        target=TARGET,
        better=LOWER,
        unit="ratio",
        baseline=f"{baseline_label}: {timing.baseline_s * 1000:.1f} ms {timing.clock} time",
        detail={**timing.detail(), "fused_attention": fused_attention_on(loaded), "source": loaded.source},
    )
