"""What the tokens carry: residual-stream norms, attention to prefix tokens, patch-feature PCA, head maps and
a per-patch logit lens, computed while the model runs (docs/design.md, "What tokens carry").

Block outputs are read by forward hooks on ``model.blocks`` (and the final features by a hook on
``model.norm``) installed with `block_outputs`; attention arrives through `vitviz.capture`'s consumers. Every
accumulator here sums over images, so its memory does not grow with their number, except where it says so
(the head maps keep one [H, gh, gw] map per image; the PCA keeps its [gh, gw, k] projections per image,
computed in a second pass once the components are known). Several forwards in a row (batches of one image set)
combine into one result.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vitviz.capture import HOOK_LOCK
from vitviz.tokens import TokenLayout

logger = logging.getLogger(__name__)

__all__ = [
    "FeatureMoments",
    "FeaturePCA",
    "FeatureProjections",
    "HeadMapAccumulator",
    "LogitLens",
    "Outliers",
    "PrefixAttention",
    "TokenNorms",
    "block_outputs",
    "has_classifier_head",
    "mass_threshold_masks",
    "pca_from_moments",
    "token_names",
]

BlockConsumer = Callable[[int, torch.Tensor], None]


def token_names(layout: TokenLayout) -> list[str]:
    """Names of every token in the model's order: cls, dist, reg0..., then patches as r{row}c{col}."""
    prefix = (["cls"] if layout.has_class_token else []) + (["dist"] if layout.has_dist_token else [])
    prefix += [f"reg{i}" for i in range(layout.num_reg_tokens)]
    if len(prefix) != layout.num_prefix_tokens:  # a prefix layout these flags do not describe
        prefix = [f"prefix{i}" for i in range(layout.num_prefix_tokens)]
    gh, gw = layout.grid
    return prefix + [f"r{r}c{c}" for r in range(gh) for c in range(gw)]


