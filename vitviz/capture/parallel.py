"""timm's parallel blocks (vision_transformer.py).

ParallelScalingBlock fuses the qkv and MLP input projections; its attention output goes through a reshape to the
MLP activation, so the fused-SDPA interception spans ``k_norm`` to ``mlp_act``. ParallelThingsBlock computes
x + sum_k branch_k(x) with branch_k = ls(attn(norm(x))): each branch's attention is read as a standard site
and the layer's map is the K branches' maps side by side along the head axis, [B, K*H, N, N].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock
from torch import nn

from vitviz.capture.core import AttentionSite, CaptureSession, Handles, Reader, plain_hooks
from vitviz.capture.standard import KNORM_TO_PROJ, plain_site


def _scaling_site(block: nn.Module, model: nn.Module) -> AttentionSite | None:
    if type(block).forward is not ParallelScalingBlock.forward:
        return None
    return AttentionSite(block, block.k_norm, False, block.mlp_act, block.attn_drop)


def _branches_side_by_side(read: Sequence[torch.Tensor], maps: bool) -> torch.Tensor:
    """ParallelThingsBlock: the K branches' maps [B, H, N, N], in branch order, side by side along the head axis,
    [B, K*H, N, N]: head k*H + h is branch k's head h."""
    return torch.cat(list(read), dim=1)


def _branch_hooks(session: CaptureSession, layer_index: int, site: AttentionSite) -> Handles:
    """Each branch read as a plain site; the session assembles the layer once all K are read."""
    return [handle for part in site.parts for handle in plain_hooks(session, layer_index, part)]


def _things_site(block: nn.Module, model: nn.Module) -> AttentionSite | None:
    if type(block).forward is not ParallelThingsBlock.forward:
        return None
    parts = []
    for branch in block.attns:
        attn = getattr(branch, "attn", None)
        if attn is None or type(attn).forward not in KNORM_TO_PROJ:
            return None
        parts.append(plain_site(attn))
    return AttentionSite(
        block, block, False, block, block, install=_branch_hooks, parts=tuple(parts), assemble=_branches_side_by_side
    )


THINGS = Reader("ParallelThingsBlock (parallel attention branches)", _things_site)
SCALING = Reader("ParallelScalingBlock (fused qkv and MLP projection)", _scaling_site)
