"""Bench figures for the newer ViT families: capture overhead and gradient rollout at high resolution.

Capture (target <= 1.10 each): forward + every layer's attention + rollout + mean attention distance, as
`bench.capture` measures it, against a plain forward of the same model, for a ViT-S-sized member of each family
whose attention vitviz reads in its own way: EVA-02 (`EvaAttention`, rope), a rope ViT (`AttentionRope`), BEiT
(relative position bias), DINOv2 with 4 registers, and a Hugging Face `ViTForImageClassification`. timm's
models keep fused attention in both runs. The Hugging Face model is read through its eager attention, so its
baseline is the same weights run with transformers' default attention (`sdpa`), as a user runs them.

Gradient rollout (info, no target): forward + backward + the gradient rollout map on DINOv2 ViT-S/14 at 518 px
(1,370 tokens), against a plain forward + backward of the same model (the gradient of the predicted logit with
respect to the input). Gradient rollout pulls one row vector through the layers (L vector-matrix products,
O(L N^2)), never an [N, N] product per layer.

Sizes by plan: "full" as above, at batch 1 and 8; "quick" the same families at depth 4 and batch 1;
"tiny" depth 1 at 56 px (seconds: keeps the code working).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from bench.capture import capture_figure
from bench.common import LOWER, Figure, Plan, paired_timing, random_images
from vitviz.models import LoadedModel
from vitviz.models.factory import build_timm_model
from vitviz.models.hf import load_hf
from vitviz.models.sources import RANDOM_INIT_SEED, timm_meta
from vitviz.pipeline import AnalysisOptions, image_analyses

logger = logging.getLogger(__name__)

# (label, timm name, keyword arguments for timm.create_model): ViT-S-sized members of each family.
TIMM_FAMILIES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("EVA-02", "eva02_small_patch14_224", {}),
    ("rope ViT", "vit_small_patch16_rope_224", {}),
    ("BEiT", "beit_base_patch16_224", {"embed_dim": 384, "num_heads": 6}),  # timm has no ViT-S BEiT name
    ("DINOv2 + 4 registers", "vit_small_patch14_reg4_dinov2", {"img_size": 224}),
)
# 37 x 37 patches + class token = 1,370 tokens; a 1000-class head, since gradient rollout follows a class logit.
GRADIENT_MODEL = ("vit_small_patch14_dinov2", {"img_size": 518, "num_classes": 1000})


def _sizes(plan: Plan) -> tuple[dict[str, Any], tuple[int, ...], dict[str, Any]]:
    """Model overrides, batches and the gradient model's overrides for the plan."""
    if plan.label == "full":
        return {}, (1, 8), {}
    if plan.label == "quick":
        return {"depth": 4}, (1,), {"depth": 4}
    return {"depth": 1, "img_size": 56}, (1,), {"depth": 1, "img_size": 112}


