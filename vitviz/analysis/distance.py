"""Mean attention distance per layer and head (ViT paper, Fig. 7 right).

For layer l, head h, image b: w = attn[b, h, p:, p:] (p = num_prefix_tokens) and D[q, k] the Euclidean
distance in pixels between the centres of patches q and k (per-axis stride). Query q's distance is
sum_k w[q, k] * D[q, k]; a head's value is the mean over queries, then over images.
Mode "paper" uses w as it is (prefix columns dropped, rows not renormalised, as the authors do);
mode "renormalised" divides each row of w by its sum first (a row summing to 0 gives distance 0).
The spread over images is the population standard deviation (0 for one image). Mode "renormalised" sums in
float64; mode "paper" sums blocks of whole query rows in the attention's precision and the blocks in float64
(float32 attention: relative error about 2e-6 at any token count, see _image_distance).

A layer in which only the class token queries (CaiT's class-attention layers; their patch rows are the identity,
the patches pass through unchanged) has no distance: the value is a mean over patch queries and no patch queries
there, while the class token has no position in the image. Such layers, named by the caller, are left out of the
[L, H] tables (``layers`` gives the layer of each row) and listed in ``not_applicable`` with that reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from vitviz.errors import VitvizError
from vitviz.tokens import TokenLayout

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_ATTENTION_LAYER",
    "DISTANCE_MODES",
    "AttentionDistance",
    "DistanceAccumulator",
    "mean_attention_distance",
    "query_attention_distance",
]

DISTANCE_MODES = ("paper", "renormalised")
CLASS_ATTENTION_LAYER = (
    "a class-attention layer: only the class token queries, and it has no position in the image "
    "(the patch tokens pass through unchanged)"
)


@dataclass(frozen=True)
class AttentionDistance:
    """Mean attention distance of every head of every layer (that has one: see ``not_applicable``)."""

    mode: str
    pixels: torch.Tensor  # [L, H] mean over queries, then images
    std: torch.Tensor  # [L, H] population std over images of the per-image values
    fraction: torch.Tensor  # [L, H] pixels / image width
    per_image: torch.Tensor  # [L, B, H] per-image values (mean over queries)
    num_images: int
    layers: tuple[int, ...] = ()  # the model layer of each row; () when the rows are layers 0 .. L-1
    not_applicable: tuple[tuple[int, str], ...] = ()  # (layer, why) for layers without a distance


def _check_mode(mode: str) -> None:
    if mode not in DISTANCE_MODES:
        raise VitvizError(f"distance mode must be one of {', '.join(DISTANCE_MODES)}, got {mode!r}")


# Heads are converted to float64 a few at a time so the float64 copy stays under this size (bytes), in as
# few operations as that allows (each operation costs a synchronisation of the CPU threads).
_FLOAT64_CHUNK_BYTES = 2 * 2**20
# Paper mode sums this many attention terms (whole query rows) at a time in the attention's precision.
_BLOCK_TERMS = 16384


def query_attention_distance(attn: torch.Tensor, layout: TokenLayout, mode: str = "paper") -> torch.Tensor:
    """Distance in pixels of every patch query, [B, H, num_patches] float64, from one layer's attn [B, H, N, N]."""
    _check_mode(mode)
    prefix = layout.num_prefix_tokens
    if attn.shape[-1] != layout.num_tokens or attn.shape[-2] != layout.num_tokens:
        raise ValueError(f"attention over {attn.shape[-1]} tokens does not fit a layout of {layout.num_tokens}")
    distances = layout.patch_distances(torch.float64).to(attn.device)  # (n, n)
    batch, heads = attn.shape[:2]
    per_head_bytes = batch * layout.num_patches**2 * 8
    step = max(1, min(heads, _FLOAT64_CHUNK_BYTES // per_head_bytes))
    chunks = []
    for first in range(0, heads, step):
        weights = attn[:, first : first + step, prefix:, prefix:].to(torch.float64, copy=True)  # (B, h, n, n)
        row_sums = weights.sum(dim=-1) if mode == "renormalised" else None
        per_query = weights.mul_(distances).sum(dim=-1)  # (B, h, n)
        if row_sums is not None:
            per_query = per_query / torch.where(row_sums != 0, row_sums, 1.0)  # signed maps: any sign
        chunks.append(per_query)
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


@functools.lru_cache(maxsize=16)
def _padded_patch_distances(layout: TokenLayout) -> torch.Tensor:
    """D over all N tokens, [N, N] float64: pixel distances between patch centres, 0 in prefix rows and columns.

    Made once per layout (it costs about as much as a layer's sums); shared, so never written.
    """
    prefix = layout.num_prefix_tokens
    padded = torch.zeros(layout.num_tokens, layout.num_tokens, dtype=torch.float64)
    padded[prefix:, prefix:] = layout.patch_distances(torch.float64)
    return padded


def _sum_dtype(attn: torch.Tensor) -> torch.dtype:
    """The precision paper mode sums in: the attention's own if float32 or float64, else float32."""
    return attn.dtype if attn.dtype in (torch.float32, torch.float64) else torch.float32


def _paper_weights(padded: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """`padded` (_padded_patch_distances) in the precision and on the device paper mode sums attn in."""
    return padded.to(device=attn.device, dtype=_sum_dtype(attn))


def _image_distance(attn: torch.Tensor, layout: TokenLayout, mode: str, weights: torch.Tensor) -> torch.Tensor:
    """[B, H] float64. `weights` is _paper_weights(_padded_patch_distances(layout), attn)."""
    if mode != "paper":
        return query_attention_distance(attn, layout, mode).mean(dim=-1)
    # The mean over patch queries q of sum_k w[q, k] D[q, k] is <w, D> / n over the patch block; with D zero over
    # the prefix rows and columns, that is a matrix-vector product over the layer's rows (b, h): one read of the
    # attention, no copy, no loop over heads. One float32 product over all N*N terms loses precision as N grows
    # (relative error 5e-6 at 197 tokens, 8e-5 at 1,374, against float64), so the terms are summed in blocks of
    # whole query rows, about _BLOCK_TERMS terms each, in the attention's precision, and the blocks' sums in
    # float64: relative error about 2e-6 at any N (measured at 197, 1,374 and 4,097 tokens with peaky
    # attention; the tests hold it to 1e-5 at 1,000+ tokens), for a few more matrix-vector calls per layer.
    batch, heads, num_tokens, _ = attn.shape
    if num_tokens != layout.num_tokens or attn.shape[-2] != num_tokens:
        raise ValueError(f"attention over {num_tokens} tokens does not fit a layout of {layout.num_tokens}")
    if attn.dtype != weights.dtype:
        attn = attn.to(weights.dtype)
    flat = attn.reshape(batch * heads, num_tokens * num_tokens)
    flat_weights = weights.reshape(-1)
    step = max(1, _BLOCK_TERMS // num_tokens) * num_tokens  # whole query rows per block
    if step >= flat.shape[1]:
        sums = (flat @ flat_weights).to(torch.float64)
    else:
        parts = [
            flat[:, first : first + step] @ flat_weights[first : first + step]
            for first in range(0, flat.shape[1], step)
        ]
        sums = torch.stack(parts).to(torch.float64).sum(dim=0)
    return (sums / layout.num_patches).reshape(batch, heads)


class DistanceAccumulator:
    """Streaming consumer: keeps only [B, H] numbers per layer. Several forwards add images.

    ``class_attention_layers``: the layers in which only the class token queries; they are not computed and are
    reported as not applicable.
    """

    def __init__(self, layout: TokenLayout, mode: str = "paper", class_attention_layers: Iterable[int] = ()) -> None:
        _check_mode(mode)
        self.layout = layout
        self.mode = mode
        self.class_attention_layers = frozenset(int(layer) for layer in class_attention_layers)
        self._skipped: set[int] = set()
        self._per_layer: dict[int, list[torch.Tensor]] = {}
        self._padded = _padded_patch_distances(layout)  # shared, read only
        self._weights: torch.Tensor | None = None  # _padded in the precision and on the device of the attention

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        if layer_index in self.class_attention_layers:
            self._skipped.add(layer_index)
            return
        dtype = _sum_dtype(attn)
        weights = self._weights
        if weights is None or weights.device != attn.device or weights.dtype != dtype:
            weights = self._weights = _paper_weights(self._padded, attn)
        values = _image_distance(attn, self.layout, self.mode, weights)
        self._per_layer.setdefault(layer_index, []).append(values)

    def result(self) -> AttentionDistance:
        if not self._per_layer:
            raise ValueError("no attention was consumed" if not self._skipped else "no layer has a distance")
        layers = sorted(self._per_layer)
        if sorted([*layers, *self._skipped]) != list(range(len(layers) + len(self._skipped))):
            raise ValueError(f"layers {sorted([*layers, *self._skipped])} are not every layer from 0")
        parts = [self._per_layer[layer] for layer in layers]
        per_image = torch.stack([p[0] if len(p) == 1 else torch.cat(p, dim=0) for p in parts])  # (L, B, H)
        pixels = per_image.mean(dim=1)
        return AttentionDistance(
            mode=self.mode,
            pixels=pixels,
            std=per_image.std(dim=1, correction=0),
            fraction=pixels / self.layout.img_size[1],
            per_image=per_image,
            num_images=per_image.shape[1],
            layers=tuple(layers),
            not_applicable=tuple((layer, CLASS_ATTENTION_LAYER) for layer in sorted(self._skipped)),
        )


def mean_attention_distance(
    attentions: Sequence[torch.Tensor],
    layout: TokenLayout,
    mode: str = "paper",
    class_attention_layers: Iterable[int] = (),
) -> AttentionDistance:
    """Mean attention distance from a list of L attention tensors [B, H, N, N] (one forward)."""
    accumulator = DistanceAccumulator(layout, mode, class_attention_layers)
    for layer_index, attn in enumerate(attentions):
        accumulator.consume(layer_index, attn)
    return accumulator.result()
