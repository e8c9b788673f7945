"""Attention rollout, gradient-weighted rollout and the pointing game.

Attention rollout (Abnar & Zuidema 2020), for each layer from ``start_layer`` to the last:
fuse heads (mean, max or min) into F [N, N]; if ``discard_ratio`` r (0 <= r < 1) is above 0, set the
floor(r*N*N) smallest entries of F to zero, per image, except entry (0, 0), which is kept if it is among them
(as vit-explain does); A = 0.5 F + 0.5 I; divide each row of A by its sum; R = A @ R, R starting as I.
A row of A that does not sum to a positive number (signed maps: differential attention, docs/design.md) makes
the rollout undefined; it is refused with one line.
floor(r*N*N) is taken exactly from r's decimal value (0.29 * 100 is 29 here, 28 in float arithmetic), and
ties among the smallest entries go to the lower flat index.

Gradient-weighted rollout (Chefer, Gur and Wolf 2021, generic rule): G = d logit_c / d attn per layer;
Abar = mean over heads of max(G * attn, 0); R = I; for each layer in order R = R + Abar @ R.

Readout, for both: R[0, p:] (the class token's row over patch columns) shaped [gh, gw]. A model without a
class token has no row that speaks for the image, so the map is the mean of R's patch rows over patch
columns, R[p:, p:].mean over rows. Maps are raw (not divided by their maximum). Heads are fused in the
attention's precision (float32 or float64); everything after that is in float64.

Pointing game: a hit when the patch with the largest map value (first in row-major order on ties) overlaps
the object mask; patch (i, j) covers pixels [i*sh, (i+1)*sh) x [j*sw, (j+1)*sw). The random baseline is the
exact chance that a uniformly random patch overlaps the object: the fraction of such patches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from vitviz.errors import VitvizError
from vitviz.tokens import TokenLayout

__all__ = [
    "HEAD_FUSIONS",
    "PointingGame",
    "RolloutAccumulator",
    "attention_rollout",
    "check_discard_ratio",
    "gradient_rollout",
    "patch_grid",
    "pointing_game",
]

HEAD_FUSIONS = ("mean", "max", "min")


@dataclass(frozen=True)
class PointingGame:
    """Pointing-game outcome per image."""

    hits: torch.Tensor  # [B] bool: the map's top patch overlaps the object
    random_chance: torch.Tensor  # [B] float64: fraction of patches overlapping the object

    @property
    def hit_rate(self) -> float:
        return float(self.hits.to(torch.float64).mean())

    @property
    def random_rate(self) -> float:
        return float(self.random_chance.mean())


def patch_grid(values: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Values over all N tokens [..., N] -> values over patches [..., gh, gw] (prefix tokens dropped)."""
    if values.shape[-1] != layout.num_tokens:
        raise ValueError(f"{values.shape[-1]} token values do not fit a layout of {layout.num_tokens} tokens")
    return values[..., layout.num_prefix_tokens :].reshape(*values.shape[:-1], *layout.grid)


def check_discard_ratio(discard_ratio: float) -> None:
    """Refuse a discard ratio outside [0, 1): discarding every entry would leave nothing to roll out."""
    if not 0.0 <= discard_ratio < 1.0:
        raise VitvizError(f"discard ratio must be in [0, 1), got {discard_ratio}")


def _discard_count(discard_ratio: float, num_tokens: int) -> int:
    return math.floor(Fraction(repr(float(discard_ratio))) * num_tokens * num_tokens)


def _fuse_heads(attn: torch.Tensor, head_fusion: str) -> tuple[torch.Tensor, float]:
    """[B, H, N, N] -> (S [B, N, N], c) with the fused heads F = S / c, S in the attention's precision (float32
    or float64): for "mean" S is the sum over heads and c = H (inside a forward torch's sum over the head axis ran
    1.4 - 1.9 times as fast as its mean, and the division folds into the rollout factor), else c = 1.

    Fusing first and converting only the fused [B, N, N] to float64 afterwards avoids a float64 copy of the
    whole layer, which costs more than the rollout itself.
    """
    if attn.dtype not in (torch.float32, torch.float64):
        attn = attn.float()
    if head_fusion == "mean":
        return attn.sum(dim=1), float(attn.shape[1])
    if head_fusion == "max":
        return attn.amax(dim=1), 1.0
    return attn.amin(dim=1), 1.0