@contextmanager
def block_outputs(
    model: nn.Module, on_block: BlockConsumer | None = None, on_features: Callable[[torch.Tensor], None] | None = None
) -> Iterator[None]:
    """While the block runs, hand every block's output [B, N, D] to `on_block(layer, x)` and the final
    features (the output of ``model.norm``, what ``forward_features`` returns) to `on_features(x)`.

    Hooks act only on forwards of the thread that installed them and are removed however the block exits.
    A model without ``model.norm`` hands its last block's output as the features.
    """
    owner = threading.get_ident()
    blocks = list(getattr(model, "blocks", []))
    norm = getattr(model, "norm", None)
    handles: list[Any] = []

    def block_hook(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            if threading.get_ident() != owner:
                return
            if on_block is not None:
                on_block(index, output)
            if on_features is not None and norm is None and index == len(blocks) - 1:
                on_features(output)

        return hook

    def norm_hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        if threading.get_ident() == owner and on_features is not None:
            on_features(output)

    try:
        with HOOK_LOCK:
            for index, block in enumerate(blocks):
                handles.append(block.register_forward_hook(block_hook(index)))
            if norm is not None and on_features is not None:
                handles.append(norm.register_forward_hook(norm_hook))
        yield
    finally:
        with HOOK_LOCK:
            for handle in handles:
                handle.remove()


# --- norms and outliers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outliers:
    """High-norm patch tokens: one entry per (image, layer, patch) whose norm exceeds factor x the median."""

    image: np.ndarray  # [M] int64, index of the image in the order given
    layer: np.ndarray  # [M] int64
    row: np.ndarray  # [M] int64, patch row
    col: np.ndarray  # [M] int64, patch column
    norm: np.ndarray  # [M] float64, the token's L2 norm
    ratio: np.ndarray  # [M] float64, norm / the median patch-token norm of that image and layer


class TokenNorms:
    """Block consumer: the L2 norm of every token after every block, summed over images, and the outliers.

    A patch token is an outlier at layer l of an image when its norm exceeds `factor` times the median
    (numpy's median: the mean of the two middle values for an even count) of that image's patch-token norms at
    layer l. Memory: [L, N] sums plus the outliers found.
    """

    def __init__(self, layout: TokenLayout, depth: int, factor: float = 2.0) -> None:
        self.layout = layout
        self.factor = float(factor)
        self._sums = torch.zeros(depth, layout.num_tokens, dtype=torch.float64)
        self._images = 0
        self._batch_start = 0  # index of the current forward's first image
        self._last_layer = -1
        self._found: list[tuple[np.ndarray, ...]] = []

    def consume(self, layer_index: int, x: torch.Tensor) -> None:
        if layer_index <= self._last_layer:  # a new forward
            self._batch_start = self._images
        self._last_layer = layer_index
        if x.shape[1] != self.layout.num_tokens:
            raise ValueError(f"block output of {x.shape[1]} tokens does not fit a layout of {self.layout.num_tokens}")
        norms = torch.linalg.vector_norm(x.detach().double(), dim=-1).cpu()  # (B, N)
        self._sums[layer_index] += norms.sum(dim=0)
        if layer_index == 0:
            self._images += norms.shape[0]
        patches = norms[:, self.layout.num_prefix_tokens :]  # (B, P)
        median = torch.quantile(patches, 0.5, dim=1, keepdim=True)  # linear interpolation = numpy's median
        ratio = patches / median
        image, patch = torch.nonzero(patches > self.factor * median, as_tuple=True)
        if image.numel():
            gw = self.layout.grid[1]
            self._found.append(
                (
                    (image + self._batch_start).numpy(),
                    np.full(image.shape[0], layer_index),
                    (patch // gw).numpy(),
                    (patch % gw).numpy(),
                    patches[image, patch].numpy(),
                    ratio[image, patch].numpy(),
                )
            )

    @property
    def num_images(self) -> int:
        return self._images

    def norms(self) -> np.ndarray:
        """[L, N] mean norm over images."""
        if not self._images:
            raise ValueError("no block output was consumed")
        return (self._sums / self._images).numpy()

    def outliers(self) -> Outliers:
        """Every outlier, sorted by image, layer, row and column."""
        columns = [np.concatenate(parts) for parts in zip(*self._found)] if self._found else []
        if not columns:
            empty_i, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
            return Outliers(empty_i, empty_i, empty_i, empty_i, empty_f, empty_f)
        image, layer, row, col, norm, ratio = columns
        order = np.lexsort((col, row, layer, image))
        return Outliers(
            image=image[order].astype(np.int64),
            layer=layer[order].astype(np.int64),
            row=row[order].astype(np.int64),
            col=col[order].astype(np.int64),
            norm=norm[order].astype(np.float64),
            ratio=ratio[order].astype(np.float64),
        )


# --- attention to prefix tokens --------------------------------------------------------------------------


class PrefixAttention:
    """Attention consumer: the share of attention patch queries give to all prefix tokens together, [L, H],
    mean over patch queries and images; zeros for a model without prefix tokens."""

    def __init__(self, layout: TokenLayout, depth: int) -> None:
        self.layout = layout
        self._sums: torch.Tensor | None = None
        self._depth = depth
        self._images = 0

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        batch, heads = attn.shape[:2]
        if self._sums is None:
            self._sums = torch.zeros(self._depth, heads, dtype=torch.float64)
        if layer_index == 0:
            self._images += batch
        p = self.layout.num_prefix_tokens
        if p == 0:
            return
        share = attn[:, :, p:, :p].double().sum(dim=-1).mean(dim=-1)  # (B, H)
        self._sums[layer_index] += share.sum(dim=0).cpu()

    def result(self) -> np.ndarray:
        """[L, H] float64."""
        if self._sums is None or not self._images:
            raise ValueError("no attention was consumed")
        return (self._sums / self._images).numpy()


# --- head maps ---------------------------------------------------------------------------------------------


class HeadMapAccumulator:
    """Attention consumer: the last layer's class-token attention over the patches for every head, [B, H, gh, gw]
    per forward; for a model without a class token, the mean over patch queries."""

    def __init__(self, layout: TokenLayout, depth: int) -> None:
        self.layout = layout
        self.last_layer = depth - 1
        self._maps: list[torch.Tensor] = []

    @property
    def uses_class_token(self) -> bool:
        return self.layout.has_class_token

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        if layer_index != self.last_layer:
            return
        p = self.layout.num_prefix_tokens
        rows = attn[:, :, 0, p:] if self.uses_class_token else attn[:, :, p:, p:].mean(dim=2)  # timm: cls first
        self._maps.append(rows.double().reshape(*rows.shape[:2], *self.layout.grid).cpu())

    def result(self) -> np.ndarray:
        """[B, H, gh, gw] float64 for every image consumed."""
        if not self._maps:
            raise ValueError("no attention of the last layer was consumed")
        return torch.cat(self._maps).numpy()


def mass_threshold_masks(maps: np.ndarray, share: float) -> np.ndarray:
    """DINO's mass threshold: per map (last two axes), the smallest set of patches, largest first (ties: the
    lower row-major index first), whose values sum to at least `share` of the map's total. Boolean, same shape."""
    values = np.asarray(maps, dtype=np.float64)
    shape = values.shape
    flat = values.reshape(-1, shape[-2] * shape[-1])
    order = np.argsort(-flat, axis=1, kind="stable")
    ranked = np.take_along_axis(flat, order, axis=1)
    cumulative = np.cumsum(ranked, axis=1)
    needed = share * cumulative[:, -1:] * (1 - 1e-12)  # rounding must not push share 1 past the total
    count = np.minimum((cumulative < needed).sum(axis=1) + 1, flat.shape[1])
    ranks = np.arange(flat.shape[1])[None, :] < count[:, None]
    masks = np.zeros_like(flat, dtype=bool)
    np.put_along_axis(masks, order, ranks, axis=1)
    return masks.reshape(shape)


# --- PCA of the final patch features -----------------------------------------------------------------------


class FeatureMoments:
    """Features consumer, first pass: Σx and Σxxᵀ in float64 over the final features' patch tokens of every image.

    It also holds the patch features of the latest forward only (one batch, replaced by the next forward's), so
    the projection need not recompute that batch: memory is D + D² float64 numbers plus one batch's [B, P, D],
    whatever the number of images.
    """

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout
        self.count = 0  # patch tokens summed
        self.images = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self.latest: torch.Tensor | None = None  # [B, P, D] of the latest forward, as it came

    def consume_features(self, features: torch.Tensor) -> None:
        patches = features[:, self.layout.num_prefix_tokens :].detach()  # (B, P, D)
        flat = patches.reshape(-1, patches.shape[-1]).double()
        if self.sum is None or self.outer is None:
            self.sum = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
            self.outer = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
        self.sum += flat.sum(dim=0)
        self.outer += flat.T @ flat
        self.count += flat.shape[0]
        self.images += patches.shape[0]
        self.latest = patches

    def pca(self, components: int = 3) -> FeaturePCA:
        """The mean, the top `components` components and their explained variance ratios."""
        if self.sum is None or self.outer is None:
            raise ValueError("no features were consumed")
        mean, basis, ratio = pca_from_moments(self.sum, self.outer, self.count, components)
        return FeaturePCA(mean=mean, components=basis, explained_variance_ratio=ratio)


@dataclass(frozen=True)
class FeaturePCA:
    """The PCA of the patch features: mean [D], components [k, D] and explained variance ratios [k], float64."""

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance_ratio: torch.Tensor

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        """(x − μ)·v_i for patch features [..., D]: [..., k] float64 on the CPU."""
        x = patches.detach().to(self.mean.device, torch.float64)
        return ((x - self.mean) @ self.components.T).cpu()


class FeatureProjections:
    """Features consumer, second pass: each image's patch features projected on the known components; only the
    projections [B, gh, gw, k] float64 are kept (the features of each forward are dropped once projected)."""

    def __init__(self, layout: TokenLayout, pca: FeaturePCA) -> None:
        self.layout = layout
        self.pca = pca
        self._parts: list[torch.Tensor] = []

    def consume_features(self, features: torch.Tensor) -> None:
        self.consume_patches(features[:, self.layout.num_prefix_tokens :])

    def consume_patches(self, patches: torch.Tensor) -> None:
        """Project patch features [B, P, D] (prefix tokens already dropped)."""
        projected = self.pca.project(patches)  # (B, P, k)
        self._parts.append(projected.reshape(projected.shape[0], *self.layout.grid, projected.shape[-1]))

    def result(self) -> np.ndarray:
        """[B, gh, gw, k] float64 for every image consumed, in order."""
        if not self._parts:
            raise ValueError("no features were projected")
        return torch.cat(self._parts).numpy()


def pca_from_moments(
    total: torch.Tensor, outer: torch.Tensor, count: int, components: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean [D], top components [k, D] (unit norm, each with its largest-|loading| entry positive) and their
    explained variance ratios [k] from Σx, Σxxᵀ and the number of vectors (population covariance)."""
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)
    covariance = (covariance + covariance.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.flip(0).clamp(min=0)
    basis = eigenvectors.flip(1).T[: min(components, covariance.shape[0])]
    largest = basis.abs().argmax(dim=1)
    signs = torch.sign(basis.gather(1, largest[:, None]))
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
    variance = eigenvalues.sum()
    ratio = eigenvalues[: basis.shape[0]] / variance if variance > 0 else torch.zeros(basis.shape[0]).double()
    return mean, basis, ratio


# --- the logit lens ----------------------------------------------------------------------------------------


def has_classifier_head(model: nn.Module) -> bool:
    """Whether the model ends in a classification head (a head with outputs, not an identity)."""
    head = getattr(model, "head", None)
    return int(getattr(model, "num_classes", 0) or 0) > 0 and head is not None and not isinstance(head, nn.Identity)


class LogitLens:
    """Block consumer: each layer's patch tokens through the final norm and head (norm, fc_norm, head; the pooling
    skipped), softmaxed over classes; keeps the target class's probability per patch and layer.

    The batch's patch tokens of every layer are kept until `finish_batch` names each image's target class (the
    prediction is only known after the forward): L x [B, P, D] for one batch.
    """

    def __init__(self, model: nn.Module, layout: TokenLayout) -> None:
        self.model = model
        self.layout = layout
        self._layers: list[torch.Tensor] = []
        self._maps: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def consume(self, layer_index: int, x: torch.Tensor) -> None:
        if layer_index == 0:
            self._layers = []
        self._layers.append(x[:, self.layout.num_prefix_tokens :].detach())

    def _head(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        for name in ("norm", "fc_norm", "head_drop", "head"):
            module = getattr(model, name, None)
            if module is not None:
                tokens = module(tokens)
        return tokens

    def finish_batch(self, targets: torch.Tensor) -> None:
        """Project the kept layers for this batch; `targets` [B] are the classes followed."""
        index = targets.to(torch.long).reshape(-1, 1, 1)
        with torch.no_grad():
            per_layer = []
            for tokens in self._layers:
                probs = self._head(tokens).float().softmax(dim=-1)  # (B, P, K)
                per_layer.append(probs.gather(2, index.expand(-1, probs.shape[1], 1).to(probs.device))[..., 0])
        stacked = torch.stack(per_layer, dim=1).double().cpu()  # (B, L, P)
        self._maps.append(stacked.reshape(*stacked.shape[:2], *self.layout.grid))
        self._targets.append(targets.detach().cpu().to(torch.long))
        self._layers = []

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [B, L, gh, gw] float64, targets [B])."""
        if not self._maps:
            raise ValueError("no batch was finished")
        return torch.cat(self._maps).numpy(), torch.cat(self._targets).numpy()
