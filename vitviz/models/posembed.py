"""Position-embedding variants on top of timm's VisionTransformer, and reading them back as one table.

- learned: timm's own 1D table (`pos_embed`, [1, prefix + gh*gw, D]).
- learned_2d: `FactorisedPosEmbedViT`, the paper's "2-dimensional" variant (Appendix D.4): an X table
  [gw, D/2] and a Y table [gh, D/2]; the patch at (row r, column c) gets concat(X[c], Y[r]).
- sincos: a fixed (non-trainable) 2D sin-cos table from `timm.layers.build_sincos2d_pos_embed`, stored
  in timm's `pos_embed` slot with `no_embed_class=True`, as MoCo v3 does.
- relative: timm's VisionTransformerRelPos (a learned relative-position bias inside attention).

Prefix tokens get no position embedding in the learned_2d and sincos variants: they are learned vectors
already, so an extra learned offset would add nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import nn

from vitviz.errors import VitvizError
from vitviz.models.meta import ModelMeta
from vitviz.tokens import token_layout

logger = logging.getLogger(__name__)


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """The fixed 2D sin-cos table for a (gh, gw) grid in timm's row-major patch order, shaped [gh*gw, dim]."""
    return build_sincos2d_pos_embed(list(grid), dim=dim, temperature=10000.0)


