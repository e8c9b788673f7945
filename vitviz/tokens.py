"""Token bookkeeping read from the model: prefix tokens, patch grid and pixels per token.

Nothing here parses a model's name or assumes a square grid or a single prefix token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitviz.errors import VitvizError


@dataclass(frozen=True)
class TokenLayout:
    """How a ViT's token sequence maps onto the input image."""

    img_size: tuple[int, int]  # (H, W) pixels the model takes
    grid: tuple[int, int]  # (gh, gw) patch grid
    stride: tuple[int, int]  # (sh, sw) pixels per token along each axis
    num_prefix_tokens: int  # class + distillation + register tokens, placed before the patches
    has_class_token: bool
    has_dist_token: bool
    num_reg_tokens: int

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    def patch_centers(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Pixel coordinates (y, x) of every patch centre in row-major order, shaped [gh*gw, 2]."""
        gh, gw = self.grid
        sh, sw = self.stride
        ys = (torch.arange(gh, dtype=dtype) + 0.5) * sh
        xs = (torch.arange(gw, dtype=dtype) + 0.5) * sw
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1)

    def patch_distances(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Euclidean distance in pixels between every pair of patch centres, shaped [gh*gw, gh*gw]."""
        centers = self.patch_centers(dtype)
        return torch.cdist(centers, centers)


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = value  # type: ignore[misc]
    return (int(a), int(b))


def _model_input_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) from the model's own pretrained config (what timm's data config resolves), if it has one."""
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return (int(size[-2]), int(size[-1])) if size else None


def _flexible_layout(model: nn.Module, embeds: nn.Module, img_size: tuple[int, int] | None) -> TokenLayout:
    """NaFlexViT-style embeddings (``model.embeds``): any input size; a dense [B, C, H, W] image gives the grid
    H // ph x W // pw (rounded up when the embedding pads the image to whole patches)."""
    size = img_size or _model_input_size(model)
    if size is None:
        raise VitvizError(f"{type(model).__name__} takes any input size and names none; give the image size")
    stride = _pair(embeds.patch_size)
    if getattr(embeds, "dynamic_img_pad", False):
        grid = (-(-size[0] // stride[0]), -(-size[1] // stride[1]))
    else:
        grid = (size[0] // stride[0], size[1] // stride[1])
    has_cls = getattr(embeds, "cls_token", None) is not None
    num_reg = int(getattr(embeds, "num_reg_tokens", 0) or 0)
    return TokenLayout(
        img_size=size,
        grid=grid,
        stride=stride,
        num_prefix_tokens=int(getattr(embeds, "num_prefix_tokens", int(has_cls) + num_reg)),
        has_class_token=has_cls,
        has_dist_token=False,
        num_reg_tokens=num_reg,
    )


def token_layout(model: nn.Module, img_size: tuple[int, int] | None = None) -> TokenLayout:
    """Read the token layout of a timm VisionTransformer-family model (incl. distilled, registers, hybrids).

    Models with a fixed patch grid take their own input size. NaFlexViT (``model.embeds``, any input size) has a
    grid once the input size is fixed: ``img_size`` (H, W), or else its pretrained config's input size, which is
    the size timm's data config (and so vitviz's preprocessing) gives it.
    """
    fixed = getattr(model, "fixed_token_layout", None)
    if isinstance(fixed, TokenLayout):  # a wrapped model that read its layout when it was loaded (Hugging Face)
        return fixed
    embeds = getattr(model, "embeds", None)
    if getattr(model, "patch_embed", None) is None and embeds is not None and hasattr(embeds, "patch_size"):
        return _flexible_layout(model, embeds, None if img_size is None else _pair(img_size))
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(patch_embed, "grid_size", None) is None:
        raise TypeError(f"{type(model).__name__} has no patch embedding with a fixed grid; not a supported ViT")
    grid = _pair(patch_embed.grid_size)
    img_size = _pair(patch_embed.img_size)
    if hasattr(patch_embed, "backbone"):
        # Hybrid stem: a CNN feature map; each token covers img_size / grid pixels.
        stride = (img_size[0] // grid[0], img_size[1] // grid[1])
    else:
        stride = _pair(patch_embed.patch_size)
    has_cls = getattr(model, "cls_token", None) is not None
    has_dist = getattr(model, "dist_token", None) is not None
    num_reg = int(getattr(model, "num_reg_tokens", 0) or 0)
    num_prefix = int(getattr(model, "num_prefix_tokens", int(has_cls) + int(has_dist) + num_reg))
    return TokenLayout(
        img_size=img_size,
        grid=grid,
        stride=stride,
        num_prefix_tokens=num_prefix,
        has_class_token=has_cls,
        has_dist_token=has_dist,
        num_reg_tokens=num_reg,
    )
