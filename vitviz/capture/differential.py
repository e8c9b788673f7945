"""Differential attention (timm's DiffAttention and DiffParallelScalingBlock), read by a mode of its own.

Head h has two softmax maps, S1 from query/key heads 2h and S2 from 2h + 1, one value v, and its output is
(S1 - lambda S2) @ v, with one lambda per module. The capture hands over M = S1 - lambda S2 [B, H, N, N], the
map that multiplies v (docs/design.md, "Attention in every timm family"). The mode spans the two attention calls
to ``sub_norm``, from ``k_norm`` (fused path) or ``attn_drop`` (non-fused path, after timm's softmax).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.diff_attention import DiffAttention
from timm.models.vision_transformer import DiffParallelScalingBlock
from torch import nn

from vitviz.capture.core import AttentionSite, CaptureSession, Handles, Reader
from vitviz.capture.explicit import MATMUL, ExplicitAttention, explicit_probabilities, sdpa_arguments

_MULTIPLY = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)
_SUBTRACT = (torch.sub, torch.Tensor.sub, torch.Tensor.__sub__)


class DifferentialAttention(ExplicitAttention):
    """Hands over M = S1 - lambda S2 [B, H, N, N] of one differential attention forward.

    Fused path (entered after k_norm): the two attention calls are computed explicitly and answer stand-ins;
    the forward's ``lambda_full * attn2`` gives lambda (the very scalar the forward uses) and its
    ``attn1 - ...`` answers M @ v, as timm's non-fused path computes it. Non-fused path (entered after
    attn_drop, where timm's softmax is done): the first product in the span is timm's own M @ v; M is read there.
    """

    def __init__(self, deliver: Callable[[torch.Tensor], None], fused: bool) -> None:
        super().__init__(deliver)
        self.fused = fused
        self._reset()

    def _reset(self) -> None:
        self._calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (S, v, stand-in) per call
        self._weighted: tuple[torch.Tensor, torch.Tensor] | None = None  # (lambda, stand-in for lambda * attn2)
        self._done = False

    def __enter__(self) -> DifferentialAttention:
        self._reset()
        return super().__enter__()

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self._done:
            return func(*args, **kwargs)
        if not self.fused:
            if func in MATMUL:
                self._done = True
                self.deliver(args[0])
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            if len(self._calls) == 2:
                raise RuntimeError("differential attention made more than two attention calls")
            named = sdpa_arguments(args, kwargs)
            probabilities = explicit_probabilities(**named)
            value = named["value"]
            stand_in = value.new_zeros(()).expand(*probabilities.shape[:-1], value.shape[-1])
            self._calls.append((probabilities, value, stand_in))
            return stand_in
        if len(self._calls) == 2 and self._weighted is None and func in _MULTIPLY and len(args) == 2:
            second = self._calls[1][2]
            if args[0] is second or args[1] is second:
                weight = args[1] if args[0] is second else args[0]
                self._weighted = (weight, second.view(second.shape))  # a new object to recognise
                return self._weighted[1]
        weighted = self._weighted
        if weighted is not None and func in _SUBTRACT and len(args) == 2 and args[1] is weighted[1]:
            if args[0] is not self._calls[0][2]:
                raise RuntimeError("differential attention subtracted something else than its first map")
            (first, value, _), (second, _, _) = self._calls
            self._reset()
            self._done = True
            # timm's expression S1 - lambda S2; without autograd in place (the same values, no third tensor)
            grad = torch.is_grad_enabled()
            attn = first - weighted[0] * second if grad else first.sub_(second.mul_(weighted[0]))
            self.deliver(attn)
            return attn @ value
        return func(*args, **kwargs)


def _differential_hooks(session: CaptureSession, layer_index: int, site: AttentionSite) -> Handles:
    fused = bool(site.owner.fused_attn)
    mode = DifferentialAttention(functools.partial(session.deliver, layer_index), fused)
    return session.span_hooks(site, mode, fused)


def _parallel_site(block: nn.Module, model: nn.Module) -> AttentionSite | None:
    """Differential attention in a parallel block: S1 - lambda S2 is applied to v before sub_norm."""
    if type(block).forward is not DiffParallelScalingBlock.forward:
        return None
    return AttentionSite(block, block.k_norm, False, block.sub_norm, block.attn_drop, install=_differential_hooks)


def _attention_site(block: nn.Module, model: nn.Module) -> AttentionSite | None:
    attn = getattr(block, "attn", None)
    if attn is None or type(attn).forward is not DiffAttention.forward:
        return None
    return AttentionSite(attn, attn.k_norm, False, attn.sub_norm, attn.attn_drop, install=_differential_hooks)


PARALLEL = Reader("DiffParallelScalingBlock (differential attention, parallel block)", _parallel_site)
ATTENTION = Reader("DiffAttention (differential attention)", _attention_site)