def _timm_loaded(name: str, kwargs: dict[str, Any]) -> LoadedModel:
    """A timm model with random weights (seeded) and `kwargs`, loaded as `timm:<name>` would be."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = build_timm_model(name, **kwargs).eval()
    meta = timm_meta(name, model, training={"source": "timm", "pretrained": False, "bench_overrides": kwargs})
    digest = hashlib.sha256(f"timm:{name}:{sorted(kwargs.items())}".encode()).hexdigest()
    return LoadedModel(model=model, meta=meta, source=f"timm:{name}", content_hash=digest)


def _hf_vit_folder(scratch: Path, overrides: dict[str, Any]) -> Path:
    """A ViT-S-sized `ViTForImageClassification` with random weights saved as a Hugging Face folder."""
    import transformers

    depth = int(overrides.get("depth", 12))
    size = int(overrides.get("img_size", 224))
    config = transformers.ViTConfig(
        hidden_size=384,
        num_hidden_layers=depth,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=size,
        patch_size=16 if size % 16 == 0 else 14,
        num_labels=1000,
    )
    torch.manual_seed(RANDOM_INIT_SEED)
    folder = scratch / f"hf-vit-small-{depth}-{size}"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    processor = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": size, "width": size}}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def _hf_figure(plan: Plan, scratch: Path, overrides: dict[str, Any], batch: int) -> Figure:
    import transformers

    folder = _hf_vit_folder(scratch, overrides)
    loaded = load_hf(str(folder))
    plain = transformers.ViTForImageClassification.from_pretrained(folder, attn_implementation="sdpa").eval()

    class _Logits(torch.nn.Module):  # the plain model called as vitviz's wrapper calls it
        def __init__(self, hf_model: torch.nn.Module) -> None:
            super().__init__()
            self.hf = hf_model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.hf(pixel_values=x).logits

    size = "x".join(str(s) for s in loaded.meta.input_size)
    return capture_figure(
        loaded,
        batch,
        warmup=plan.warmup,
        repeats=plan.repeats,
        clock=plan.clock,
        round_s=plan.round_s,
        plain_model=_Logits(plain),
        name=f"families capture hf ViTForImageClassification (ViT-S) {size} batch {batch}",
        baseline_label="plain transformers forward, sdpa attention, same weights and batch",
    )


def _gradient_figure(plan: Plan, overrides: dict[str, Any]) -> Figure:
    name, kwargs = GRADIENT_MODEL
    loaded = _timm_loaded(name, {**kwargs, **overrides})
    model = loaded.model
    image = random_images(1, loaded.meta)
    options = AnalysisOptions(batch_size=1)

    def plain() -> None:
        x = image.clone().requires_grad_(True)
        logits = model(x)
        torch.autograd.grad(logits[0, logits[0].argmax()], x)  # no parameter's .grad is touched, as in vitviz

    def analysed() -> None:
        results = image_analyses(loaded, image, ("gradient-rollout",), options)
        assert isinstance(results.gradients, tuple) and len(results.gradients) == 1, results.gradients

    logger.info("families: gradient rollout %s", name)
    timing = paired_timing(
        plain, analysed, warmup=min(plan.warmup, 1), repeats=max(3, plan.repeats // 2), clock=plan.clock
    )
    tokens = loaded.meta.input_size[0] // model.patch_embed.patch_size[0]
    size = "x".join(str(s) for s in loaded.meta.input_size)
    return Figure(
        name=f"families gradient rollout {name} {size} ({tokens * tokens + 1} tokens) batch 1",
        value=timing.ratio,
        target=None,
        better=LOWER,
        unit="ratio",
        baseline=(
            f"plain forward + backward of the predicted logit, fused attention: "
            f"{timing.baseline_s * 1000:.1f} ms {timing.clock} time"
        ),
        detail={**timing.detail(), "source": loaded.source, "overrides": {**kwargs, **overrides}},
    )


def family_figures(plan: Plan, scratch: Path) -> list[Figure]:
    """Capture overhead per family and batch, then the gradient rollout cost, sized by plan.label."""
    overrides, batches, gradient_overrides = _sizes(plan)
    figures: list[Figure] = []
    for label, name, kwargs in TIMM_FAMILIES:
        loaded = _timm_loaded(name, {**kwargs, **overrides})
        size = "x".join(str(s) for s in loaded.meta.input_size)
        for batch in batches:
            logger.info("families: capture %s (%s) batch %d", label, name, batch)
            figures.append(
                capture_figure(
                    loaded,
                    batch,
                    warmup=plan.warmup,
                    repeats=plan.repeats,
                    clock=plan.clock,
                    round_s=plan.round_s,
                    name=f"families capture {label}: {name} {size} batch {batch}",
                )
            )
    for batch in batches:
        figures.append(_hf_figure(plan, scratch, overrides, batch))
    figures.append(_gradient_figure(plan, gradient_overrides))
    return figures
