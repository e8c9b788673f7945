"""Bench figures: vitviz's capture against timm's own attention extractor, family by family.

Measured: `vitviz.capture.attention_maps` (every layer's attention kept, the model's fused attention left on, as
vitviz runs it). Baseline: `timm.utils.AttentionExtract(model)` with its defaults (method "fx": the model traced
by torch.fx, returning every node named `*attn.softmax`), on a copy of the same model with `fused_attn` off on
every attention module, since the fused path has no softmax node to return. Both return the same maps (checked
before timing). Floor: a plain forward of the model with fused attention, as a user of timm runs it; the figure's
detail gives the capture's time over it, timed in its own interleaved rounds. Control (``detail.control``):
AttentionExtract timed against a second AttentionExtract of its own copy in the same way, a ratio that is 1.0
but for the machine's noise: the resolution of the figure beside it.

Families: every timm family whose maps AttentionExtract returns as vitviz reads them: ViT, distilled DeiT, DINOv2
with registers, EVA-02 (rope), a rope ViT, BEiT (relative-position bias) and a relative-position ViT, ViT-Ti-sized
(embed 192, 3 heads). AttentionExtract finds no softmax in a ParallelThingsBlock, and in CaiT (talking heads
mixed after the softmax) and SAM (windows) it returns other tensors than the maps vitviz defines, so those
families are left out.

Sizes by plan: "full" 224 px, depth 12, batch 1 and 8; "quick" depth 4, batch 1 and 8; "tiny" depth 1 at 56 px,
batch 2 (seconds: keeps the code working). Run single-threaded (`--threads 1`) for the recorded figures.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from timm.utils import AttentionExtract

from bench.common import LOWER, Figure, Plan, paired_timing, random_images
from bench.families import _timm_loaded
from vitviz.capture import attention_maps, attention_modules
from vitviz.models import LoadedModel

logger = logging.getLogger(__name__)

TARGET = 1.0
# The capture's figure is the median of this many interleaved rounds at least: on a shared 2-core machine the
# rounds of one figure spread over +-20% while the two sides differ by a few per cent.
EXTRACT_ROUNDS = 15
_TINY = {"embed_dim": 192, "num_heads": 3}

# (label, timm name, keyword arguments for timm.create_model): ViT-Ti-sized members of each family.
EXTRACT_FAMILIES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("ViT", "vit_tiny_patch16_224", {}),
    ("DeiT distilled", "deit_tiny_distilled_patch16_224", {}),
    ("DINOv2 + 4 registers", "vit_small_patch14_reg4_dinov2", {**_TINY, "img_size": 224}),
    ("EVA-02", "eva02_tiny_patch14_224", {}),
    ("rope ViT", "vit_small_patch16_rope_224", _TINY),
    ("BEiT", "beit_base_patch16_224", _TINY),
    ("relpos ViT", "vit_relpos_small_patch16_224", _TINY),
)


def _sizes(plan: Plan) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Model overrides and batches for the plan."""
    if plan.label == "full":
        return {}, (1, 8)
    if plan.label == "quick":
        return {"depth": 4}, (1, 8)
    return {"depth": 1, "img_size": 56}, (2,)


def _unfused(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model with timm's non-fused attention, the path AttentionExtract reads."""
    reference = copy.deepcopy(model)
    for module in attention_modules(reference):
        module.fused_attn = False
    return reference


def _figure(
    label: str,
    loaded: LoadedModel,
    extractors: tuple[AttentionExtract, AttentionExtract],
    batch: int,
    plan: Plan,
    overrides: dict[str, Any],
) -> Figure:
    extractor, second = extractors
    model = loaded.model
    images = random_images(batch, loaded.meta)
    with torch.no_grad():
        extracted = list(extractor(images).values())
    captured = attention_maps(model, images)
    assert len(extracted) == len(captured), (loaded.source, len(extracted), len(captured))
    for got, want in zip(captured, extracted):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    def plain() -> None:
        with torch.inference_mode():
            model(images)

    def extract() -> None:
        with torch.no_grad():
            extractor(images)

    def capture() -> None:
        attention_maps(model, images)

    def extract_again() -> None:
        with torch.no_grad():
            second(images)

    logger.info("extract: %s (%s) batch %d", label, loaded.meta.arch, batch)
    rounds = plan.repeats if plan.label == "tiny" else max(plan.repeats, EXTRACT_ROUNDS)
    timing = paired_timing(
        extract, capture, warmup=plan.warmup, repeats=rounds, clock=plan.clock, min_round_s=plan.round_s
    )
    # The control: AttentionExtract against a second one on its own copy, timed as the figure is. Its ratio is 1 but
    # for the machine's noise, so it shows how far from 1.0 a figure can read when the two sides are equal.
    control = paired_timing(
        extract, extract_again, warmup=plan.warmup, repeats=rounds, clock=plan.clock, min_round_s=plan.round_s
    )
    floor = paired_timing(
        plain, capture, warmup=plan.warmup, repeats=plan.repeats, clock=plan.clock, min_round_s=plan.round_s
    )
    size = "x".join(str(s) for s in loaded.meta.input_size)
    return Figure(
        name=f"extract {label}: {loaded.source.removeprefix('timm:')} {size} batch {batch}",
        value=timing.ratio,
        target=TARGET,
        better=LOWER,
        unit="ratio",
        baseline=(
            f"timm AttentionExtract (fx, fused attention off), same batch: {timing.baseline_s * 1000:.1f} ms "
            f"{timing.clock} time; plain fused forward (floor): {floor.baseline_s * 1000:.1f} ms; "
            f"control, AttentionExtract against itself: {control.ratio:.3f}"
        ),
        detail={
            **timing.detail(),
            "floor": {**floor.detail(), "capture_over_plain": round(floor.ratio, 4)},
            "control": {**control.detail(), "ratio": round(control.ratio, 4)},
            "layers": len(captured),
            "source": loaded.source,
            "overrides": overrides,
        },
    )


def extract_figures(plan: Plan) -> list[Figure]:
    """Capture time over AttentionExtract time per family and batch, with the plain fused forward as the floor."""
    overrides, batches = _sizes(plan)
    figures: list[Figure] = []
    for label, name, kwargs in EXTRACT_FAMILIES:
        loaded = _timm_loaded(name, {**kwargs, **overrides})
        extractors = (AttentionExtract(_unfused(loaded.model)), AttentionExtract(_unfused(loaded.model)))
        for batch in batches:
            figures.append(_figure(label, loaded, extractors, batch, plan, {**kwargs, **overrides}))
    return figures