def _rollout_factor(fused: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """A = 0.5 F + 0.5 I with rows normalised, float64 [B, N, N], after discarding F's smallest entries."""
    batch, num_tokens, _ = fused.shape
    fused = fused.to(torch.float64, copy=True)  # our own copy: the arithmetic below is in place
    discard = _discard_count(discard_ratio, num_tokens)
    if discard > 0:
        flat = fused.reshape(batch, -1)
        smallest = torch.sort(flat, dim=1, stable=True).indices[:, :discard]
        drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, smallest, True)
        drop[:, 0] = False  # entry (0, 0) stays
        fused = flat.masked_fill(drop, 0.0).reshape(batch, num_tokens, num_tokens)
    mixed = fused.mul_(0.5)
    mixed.diagonal(dim1=-2, dim2=-1).add_(0.5)
    return mixed.div_(_positive_rows(mixed.sum(dim=-1, keepdim=True)))


def _positive_rows(sums: torch.Tensor) -> torch.Tensor:
    """The row sums of 0.5 F + 0.5 I (any positive multiple), refused when one is not positive."""
    if bool((sums <= 0).any()):
        raise VitvizError(
            "attention rollout is undefined for this attention: a row of 0.5 F + 0.5 I does not sum to a positive "
            "number (a signed map, e.g. differential attention with head fusion min); try head fusion mean"
        )
    return sums


def _pull_through(row: torch.Tensor, fused: torch.Tensor, scale: float, discard_ratio: float) -> torch.Tensor:
    """u A for a row vector u [B, N] float64 and the rollout factor A of one layer's fused heads F = S / c
    (``fused`` S [B, N, N], ``scale`` c, as _fuse_heads gives them).

    Without discarding, A is never formed: row i of A is (0.5 F_i + 0.5 e_i) / (0.5 sum(F_i) + 0.5), which is
    (S_i + c e_i) / (sum(S_i) + c), so u A = c w + w S for w = u / (rowsum(S) + c): S is read twice (its row sums
    and one vector-matrix product) instead of A being written and read, in four operations per layer.
    """
    if _discard_count(discard_ratio, fused.shape[-1]) > 0:
        heads_fused = fused.to(torch.float64) / scale
        return (row[:, None, :] @ _rollout_factor(heads_fused, discard_ratio))[:, 0, :]
    fused = fused.to(torch.float64)
    w = (row / _positive_rows(fused.sum(dim=-1).add_(scale)))[:, None, :]  # (B, 1, N)
    return torch.baddbmm(w, w, fused, beta=scale)[:, 0, :]  # c w + w S


def _readout_row(layout: TokenLayout, batch: int, device: torch.device) -> torch.Tensor:
    """u [B, N] float64 such that the map is (u R)[p:]: the class token's row, or the mean of the patch rows."""
    row = torch.zeros(batch, layout.num_tokens, dtype=torch.float64, device=device)
    if layout.has_class_token:
        row[:, 0] = 1.0  # timm puts the class token first
    else:
        row[:, layout.num_prefix_tokens :] = 1.0 / layout.num_patches
    return row


