"""timm's CaiT (cait.py), read as a whole model: its layers are model.blocks, then model.blocks_token_only
(L = depth + depth_token_only).

Self-attention blocks run on the patches with talking heads: softmax(mix_l(q k^T s)), then mix_w, then @ v. There
is no attention call: their map is the softmax before the heads are mixed, read where proj_w takes it (timm's own
tensor, [B, n, n, H]). Class-attention blocks take [class, patches] and only the class token queries; they call
scaled_dot_product_attention after the v projection (no k_norm), read as any attention call. Every layer is handed
over as a map over [class, patches]: the class token its own row while it is not in the sequence, the patches
their own rows in the class-attention layers.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from timm.models.cait import Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn
from torch import nn

from vitviz.capture.core import AttentionSite, CaptureSession, Handles, Reader, transformer_blocks


def _talking_heads_with_class(read: Sequence[torch.Tensor], maps: bool) -> torch.Tensor:
    """CaiT self-attention: the softmax probabilities over the patches as proj_w takes them, [B, n, n, H] (before
    the heads are mixed), as the map over [class, patches], [B, H, 1 + n, 1 + n]. The class token is not in the
    sequence yet: it is its own row (1 at (0, 0); 0 in a gradient) and no patch attends to it."""
    (probabilities,) = read
    patches = probabilities.detach().permute(0, 3, 1, 2)
    batch, heads, num_patches, _ = patches.shape
    full = patches.new_zeros(batch, heads, num_patches + 1, num_patches + 1)
    if maps:
        full[:, :, 0, 0] = 1.0
    full[:, :, 1:, 1:] = patches
    return full


def _talking_heads_alone(read: Sequence[torch.Tensor], maps: bool) -> torch.Tensor:
    """CaiT self-attention of a model without a class token (pruned): the probabilities, heads first."""
    (probabilities,) = read
    return probabilities.detach().permute(0, 3, 1, 2).contiguous()


def _class_row_over_patches(read: Sequence[torch.Tensor], maps: bool) -> torch.Tensor:
    """CaiT class attention: the class token's probabilities over [class, patches], [B, H, 1, 1 + n], as row 0 of
    [B, H, 1 + n, 1 + n]. The patch tokens pass through the block unchanged: each is its own row (identity; 0 in a
    gradient)."""
    (row,) = read
    row = row.detach()
    batch, heads, _, num_tokens = row.shape
    full = row.new_zeros(batch, heads, num_tokens, num_tokens)
    if maps:
        full.diagonal(dim1=-2, dim2=-1)[..., 1:].fill_(1.0)
    full[:, :, :1] = row
    return full


def _talking_heads_hooks(session: CaptureSession, layer_index: int, site: AttentionSite) -> Handles:
    """A forward pre-hook of proj_w (``drop``): its input is the softmax, heads last."""

    def hook(module: nn.Module, args: Any, *_rest: Any) -> None:
        if threading.get_ident() == session.owner:
            session.deliver(layer_index, args[0])
        return None

    return [site.drop.register_forward_pre_hook(hook)]


def _layers(model: nn.Module) -> Sequence[nn.Module] | None:
    if not isinstance(model, Cait):
        return None
    # its class-attention blocks follow model.blocks: layers depth, depth + 1, ...
    return [*transformer_blocks(model), *(model.blocks_token_only or ())]


def _site(block: nn.Module, model: nn.Module) -> AttentionSite | None:
    attn = getattr(block, "attn", None)
    forward = type(attn).forward if attn is not None else None
    if type(block).forward is LayerScaleBlock.forward and forward is TalkingHeadAttn.forward:
        has_class = getattr(model, "cls_token", None) is not None
        assemble = _talking_heads_with_class if has_class else _talking_heads_alone
        return AttentionSite(attn, attn, False, attn.proj, attn.proj_w, install=_talking_heads_hooks, assemble=assemble)
    if type(block).forward is LayerScaleBlockClassAttn.forward and forward is ClassAttn.forward:
        return AttentionSite(
            attn, attn.v, False, attn.proj, attn.attn_drop, assemble=_class_row_over_patches, class_queries_only=True
        )
    return None


READER = Reader("CaiT (talking heads, class attention)", _site, layers=_layers)
