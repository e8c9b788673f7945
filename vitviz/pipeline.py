"""Run the paper's analyses on one loaded model and return DESIGN.md's JSON document.

This is what `python -m vitviz analyze` computes; the app calls the same analysis functions page by page.
Images arrive already preprocessed; nothing here reads files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitviz.analysis.distance import DISTANCE_MODES, AttentionDistance, DistanceAccumulator
from vitviz.analysis.filters import FilterPCA, filter_pca, filters_applicable, patch_embedding_filters
from vitviz.analysis.position import position_similarity
from vitviz.analysis.rollout import HEAD_FUSIONS, RolloutAccumulator, gradient_rollout
from vitviz.capture import attention_gradients, capture_attention
from vitviz.errors import VitvizError
from vitviz.models import LoadedModel, patch_position_embeddings
from vitviz.tokens import TokenLayout, token_layout

logger = logging.getLogger(__name__)

ANALYSES = ("filters", "position", "distance", "rollout", "gradient-rollout")
IMAGE_ANALYSES = ("distance", "rollout", "gradient-rollout")


@dataclass(frozen=True)
class AnalysisOptions:
    """Keyword options of `python -m vitviz analyze`, with the papers' defaults."""

    components: int = 28  # principal components of the patch filters (paper Fig. 7 shows 28)
    distance_mode: str = "paper"  # "paper" (authors' definition) or "renormalised"
    head_fusion: str = "mean"  # rollout: how heads are fused
    discard_ratio: float = 0.0  # rollout: share of the smallest fused entries set to zero
    start_layer: int = 0  # rollout: first layer multiplied in
    target_class: int | None = None  # gradient rollout: class c; None = each image's prediction
    batch_size: int = 16  # images per forward

    def __post_init__(self) -> None:
        if self.components < 1:
            raise VitvizError(f"--components must be at least 1, got {self.components}")
        if self.distance_mode not in DISTANCE_MODES:
            raise VitvizError(f"--distance-mode must be one of {', '.join(DISTANCE_MODES)}, got {self.distance_mode!r}")
        if self.head_fusion not in HEAD_FUSIONS:
            raise VitvizError(f"--head-fusion must be one of {', '.join(HEAD_FUSIONS)}, got {self.head_fusion!r}")
        if not 0.0 <= self.discard_ratio < 1.0:
            raise VitvizError(f"--discard-ratio must be in [0, 1), got {self.discard_ratio}")
        if self.start_layer < 0:
            raise VitvizError(f"--start-layer must be 0 or more, got {self.start_layer}")
        if self.batch_size < 1:
            raise VitvizError(f"--batch-size must be at least 1, got {self.batch_size}")


def parse_analyses(text: str | None) -> list[str]:
    """Parse a comma-separated --analyses list; None means every analysis."""
    if text is None:
        return list(ANALYSES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ANALYSES]
    if unknown or not names:
        raise VitvizError(f"unknown analysis {', '.join(unknown) or repr(text)}: choose from {','.join(ANALYSES)}")
    return list(dict.fromkeys(names))


def model_summary(loaded: LoadedModel) -> dict[str, Any]:
    """The "model" section of the JSON: geometry read from the model itself."""
    model = loaded.model
    layout = token_layout(model)
    blocks = getattr(model, "blocks", [])
    return {
        "source": loaded.source,
        "arch": loaded.meta.arch,
        "img_size": list(layout.img_size),
        "grid": list(layout.grid),
        "stride": list(layout.stride),
        "num_prefix_tokens": layout.num_prefix_tokens,
        "depth": len(blocks),
        "num_heads": int(blocks[0].attn.num_heads) if len(blocks) else 0,
        "embed_dim": int(getattr(model, "embed_dim", 0)),
        "num_classes": int(getattr(model, "num_classes", 0)),
    }


def filters_section(model: nn.Module, components: int) -> tuple[dict[str, Any], FilterPCA | None]:
    """PCA of the patch-embedding filters, or why it does not apply."""
    applicable, reason = filters_applicable(model)
    if not applicable:
        return {"not_applicable": reason}, None
    weight = patch_embedding_filters(model)
    k = min(components, weight.shape[0], weight[0].numel())
    pca = filter_pca(weight, k)
    return {
        "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
        "components": pca.components.reshape(pca.components.shape[0], -1).tolist(),
    }, pca


