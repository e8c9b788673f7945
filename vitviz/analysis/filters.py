"""Patch-embedding filters and their principal components (ViT paper, Fig. 7 left).

W is the patch projection weight [D, C, P, P]; flattened to [D, C*P*P], it is centred over the D rows and
decomposed by PCA. Components are the right singular vectors of the centred matrix, reshaped to [C, P, P];
the explained-variance ratio of component i is s_i^2 / sum_j s_j^2. A singular vector's sign is arbitrary,
so each component is flipped to make its entry of largest magnitude positive (the first such entry on ties).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitviz.errors import VitvizError

__all__ = ["FilterPCA", "components_for_display", "filter_pca", "filters_applicable", "patch_embedding_filters"]


@dataclass(frozen=True)
class FilterPCA:
    """Top principal components of the patch-embedding filters."""

    components: torch.Tensor  # [k, C, P, P] float64, unit norm
    explained_variance_ratio: torch.Tensor  # [k] float64


def filters_applicable(model: nn.Module) -> tuple[bool, str]:
    """Whether the model's patch projection acts on pixels; the reason when it does not."""
    proj = _projection(model)
    if proj is None:
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None:
            return False, f"{type(model).__name__} has no patch embedding"
        if hasattr(patch_embed, "backbone"):
            return False, (
                "hybrid stem: tokens come from a CNN feature map, so the patch projection has no pixel-space filters"
            )
    if not isinstance(proj, nn.Conv2d) or proj.weight.dim() != 4:
        return False, f"the patch projection is a {type(proj).__name__}, not a convolution over pixels"
    if tuple(proj.kernel_size) != tuple(proj.stride):
        return False, "the patch projection's kernel and stride differ, so its filters are not patches"
    return True, ""


def _projection(model: nn.Module) -> nn.Module | None:
    """The patch projection: timm's ``patch_embed.proj`` (not a hybrid's), or what a wrapped model (Hugging Face)
    names as its ``patch_projection()``."""
    own = getattr(model, "patch_projection", None)
    if callable(own):
        return own()
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or hasattr(patch_embed, "backbone"):
        return None
    return getattr(patch_embed, "proj", None)


def patch_embedding_filters(source: torch.Tensor | nn.Module) -> torch.Tensor:
    """The raw patch-embedding filters [D, C, P, P], from a weight tensor or a model (a detached copy)."""
    if isinstance(source, nn.Module):
        applicable, reason = filters_applicable(source)
        if not applicable:
            raise VitvizError(f"patch-embedding filters are not available: {reason}")
        weight = _projection(source).weight
    else:
        weight = source
    if weight.dim() != 4:
        raise ValueError(f"patch projection weight must be [D, C, P, P], got shape {tuple(weight.shape)}")
    return weight.detach().clone()


def filter_pca(weight: torch.Tensor, k: int) -> FilterPCA:
    """PCA of the patch-embedding filters over the D rows; see the module docstring for conventions.

    Args:
        weight: the projection weight [D, C, P, P] (use patch_embedding_filters to get it from a model).
        k: number of components, 1 <= k <= min(D, C*P*P).
    """
    embed_dim = weight.shape[0]
    filter_shape = tuple(weight.shape[1:])
    flat = weight.detach().reshape(embed_dim, -1).to(torch.float64)  # (D, C*P*P)
    if not 1 <= k <= min(flat.shape):
        raise VitvizError(f"--components must be between 1 and {min(flat.shape)} for this model, got {k}")
    centred = flat - flat.mean(dim=0, keepdim=True)
    _, singular_values, vh = torch.linalg.svd(centred, full_matrices=False)
    variance = singular_values.square()
    total = variance.sum()
    ratio = variance / total if total > 0 else torch.zeros_like(variance)
    components = vh[:k]
    largest = components.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(components.gather(1, largest))
    signs[signs == 0] = 1.0
    components = components * signs
    return FilterPCA(components=components.reshape(k, *filter_shape), explained_variance_ratio=ratio[:k])


def components_for_display(components: torch.Tensor) -> torch.Tensor:
    """Each component [C, P, P] min-max scaled on its own to [0, 1]; a constant one becomes mid grey."""
    flat = components.reshape(components.shape[0], -1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1.0), torch.full_like(flat, 0.5))
    return scaled.reshape(components.shape)
