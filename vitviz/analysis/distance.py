"""Mean attention distance per layer and head (ViT paper, Fig. 7 right).

For layer l, head h, image b: w = attn[b, h, p:, p:] (p = num_prefix_tokens) and D[q, k] the Euclidean
distance in pixels between the centres of patches q and k (per-axis stride). Query q's distance is
sum_k w[q, k] * D[q, k]; a head's value is the mean over queries, then over images.
Mode "paper" uses w as it is (prefix columns dropped, rows not renormalised, as the authors do);
mode "renormalised" divides each row of w by its sum first (a row summing to 0 gives distance 0).
The spread over images is the population standard deviation (0 for one image). Sums run in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vitviz.errors import VitvizError
from vitviz.tokens import TokenLayout

logger = logging.getLogger(__name__)

__all__ = [
    "DISTANCE_MODES",
    "AttentionDistance",
    "DistanceAccumulator",
    "image_attention_distance",
    "mean_attention_distance",
    "query_attention_distance",
]

DISTANCE_MODES = ("paper", "renormalised")


@dataclass(frozen=True)
class AttentionDistance:
    """Mean attention distance of every head of every layer."""

    mode: str
    pixels: torch.Tensor  # [L, H] mean over queries, then images
    std: torch.Tensor  # [L, H] population std over images of the per-image values
    fraction: torch.Tensor  # [L, H] pixels / image width
    per_image: torch.Tensor  # [L, B, H] per-image values (mean over queries)
    num_images: int


def _check_mode(mode: str) -> None:
    if mode not in DISTANCE_MODES:
        raise VitvizError(f"distance mode must be one of {', '.join(DISTANCE_MODES)}, got {mode!r}")


def query_attention_distance(attn: torch.Tensor, layout: TokenLayout, mode: str = "paper") -> torch.Tensor:
    """Distance in pixels of every patch query, [B, H, num_patches] float64, from one layer's attn [B, H, N, N]."""
    _check_mode(mode)
    prefix = layout.num_prefix_tokens
    if attn.shape[-1] != layout.num_tokens or attn.shape[-2] != layout.num_tokens:
        raise ValueError(f"attention over {attn.shape[-1]} tokens does not fit a layout of {layout.num_tokens}")
    distances = layout.patch_distances(torch.float64).to(attn.device)  # (n, n)
    per_head = []
    # One head at a time keeps the float64 copy to one [B, n, n] slice instead of the whole layer.
    for head in range(attn.shape[1]):
        weights = attn[:, head, prefix:, prefix:].to(torch.float64)  # (B, n, n)
        if mode == "renormalised":
            row_sums = weights.sum(dim=-1, keepdim=True)
            weights = weights / torch.where(row_sums > 0, row_sums, 1.0)
        per_head.append((weights * distances).sum(dim=-1))  # (B, n)
    return torch.stack(per_head, dim=1)


def image_attention_distance(attn: torch.Tensor, layout: TokenLayout, mode: str = "paper") -> torch.Tensor:
    """Mean distance over patch queries of every head, [B, H] float64, from one layer's attn [B, H, N, N]."""
    return query_attention_distance(attn, layout, mode).mean(dim=-1)


class DistanceAccumulator:
    """Streaming consumer: keeps only [B, H] numbers per layer. Several forwards add images."""

    def __init__(self, layout: TokenLayout, mode: str = "paper") -> None:
        _check_mode(mode)
        self.layout = layout
        self.mode = mode
        self._per_layer: dict[int, list[torch.Tensor]] = {}

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        values = image_attention_distance(attn, self.layout, self.mode)
        self._per_layer.setdefault(layer_index, []).append(values)

    def result(self) -> AttentionDistance:
        if not self._per_layer:
            raise ValueError("no attention was consumed")
        layers = sorted(self._per_layer)
        if layers != list(range(len(layers))):
            raise ValueError(f"layers {layers} are not every layer from 0")
        per_image = torch.stack([torch.cat(self._per_layer[layer], dim=0) for layer in layers])  # (L, B, H)
        pixels = per_image.mean(dim=1)
        return AttentionDistance(
            mode=self.mode,
            pixels=pixels,
            std=per_image.std(dim=1, correction=0),
            fraction=pixels / self.layout.img_size[1],
            per_image=per_image,
            num_images=per_image.shape[1],
        )


def mean_attention_distance(
    attentions: Sequence[torch.Tensor], layout: TokenLayout, mode: str = "paper"
) -> AttentionDistance:
    """Mean attention distance from a list of L attention tensors [B, H, N, N] (one forward)."""
    accumulator = DistanceAccumulator(layout, mode)
    for layer_index, attn in enumerate(attentions):
        accumulator.consume(layer_index, attn)
    return accumulator.result()