class FactorisedPosEmbedViT(VisionTransformer):
    """timm VisionTransformer whose position embedding is concat(X[column], Y[row]) (paper Appendix D.4)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["pos_embed"] = "none"  # timm's 1D table is replaced by the two factorised tables below
        super().__init__(**kwargs)
        self.no_embed_class = True  # prefix tokens carry no position embedding
        gh, gw = self.patch_embed.grid_size
        half = self.embed_dim // 2
        self.pos_embed_x = nn.Parameter(torch.empty(1, gw, half))  # (1, gw, D/2) one row per column
        self.pos_embed_y = nn.Parameter(torch.empty(1, gh, half))  # (1, gh, D/2) one row per row
        trunc_normal_(self.pos_embed_x, std=0.02)
        trunc_normal_(self.pos_embed_y, std=0.02)

    def factorised_table(self) -> torch.Tensor:
        """The materialised table [1, gh*gw, D] in row-major patch order."""
        gw, gh = self.pos_embed_x.shape[1], self.pos_embed_y.shape[1]
        x_part = self.pos_embed_x[:, None, :, :].expand(-1, gh, -1, -1)  # (1, gh, gw, D/2)
        y_part = self.pos_embed_y[:, :, None, :].expand(-1, -1, gw, -1)  # (1, gh, gw, D/2)
        return torch.cat([x_part, y_part], dim=-1).flatten(1, 2)  # (1, gh*gw, D)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], -1, x.shape[-1]) + self.factorised_table()  # (B, gh*gw, D)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if prefix:
            x = torch.cat([*prefix, x], dim=1)  # (B, prefix + gh*gw, D)
        return self.pos_drop(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"pos_embed_x", "pos_embed_y"}

    def set_input_size(self, img_size: tuple[int, int] | None = None, patch_size: Any = None) -> None:
        """Change the input size, resampling each factorised table along its own axis (bicubic)."""
        if patch_size is not None:
            raise VitvizError("changing the patch size of a learned_2d model is not supported")
        super().set_input_size(img_size=img_size)  # pos_embed is None, so this only resizes the patch embedding
        gh, gw = self.patch_embed.grid_size
        self.pos_embed_x = nn.Parameter(resample_table_1d(self.pos_embed_x.detach(), gw))
        self.pos_embed_y = nn.Parameter(resample_table_1d(self.pos_embed_y.detach(), gh))


def resample_table_1d(table: torch.Tensor, new_length: int) -> torch.Tensor:
    """Resample a [1, L, C] table to [1, new_length, C] with the bicubic, antialiased kernel timm uses in 2D.

    Bicubic resampling is separable, so resampling the X and Y tables on their own gives exactly the
    factorised form of resampling the materialised 2D table with `timm.layers.resample_abs_pos_embed`.
    """
    if table.shape[1] == new_length:
        return table.clone()
    orig_dtype = table.dtype
    as_image = table.float().permute(0, 2, 1)[:, :, None, :]  # (1, C, 1, L)
    resized = F.interpolate(as_image, size=(1, new_length), mode="bicubic", align_corners=False, antialias=True)
    return resized[:, :, 0, :].permute(0, 2, 1).to(orig_dtype)  # (1, new_length, C)


def patch_position_embeddings(model: nn.Module) -> torch.Tensor | None:
    """Absolute position embeddings of the patch positions only, shaped [gh*gw, D] (detached).

    Prefix positions (class, distillation, register tokens) are dropped; a table with exactly one entry per
    patch (DeiT III, register models, CaiT) is returned whole. Factorised and fixed tables are
    materialised. Returns None for models without absolute position embeddings ("none", relative bias).
    """
    if isinstance(model, FactorisedPosEmbedViT):
        return model.factorised_table()[0].detach()
    own = getattr(model, "patch_position_table", None)
    if callable(own):  # a wrapped model (Hugging Face) reads its own table
        return own()
    pos_embed = getattr(model, "pos_embed", None)
    if not isinstance(pos_embed, torch.Tensor):
        return None
    layout = token_layout(model)
    table = pos_embed.detach().reshape(-1, pos_embed.shape[-1])  # (prefix? + gh*gw, D)
    num_extra = table.shape[0] - layout.num_patches
    # timm's no_embed_class models (DeiT III, register models) hold patch positions only; the others
    # start with one entry per prefix token.
    # A table of exactly the patches is the patch table itself whatever the prefix (CaiT: its class token joins
    # after the self-attention blocks, with no position).
    expected_extra = 0 if getattr(model, "no_embed_class", False) else layout.num_prefix_tokens
    if num_extra not in (0, expected_extra):
        raise VitvizError(
            f"the position-embedding table has {table.shape[0]} entries but the model has a "
            f"{layout.grid[0]}x{layout.grid[1]} patch grid and {layout.num_prefix_tokens} prefix tokens"
        )
    return table[num_extra:]


def resample_input_size(
    model: nn.Module, meta: ModelMeta, new_img_size: tuple[int, int]
) -> tuple[nn.Module, ModelMeta]:
    """A copy of `model` that takes `new_img_size` inputs (for higher-resolution fine-tuning), and its meta.

    Learned 1D tables are resampled in 2D with `timm.layers.resample_abs_pos_embed` (bicubic, prefix
    entries kept); factorised tables are resampled 1D per axis with the same kernel; sin-cos tables are
    recomputed for the new grid; relative-position bias tables are resized by timm
    (`resize_rel_pos_bias_table`, via `set_input_size`). The input model is left untouched, and the
    resampling is appended to `meta.resolution_history`.
    """
    if not (isinstance(new_img_size, (tuple, list)) and len(new_img_size) == 2):
        raise VitvizError(f"new image size must be (height, width), got {new_img_size!r}")
    new_size = (int(new_img_size[0]), int(new_img_size[1]))
    layout = token_layout(model)
    new_config = None
    if meta.config is not None:
        new_config = dataclasses.replace(meta.config, img_size=new_size)  # validates divisibility and limits
    elif new_size[0] % layout.stride[0] or new_size[1] % layout.stride[1] or min(new_size) <= 0:
        raise VitvizError(f"new image size {new_size} is not a positive multiple of the stride {layout.stride}")
    if not hasattr(model, "set_input_size"):
        raise VitvizError(f"{type(model).__name__} cannot change its input size")

    new_model = copy.deepcopy(model)
    pos_kind = meta.config.pos_embed if meta.config is not None else None
    with torch.no_grad():
        new_model.set_input_size(img_size=new_size)
        if isinstance(new_model, VisionTransformerRelPos):
            method = "relative-bias-resize"
        elif pos_kind == "sincos":
            table = sincos_pos_embed(new_model.patch_embed.grid_size, new_model.embed_dim)
            new_model.pos_embed = nn.Parameter(table[None].to(model.pos_embed), requires_grad=False)
            method = "sincos-recomputed"
        elif isinstance(new_model, FactorisedPosEmbedViT) or getattr(new_model, "pos_embed", None) is not None:
            method = "bicubic"
        else:
            method = "none"
    new_grid = token_layout(new_model).grid
    entry = {"method": method, "old_grid": list(layout.grid), "new_grid": list(new_grid)}
    logger.info("resampled position embeddings %s -> %s (%s)", layout.grid, new_grid, method)
    new_meta = dataclasses.replace(
        meta,
        config=new_config,
        input_size=new_size,
        resolution_history=[*meta.resolution_history, entry],
    )
    return new_model, new_meta
