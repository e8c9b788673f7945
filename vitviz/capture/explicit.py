"""The attention call computed explicitly: ``scaled_dot_product_attention`` as timm's non-fused path computes it.

``ExplicitAttention`` is the torch function mode every reader enters (modes are per thread) while an attention
module runs in the capturing thread: it answers the module's attention call with the same output, computed from
the probabilities it hands over, so attention is computed once. The readers of families whose attention is more
than one plain call (differential attention, SAM's windows) subclass it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from torch.overrides import TorchFunctionMode

SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


def sdpa_arguments(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of one ``scaled_dot_product_attention`` call by name."""
    return {**dict(zip(SDPA_ARGUMENTS, args)), **kwargs}


def answered_attention(
    deliver: Callable[[torch.Tensor], None], args: Sequence[Any], kwargs: dict[str, Any]
) -> torch.Tensor:
    """One ``scaled_dot_product_attention(*args, **kwargs)`` call computed as timm's non-fused path computes it:
    its probabilities [B, H, N, N] go to ``deliver`` first (a capture that stops the forward after the last layer
    spares that layer's product with v), then the output [B, H, N, hd] is returned."""
    arguments = sdpa_arguments(args, kwargs)
    attn = explicit_probabilities(**arguments)
    deliver(attn)
    return attn @ arguments["value"]


def explicit_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """The probabilities [B, H, N, N] of ``scaled_dot_product_attention`` (same arguments; value is not read)."""
    if dropout_p != 0.0 or enable_gqa:
        raise RuntimeError("attention capture needs dropout off and one key/value head per query head")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    differentiable = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    if differentiable:  # gradient rollout: timm's own expressions, the graph keeps its own tensors
        scores = (query * scale) @ key.transpose(-2, -1)  # (B, H, N, N)
    else:
        # The scale is applied inside the product (alpha) rather than to a scaled copy of q.
        batch, heads, queries, head_dim = query.shape
        keys = key.shape[-2]
        scores = torch.empty(batch, heads, queries, keys, dtype=query.dtype, device=query.device)
        torch.baddbmm(
            scores.view(batch * heads, queries, keys),
            query.reshape(batch * heads, queries, head_dim),
            key.reshape(batch * heads, keys, head_dim).transpose(1, 2),
            beta=0.0,  # the empty tensor's contents are ignored
            alpha=scale,
            out=scores.view(batch * heads, queries, keys),
        )
    if attn_mask is not None or is_causal:
        bias = resolve_self_attn_mask(scores.shape[-1], scores, attn_mask, is_causal)
        in_place = bias.dtype == scores.dtype and torch.broadcast_shapes(scores.shape, bias.shape) == scores.shape
        if differentiable or scores.requires_grad or not in_place:
            scores = maybe_add_mask(scores, bias)  # a bias of another dtype promotes the scores, as timm's sum does
        else:
            scores.add_(bias)  # the scores are this call's own tensor: the bias (BEiT's, relpos) added in place
    if differentiable or scores.requires_grad:
        attn = scores.softmax(dim=-1)  # autograd needs the scores and the probabilities as separate tensors
    else:
        # In place: no second [B, H, N, N] tensor per layer. Measured inside the analysed forward (see
        # docs/benchmarks.md), it is as fast as a softmax into a new tensor when freed memory is kept for
        # reuse and faster when the allocator hands the new tensor out as fresh pages.
        attn = torch.softmax(scores, dim=-1, out=scores)
    return attn


class ExplicitAttention(TorchFunctionMode):
    """Active in the capturing thread during one attention forward: computes the fused attention call
    explicitly, once, and hands its probabilities over (torch function modes are per thread)."""

    def __init__(self, deliver: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.deliver = deliver

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return answered_attention(self.deliver, args, kwargs)