class RolloutAccumulator:
    """Streaming attention rollout: each layer is reduced to its heads-fused [B, N, N] as it arrives.

    The map only needs one row of R = A_L ... A_1 (the class token's, or the mean of the patch rows), so R is
    never formed: at the end of a forward that row vector is pulled through the kept factors, L
    vector-matrix products instead of L [N, N] matrix products. Extra memory is L fused [B, N, N] matrices,
    (L / H) layers' worth of attention.
    Several forwards in a row (layer indices starting again) give the maps of all their images, concatenated.
    """

    def __init__(
        self,
        layout: TokenLayout,
        *,
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        start_layer: int = 0,
    ) -> None:
        if head_fusion not in HEAD_FUSIONS:
            raise VitvizError(f"head fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
        check_discard_ratio(discard_ratio)
        if start_layer < 0:
            raise VitvizError(f"start layer must be 0 or more, got {start_layer}")
        self.layout = layout
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio
        self.start_layer = start_layer
        self._fused: list[tuple[torch.Tensor, float]] = []  # _fuse_heads per layer from start_layer, in order
        self._last_layer = -1
        self._maps: list[torch.Tensor] = []

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        if layer_index <= self._last_layer:
            self._finish_forward()
        self._last_layer = layer_index
        num_tokens = attn.shape[-1]
        if num_tokens != self.layout.num_tokens:
            raise ValueError(f"attention over {num_tokens} tokens does not fit a layout of {self.layout.num_tokens}")
        if layer_index >= self.start_layer:
            self._fused.append(_fuse_heads(attn, self.head_fusion))

    def _finish_forward(self) -> None:
        if self._last_layer < 0:
            return
        if not self._fused:
            raise VitvizError(f"start layer {self.start_layer} is past the model's last layer ({self._last_layer})")
        first = self._fused[0][0]
        row = _readout_row(self.layout, first.shape[0], first.device)  # (B, N)
        for fused, scale in reversed(self._fused):  # u R = ((u A_L) A_(L-1)) ... A_1
            row = _pull_through(row, fused, scale, self.discard_ratio)
        self._maps.append(patch_grid(row, self.layout))
        self._fused = []
        self._last_layer = -1

    def result(self) -> torch.Tensor:
        """Raw rollout maps [B, gh, gw] float64 for every image consumed so far."""
        self._finish_forward()
        if not self._maps:
            raise ValueError("no attention was consumed")
        return torch.cat(self._maps, dim=0)


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    layout: TokenLayout,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
) -> torch.Tensor:
    """Raw rollout maps [B, gh, gw] from the L attention tensors [B, H, N, N] of one forward."""
    accumulator = RolloutAccumulator(
        layout, head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer
    )
    for layer_index, attn in enumerate(attentions):
        accumulator.consume(layer_index, attn)
    return accumulator.result()


def gradient_rollout(
    attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor], layout: TokenLayout
) -> torch.Tensor:
    """Raw gradient-weighted rollout maps [B, gh, gw] from L attentions and their gradients [B, H, N, N].

    R = (I + W_L) ... (I + W_1) with W_l = mean over heads of (grad * attn)^+; the map is one row of R (the
    class token's, or the mean of the patch rows), so R is never formed: that row vector u is pulled through
    the factors from the last layer to the first, u R = ((u (I + W_L)) (I + W_(L-1))) ... (I + W_1): L
    vector-matrix products, O(L N^2) per image instead of L [N, N] matrix products (O(L N^3)).
    """
    if len(attentions) != len(gradients) or not attentions:
        raise ValueError(f"need one gradient per attention, got {len(attentions)} and {len(gradients)}")
    batch = attentions[0].shape[0]
    row = _readout_row(layout, batch, attentions[0].device)  # (B, N)
    for attn, grad in zip(reversed(attentions), reversed(gradients)):
        # The product in the attention's precision (each entry within one rounding of float64's), the sum over
        # heads accumulated in float64: a third of the time of converting both [B, H, N, N] tensors first.
        weighted = (grad * attn).clamp_(min=0).sum(dim=1, dtype=torch.float64) / attn.shape[1]  # (B, N, N)
        row = row + torch.bmm(row.unsqueeze(1), weighted).squeeze(1)
    return patch_grid(row, layout)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, stride: tuple[int, int]) -> PointingGame:
    """Pointing game of maps [B, gh, gw] against object masks [B, H, W] (bool) at ``stride`` pixels per token.

    Pixels right of or below the patch grid (when H > gh*sh or W > gw*sw) belong to no patch.
    An image with an empty mask can neither be hit nor be hit by chance.
    """
    batch, gh, gw = maps.shape
    sh, sw = stride
    if masks.shape[0] != batch or masks.dim() != 3:
        raise ValueError(f"need one [H, W] mask per map: {batch} maps, masks of shape {tuple(masks.shape)}")
    if masks.shape[1] < gh * sh or masks.shape[2] < gw * sw:
        raise ValueError(f"masks {tuple(masks.shape[1:])} are smaller than the {gh}x{gw} grid at stride {stride}")
    covered = masks[:, : gh * sh, : gw * sw].to(torch.bool)
    overlaps = covered.reshape(batch, gh, sh, gw, sw).any(dim=4).any(dim=2)  # (B, gh, gw)
    top_patch = maps.reshape(batch, -1).argmax(dim=1)
    hits = overlaps.reshape(batch, -1).gather(1, top_patch[:, None]).squeeze(1)
    random_chance = overlaps.reshape(batch, -1).to(torch.float64).mean(dim=1)
    return PointingGame(hits=hits, random_chance=random_chance)