def position_section(model: nn.Module, layout: TokenLayout) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Cosine similarity of the patch-position embeddings [gh*gw, gh*gw], or why it does not apply."""
    table = patch_position_embeddings(model)
    if table is None:
        return {"not_applicable": "the model has no absolute position embeddings (none or relative positions)"}, None
    similarity = position_similarity(table.detach(), layout.grid)  # (gh, gw, gh, gw)
    return {"similarity": similarity.reshape(layout.num_patches, layout.num_patches).tolist()}, similarity


def _top5(logits: torch.Tensor, class_names: Sequence[str]) -> list[list[list[Any]]]:
    probs = logits.float().softmax(dim=-1)
    k = min(5, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    return [
        [
            [class_names[i] if i < len(class_names) else str(i), round(float(p), 6)]
            for p, i in zip(v.tolist(), ix.tolist())
        ]
        for v, ix in zip(values, indices)
    ]


@dataclass(frozen=True)
class ImageResults:
    """Everything the image analyses computed, for the JSON and the figures."""

    distance: AttentionDistance | None
    rollout_maps: torch.Tensor | None  # (B, gh, gw) raw
    top5: list[list[list[Any]]]
    gradient_maps: torch.Tensor | None  # (B, gh, gw) raw
    target_classes: list[int]


def run_image_analyses(
    loaded: LoadedModel,
    images: torch.Tensor,
    analyses: Sequence[str],
    options: AnalysisOptions,
    progress: Callable[[int], None] | None = None,
) -> ImageResults:
    """One streamed forward per batch feeds distance and rollout; gradient rollout needs its own backward.

    Args:
        images: (B, C, H, W) preprocessed images.
        progress: called with the number of images finished after each batch.
    """
    model = loaded.model
    layout = token_layout(model)
    depth = len(model.blocks)
    if options.start_layer >= depth:
        raise VitvizError(f"--start-layer {options.start_layer} is past the last layer ({depth - 1})")
    distance_acc = DistanceAccumulator(layout, mode=options.distance_mode) if "distance" in analyses else None
    rollout_acc = (
        RolloutAccumulator(
            layout,
            head_fusion=options.head_fusion,
            discard_ratio=options.discard_ratio,
            start_layer=options.start_layer,
        )
        if "rollout" in analyses
        else None
    )
    consumers = [c for c in (distance_acc, rollout_acc) if c is not None]
    top5: list[list[list[Any]]] = []
    gradient_maps: list[torch.Tensor] = []
    targets: list[int] = []
    for start in range(0, images.shape[0], options.batch_size):
        batch = images[start : start + options.batch_size]
        if consumers:
            logits = capture_attention(model, batch, consumers, with_logits=rollout_acc is not None)
            if logits is not None:
                top5.extend(_top5(logits, loaded.meta.class_names))
        if "gradient-rollout" in analyses:
            grads = attention_gradients(model, batch, options.target_class)
            gradient_maps.append(gradient_rollout(grads.attentions, grads.gradients, layout))
            targets.extend(int(t) for t in torch.as_tensor(grads.target_class).expand(batch.shape[0]).tolist())
        if progress is not None:
            progress(min(start + options.batch_size, images.shape[0]))
    return ImageResults(
        distance=distance_acc.result() if distance_acc is not None else None,
        rollout_maps=rollout_acc.result() if rollout_acc is not None else None,
        top5=top5,
        gradient_maps=torch.cat(gradient_maps) if gradient_maps else None,
        target_classes=targets,
    )


def image_sections(results: ImageResults, image_names: Sequence[str], options: AnalysisOptions) -> dict[str, Any]:
    """The "distance", "rollout" and "gradient_rollout" sections of the JSON."""
    sections: dict[str, Any] = {}
    if results.distance is not None:
        d = results.distance
        sections["distance"] = {
            "mode": d.mode,
            "pixels": d.pixels.tolist(),
            "std": d.std.tolist(),
            "fraction": d.fraction.tolist(),
            "num_images": d.num_images,
        }
    if results.rollout_maps is not None:
        sections["rollout"] = [
            {
                "image": name,
                "head_fusion": options.head_fusion,
                "discard_ratio": options.discard_ratio,
                "start_layer": options.start_layer,
                "map": rollout_map.tolist(),
                "top5": top5,
            }
            for name, rollout_map, top5 in zip(image_names, results.rollout_maps, results.top5)
        ]
    if results.gradient_maps is not None:
        sections["gradient_rollout"] = [
            {"image": name, "target_class": target, "map": grad_map.tolist()}
            for name, grad_map, target in zip(image_names, results.gradient_maps, results.target_classes)
        ]
    return sections
