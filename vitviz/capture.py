"""Attention capture: the one way vitviz reads post-softmax attention out of a timm ViT.

The model keeps its fused attention: nothing on it is flipped or replaced. While an attention module runs in
the capturing thread, from its ``k_norm`` to its output projection ``proj`` (rope, when the block has it, is
applied in between; BEiT's attention has no ``k_norm``, so there the span is its whole forward up to ``proj``;
timm's ParallelScalingBlock spans ``k_norm`` to its MLP activation), a torch function mode (modes are
per thread) catches its call to ``scaled_dot_product_attention`` and computes it explicitly, once, as timm's
non-fused path does (scale, q @ k^T, attention mask or relative-position bias, softmax, @ v): the
probabilities [B, H, N, N] are handed over and the module continues with the same output. So the attention is
computed once, not fused and then again for capture. A module whose ``fused_attn`` is off is read where timm's
non-fused path passes its probabilities, through ``attn_drop``. A wrapped Hugging Face model
(``vitviz.models.hf``, eager attention) is read from what each attention module returns, (output, probabilities).
Differential attention hands over S1 - lambda S2, the map that multiplies v, and SAM's windowed attention its
windows placed on the real token grid (docs/design.md, "Attention in every timm family"). A ParallelThingsBlock's
branches are each read as above and handed over side by side along the head axis, [B, K*H, N, N]. CaiT has no
attention call in its self-attention blocks: their softmax before the heads are mixed is read where proj_w takes
it (timm's own tensor); its class-attention blocks are read as any attention call. Every CaiT layer is handed over
as a map over [class, patches]: the class token its own row while it is not in the sequence, the patches their
own rows in the class-attention layers (which come after model.blocks: L = depth + depth_token_only).

Each layer's attention is handed to the consumers as soon as it exists and then dropped, so the extra memory
is about one layer's attention whatever the depth. A consumer is any object with
``consume(layer_index, attn) -> None`` and ``result()``; layers arrive in order, 0 to L-1, once per forward.
Consumers may be fed several forwards in a row (batches of one image set); each documents how it combines them.

Public API:
    capture_attention(model, images, consumers, *, with_logits=True) -> logits [B, classes] or None
    attention_maps(model, images) -> list of L tensors [B, H, N, N]
    attention_gradients(model, images, target_class=None) -> AttentionGradients(logits, target_class,
        attentions, gradients), gradients = d logit_c / d attn per layer
    attention_modules(model) -> the attention module of every block, checked to be capturable (a module vitviz
        cannot read exactly is refused with one line naming the model and the attention class)
    unreadable_reason(model) -> None, or that line: lets a caller mark the attention analyses not applicable
    class_attention_layers(model) -> the layers in which only the class token queries (CaiT's class attention)
    KeepAllAttention, QueryAttention: consumers (analysis/ holds the rollout and distance accumulators)

Sharing one model: the app serves several sessions from one cached model in several threads. Hooks are
registered and removed under a lock (torch's hook bookkeeping is not thread-safe), act only on forwards of
the thread that installed them, and are removed on every exit path. The model's parameters, their
``requires_grad``, its buffers and its train/eval mode are never changed. The model must be in eval mode:
in training mode dropout makes attention random and BatchNorm in hybrid stems would update its statistics.

Gradients: ``attention_gradients`` enables autograd locally (also under a caller's ``torch.no_grad`` or
``torch.inference_mode``). The explicit attention above is differentiable, so every layer's probabilities
sit in the autograd graph and feed the rest of the forward; the gradients come from ``torch.autograd.grad``
with respect to those tensors only, so no ``.grad`` of any parameter is touched.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention, AttentionRope, maybe_add_mask, resolve_self_attn_mask
from timm.layers.diff_attention import DiffAttention
from timm.models.beit import Attention as BeitAttention
from timm.models.cait import Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn
from timm.models.eva import EvaAttention
from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock, ParallelThingsBlock
from timm.models.vision_transformer_relpos import RelPosAttention
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.vision_transformer_sam import Block as SamBlock
from torch import nn
from torch.overrides import TorchFunctionMode

from vitviz.errors import VitvizError

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionConsumer",
    "AttentionGradients",
    "KeepAllAttention",
    "QueryAttention",
    "attention_gradients",
    "attention_maps",
    "attention_modules",
    "capture_attention",
    "class_attention_layers",
    "unreadable_reason",
]

# Attention forwards that pass q, k, v (rope already applied), the mask or bias and nothing else to one
# scaled_dot_product_attention call (or their probabilities through attn_drop), so _explicit_attention reproduces
# them exactly. Subclasses that keep the forward are fine; any other forward is refused with one line.
_KNORM_TO_PROJ = (Attention.forward, RelPosAttention.forward, EvaAttention.forward, AttentionRope.forward)


@dataclass(frozen=True)
class _AttentionSite:
    """Where one block's attention call is read: the mode is entered after ``enter`` runs (before it, when
    ``enter_before``) and left before ``exit`` runs; with ``owner.fused_attn`` off the probabilities are read
    at ``drop`` (timm's attn_drop)."""

    owner: nn.Module  # the module holding fused_attn: the attention module, or a parallel block
    enter: nn.Module
    enter_before: bool
    exit: nn.Module
    drop: nn.Module
    returns_probabilities: bool = False  # owner returns (output, probabilities): read them there (Hugging Face)
    # "differential" or "windowed": read by a mode of its own (_DifferentialAttention, _WindowedAttention) from
    # ``enter`` (fused path) or ``drop`` (non-fused path) to ``exit``; ``block`` is SAM's block (its input grid)
    reader: str | None = None
    block: nn.Module | None = None
    # Layers read as several tensors, or as one that is not yet the map over the whole sequence (parallel branches,
    # CaiT): ``assemble(read, maps)`` makes the layer's map from what was read (maps=True) and, from the gradients
    # of those tensors, the map's gradient (maps=False: zero where the map is fixed, such as identity rows).
    parts: tuple[_AttentionSite, ...] = ()  # the branches' own plain sites, read in order (ParallelThingsBlock)
    heads_last: bool = False  # the probabilities are ``drop``'s input [B, N, N, H] (CaiT's talking heads: proj_w)
    assemble: Callable[[Sequence[torch.Tensor], bool], torch.Tensor] | None = None
    class_queries_only: bool = False  # only the class token queries (CaiT's class attention)


def _site(block: nn.Module) -> _AttentionSite | None:
    """The attention site of one block, or None when vitviz cannot read its attention exactly."""
    if type(block).forward is ParallelThingsBlock.forward:
        return _parallel_branches_site(block)
    if type(block).forward is ParallelScalingBlock.forward:
        # Fused qkv + MLP input projection; the attention output goes through a reshape to the MLP activation.
        return _AttentionSite(block, block.k_norm, False, block.mlp_act, block.attn_drop)
    if type(block).forward is DiffParallelScalingBlock.forward:
        # Differential attention in a parallel block: S1 - lambda S2 is applied to v before sub_norm.
        return _AttentionSite(block, block.k_norm, False, block.sub_norm, block.attn_drop, reader="differential")
    attn = getattr(block, "attn", None)
    if attn is None:
        return None
    forward = type(attn).forward
    if forward in _KNORM_TO_PROJ:
        # q, k, v exist after k_norm (rope, when present, is applied after it and before the call).
        return _AttentionSite(attn, attn.k_norm, False, attn.proj, attn.attn_drop)
    if forward is BeitAttention.forward:
        # No k_norm, and the qkv projection may run as F.linear: the mode spans the whole forward up to proj;
        # the relative-position bias (own table plus the shared one) reaches the call as its float mask.
        return _AttentionSite(attn, attn, True, attn.proj, attn.attn_drop)
    if forward is DiffAttention.forward:
        return _AttentionSite(attn, attn.k_norm, False, attn.sub_norm, attn.attn_drop, reader="differential")
    if forward is SamAttention.forward and type(block).forward is SamBlock.forward:
        # Windowed (or global) attention over SAM's [B, H, W, C] grid; the block holds the window size.
        return _AttentionSite(attn, attn.k_norm, False, attn.proj, attn.attn_drop, reader="windowed", block=block)
    return None


def _branches_side_by_side(read: Sequence[torch.Tensor], maps: bool) -> torch.Tensor:
    """ParallelThingsBlock: the K branches' maps [B, H, N, N], in branch order, side by side along the head axis,
    [B, K*H, N, N]: head k*H + h is branch k's head h."""
    return torch.cat(list(read), dim=1)


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


def _parallel_branches_site(block: nn.Module) -> _AttentionSite | None:
    """timm's ParallelThingsBlock, x + sum_k branch_k(x) with branch_k = ls(attn(norm(x))): each branch's attention
    is read as a plain site, the layer's map is the branches' maps side by side along the head axis."""
    parts = []
    for branch in block.attns:
        attn = getattr(branch, "attn", None)
        if attn is None or type(attn).forward not in _KNORM_TO_PROJ:
            return None
        parts.append(_AttentionSite(attn, attn.k_norm, False, attn.proj, attn.attn_drop))
    return _AttentionSite(block, block, False, block, block, parts=tuple(parts), assemble=_branches_side_by_side)


def _cait_site(block: nn.Module, model: nn.Module) -> _AttentionSite | None:
    """A block of timm's CaiT (cait.py), or None. Self-attention blocks (model.blocks) run on the patches with
    talking heads: softmax(mix_l(q k^T s)), then mix_w, then @ v; their map is the softmax, read as proj_w's input.
    Class-attention blocks (model.blocks_token_only) take [class, patches] and only the class token queries; they
    call scaled_dot_product_attention after the v projection (no k_norm), read as any attention call."""
    attn = getattr(block, "attn", None)
    forward = type(attn).forward if attn is not None else None
    if type(block).forward is LayerScaleBlock.forward and forward is TalkingHeadAttn.forward:
        has_class = getattr(model, "cls_token", None) is not None
        assemble = _talking_heads_with_class if has_class else _talking_heads_alone
        return _AttentionSite(attn, attn, False, attn.proj, attn.proj_w, heads_last=True, assemble=assemble)
    if type(block).forward is LayerScaleBlockClassAttn.forward and forward is ClassAttn.forward:
        return _AttentionSite(
            attn, attn.v, False, attn.proj, attn.attn_drop, assemble=_class_row_over_patches, class_queries_only=True
        )
    return None


# Attention classes known not to be read yet, with why (the one-line refusal says it).
_NOT_READ_YET = {
    "vision_transformer.ParallelThingsBlock": "its parallel attention branches are of a kind vitviz does not read",
}


def _class_name(module: nn.Module) -> str:
    """The class with its timm module (several timm models name their attention class just Attention)."""
    cls = type(module)
    return f"{cls.__module__.removeprefix('timm.models.').removeprefix('timm.layers.')}.{cls.__qualname__}"


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{architecture} ({type(model).__name__})" if architecture else type(model).__name__


def _attention_sites(model: nn.Module) -> list[_AttentionSite]:
    """Every block's attention site, in order; one line naming the model and the attention class otherwise."""
    returning = getattr(model, "attention_probability_modules", None)
    if callable(returning):
        # A wrapped Hugging Face model (vitviz.models.hf): each attention module runs transformers' eager path
        # and returns (output, probabilities), where transformers' own output_attentions reads them.
        return [_AttentionSite(m, m, False, m, m, returns_probabilities=True) for m in returning()]
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module) or len(blocks) == 0:
        raise VitvizError(
            f"{_model_name(model)} has no transformer blocks (model.blocks); "
            "vitviz reads attention from timm VisionTransformer-family models"
        )
    sites = []
    cait = isinstance(model, Cait)  # its class-attention blocks follow model.blocks: layers depth, depth + 1, ...
    every_block = [*blocks, *(model.blocks_token_only or ())] if cait else blocks
    for index, block in enumerate(every_block):
        site = _cait_site(block, model) if cait else _site(block)
        if site is None:
            attn = getattr(block, "attn", None)
            if attn is None:
                kind = f"no attention module (a {_class_name(block)} block)"
            else:
                kind = f"attention class {_class_name(attn)}"
            owner = block if attn is None else attn
            why = _NOT_READ_YET.get(_class_name(owner), "vitviz does not read it exactly")
            raise VitvizError(f"cannot read the attention of {_model_name(model)}: block {index} has {kind}; {why}")
        sites.append(site)
    return sites


def unreadable_reason(model: nn.Module) -> str | None:
    """None when capture can read every block of the model exactly; otherwise the one-line reason it refuses,
    so a caller can mark the attention analyses not applicable and run the others."""
    try:
        _attention_sites(model)
    except VitvizError as error:
        return str(error)
    return None


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every transformer block (the block itself for parallel blocks), in order;
    refuses models it cannot capture exactly with a one-line VitvizError."""
    return [site.owner for site in _attention_sites(model)]


def class_attention_layers(model: nn.Module) -> tuple[int, ...]:
    """The layers in which only the class token queries (CaiT's class-attention blocks, whose patch rows are the
    identity); refuses models it cannot capture exactly with a one-line VitvizError."""
    return tuple(index for index, site in enumerate(_attention_sites(model)) if site.class_queries_only)


# torch's RemovableHandle ids and hook dictionaries are updated without a lock; serialise our own updates.
HOOK_LOCK = threading.Lock()


class AttentionConsumer(Protocol):
    """Receives each layer's attention [B, H, N, N] as it is produced; must not keep it unless it means to."""

    def consume(self, layer_index: int, attn: torch.Tensor) -> None: ...

    def result(self) -> Any: ...


@dataclass(frozen=True)
class AttentionGradients:
    """Attention of every layer and the gradient of one class logit with respect to it."""

    logits: torch.Tensor  # [B, num_classes]
    target_class: torch.Tensor  # [B] long, the class whose logit was differentiated
    attentions: list[torch.Tensor]  # L x [B, H, N, N]
    gradients: list[torch.Tensor]  # L x [B, H, N, N], d logit_c / d attn


class KeepAllAttention:
    """Keeps every layer's attention; for small models and tests. Several forwards concatenate over images."""

    def __init__(self) -> None:
        self._layers: dict[int, list[torch.Tensor]] = {}

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        self._layers.setdefault(layer_index, []).append(attn)

    def result(self) -> list[torch.Tensor]:
        """L tensors [B, H, N, N], layer order."""
        return [torch.cat(self._layers[layer], dim=0) for layer in sorted(self._layers)]


class QueryAttention:
    """Keeps one query token's attention row in every layer and head: attn[:, :, query_index, :].

    Several forwards concatenate over images.
    """

    def __init__(self, query_index: int) -> None:
        self.query_index = query_index
        self._layers: dict[int, list[torch.Tensor]] = {}

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        num_tokens = attn.shape[-1]
        if not -num_tokens <= self.query_index < num_tokens:
            raise VitvizError(f"query token {self.query_index} does not exist: the model has {num_tokens} tokens")
        # clone so the row does not keep the whole [B, H, N, N] storage alive
        self._layers.setdefault(layer_index, []).append(attn[:, :, self.query_index, :].clone())

    def result(self) -> torch.Tensor:
        """[L, B, H, N]: the query's attention over all tokens, prefix tokens first."""
        return torch.stack([torch.cat(self._layers[layer], dim=0) for layer in sorted(self._layers)])


def _explicit_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scaled_dot_product_attention`` as timm's non-fused path computes it: (probabilities, output)."""
    attn = _explicit_probabilities(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return attn, attn @ value  # (B, H, N, N), (B, H, N, hd)


def _explicit_probabilities(
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
        scores = maybe_add_mask(scores, resolve_self_attn_mask(scores.shape[-1], scores, attn_mask, is_causal))
    if differentiable or scores.requires_grad:
        attn = scores.softmax(dim=-1)  # autograd needs the scores and the probabilities as separate tensors
    else:
        # In place: no second [B, H, N, N] tensor per layer. Measured inside the analysed forward (see
        # docs/benchmarks.md), it is as fast as a softmax into a new tensor when freed memory is kept for
        # reuse and faster when the allocator hands the new tensor out as fresh pages.
        attn = torch.softmax(scores, dim=-1, out=scores)
    return attn


class _ExplicitAttention(TorchFunctionMode):
    """Active in the capturing thread during one attention forward: computes the fused attention call
    explicitly, once, and hands its probabilities over (torch function modes are per thread)."""

    def __init__(self, deliver: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.deliver = deliver

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        attn, output = _explicit_attention(*args, **kwargs)
        self.deliver(attn)
        return output


_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
_MULTIPLY = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)
_SUBTRACT = (torch.sub, torch.Tensor.sub, torch.Tensor.__sub__)


def _sdpa_arguments(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of one ``scaled_dot_product_attention`` call by name."""
    return {**dict(zip(_SDPA_ARGUMENTS, args)), **kwargs}


class _DifferentialAttention(_ExplicitAttention):
    """Differential attention (timm's DiffAttention and DiffParallelScalingBlock): head h has two softmax maps,
    S1 from query/key heads 2h and S2 from 2h + 1, one value v, and its output is (S1 - lambda S2) @ v, with one
    lambda per module. Hands over M = S1 - lambda S2 [B, H, N, N], the map that multiplies v.

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

    def __enter__(self) -> _DifferentialAttention:
        self._reset()
        return super().__enter__()

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self._done:
            return func(*args, **kwargs)
        if not self.fused:
            if func in _MATMUL:
                self._done = True
                self.deliver(args[0])
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            if len(self._calls) == 2:
                raise RuntimeError("differential attention made more than two attention calls")
            named = _sdpa_arguments(args, kwargs)
            probabilities = _explicit_probabilities(**named)
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


@functools.lru_cache(maxsize=8)
def _window_pairs(
    height: int, width: int, window: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM's windows over an H x W grid (padded at the bottom and right to whole windows, windows in row-major
    order, tokens row-major inside each, as timm's window_partition does): (src, dst, real) where src indexes the
    (query, key) pairs of real tokens in the flat windows' maps [num_windows * n * n], dst the same pairs in the
    flat grid map [N * N] (N = H * W), and real is the bool mask of src over the windows' maps."""
    padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
    ys = torch.arange(padded_h)[:, None]
    xs = torch.arange(padded_w)[None, :]
    position = torch.where((ys < height) & (xs < width), ys * width + xs, -1)  # grid index, -1 on padding
    tokens = window * window
    windows = position.view(padded_h // window, window, padded_w // window, window).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, tokens)  # (num_windows, n)
    queries, keys = windows[:, :, None].expand(-1, -1, tokens), windows[:, None, :].expand(-1, tokens, -1)
    real = ((queries >= 0) & (keys >= 0)).reshape(-1)
    src = torch.nonzero(real).squeeze(1)
    dst = (queries * (height * width) + keys).reshape(-1)[real]
    return src.to(device), dst.to(device), real.to(device)


class _WindowedAttention(_ExplicitAttention):
    """SAM's attention (timm's vision_transformer_sam): a block attends within windows of w x w tokens of its
    [B, H, W, C] grid, padded with zero tokens to whole windows (or, with window size 0, over the whole grid),
    with the decomposed relative-position bias added to the logits. Hands over the map over the real grid,
    [B, heads, N, N] with N = H * W: a global block's probabilities as they are; a windowed block's windows
    placed at their tokens' grid positions, zero between windows, pad keys left out (so a query row of a window
    that holds padding sums to 1 minus what it gives the pad tokens).

    Fused path (entered after k_norm): the attention call is computed explicitly. Non-fused path (entered after
    attn_drop): the first product in the span is timm's own probabilities @ v. Either way the output is the
    windows' probabilities @ v as timm's non-fused path computes it; under autograd the windows are read back
    from the grid map (pad keys from the probabilities), so the grid map's gradient is the model's.
    """

    def __init__(self, deliver: Callable[[torch.Tensor], None], heads: int, window: int, fused: bool) -> None:
        super().__init__(deliver)
        self.heads = heads
        self.window = window
        self.fused = fused
        self.grid: tuple[int, int, int] | None = None  # (B, H, W) of the block's input, set by its pre-hook
        self._done = False

    def __enter__(self) -> _WindowedAttention:
        self._done = False
        return super().__enter__()

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self._done:
            return func(*args, **kwargs)
        if self.fused and func is F.scaled_dot_product_attention:
            named = _sdpa_arguments(args, kwargs)  # q, k, v [B' * heads, n, d]; the bias [B' * heads, n, n]
            query, key, value = named.pop("query"), named.pop("key"), named.pop("value")
            tokens = query.shape[-2]
            if named.get("attn_mask") is not None:
                named["attn_mask"] = named["attn_mask"].reshape(-1, self.heads, tokens, tokens)
            probabilities = _explicit_probabilities(
                query.reshape(-1, self.heads, tokens, query.shape[-1]),
                key.reshape(-1, self.heads, tokens, key.shape[-1]),
                **named,
            )
            return self._read(probabilities, value)
        if not self.fused and func in _MATMUL:
            probabilities, value = args[0], args[1]
            tokens = probabilities.shape[-1]
            return self._read(probabilities.reshape(-1, self.heads, tokens, tokens), value)
        return func(*args, **kwargs)

    def _read(self, probabilities: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Deliver the grid map of the windows' probabilities [B', heads, n, n]; return them @ v."""
        self._done = True
        if self.grid is None:
            raise RuntimeError("SAM block input grid not recorded")
        batch, height, width = self.grid
        tokens = probabilities.shape[-1]
        if self.window == 0:
            self.deliver(probabilities)  # the whole grid: [B, heads, N, N]
        else:
            src, dst, real = _window_pairs(height, width, self.window, probabilities.device)
            num_windows = probabilities.shape[0] // batch
            flat = tokens * tokens
            windows = probabilities.reshape(batch, num_windows, self.heads, flat).transpose(1, 2)
            windows = windows.reshape(batch, self.heads, num_windows * flat)
            pairs = windows.index_select(-1, src)
            num_tokens = height * width
            grid_map = probabilities.new_zeros(batch, self.heads, num_tokens * num_tokens)
            if not torch.is_grad_enabled():
                grid_map.index_copy_(-1, dst, pairs)
                self.deliver(grid_map.view(batch, self.heads, num_tokens, num_tokens))
            else:
                square = grid_map.index_copy(-1, dst, pairs).view(batch, self.heads, num_tokens, num_tokens)
                self.deliver(square)
                # The windows again, real pairs read from the delivered map: the same values, and the output
                # depends on that map, so autograd gives its gradient (zero between windows).
                again = square.reshape(batch, self.heads, num_tokens * num_tokens).index_select(-1, dst)
                windows = windows.masked_fill(real, 0.0).index_copy(-1, src, again)
                probabilities = windows.view(batch, self.heads, num_windows, tokens, tokens).transpose(1, 2)
                probabilities = probabilities.reshape(batch * num_windows, self.heads, tokens, tokens)
        output = probabilities @ value.reshape(-1, self.heads, tokens, value.shape[-1])
        return output.reshape(*value.shape[:-1], value.shape[-1])


class _CaptureSession:
    """Hooks for one capture: they act only in the thread that created the session."""

    def __init__(
        self,
        sites: Sequence[_AttentionSite],
        on_attention: Callable[[int, torch.Tensor], None],
        keep_read: bool = False,
    ) -> None:
        self.sites = list(sites)
        self.on_attention = on_attention
        self.pending: dict[int, list[torch.Tensor]] = {}  # a layer's tensors read so far (assembled sites)
        self.read: list[list[torch.Tensor]] | None = [] if keep_read else None  # per layer, the tensors read
        self.owner = threading.get_ident()
        self.active_modes: list[_ExplicitAttention] = []
        self.layers_seen: list[int] = []

    def _deliver(self, layer_index: int, attn: torch.Tensor) -> None:
        site = self.sites[layer_index]
        if site.assemble is None:
            read = [attn]
        else:  # the layer's map is made from its tensors once all have been read
            read = self.pending.setdefault(layer_index, [])
            read.append(attn)
            if len(read) < max(1, len(site.parts)):
                return
            del self.pending[layer_index]
            attn = site.assemble(read, True)
        if self.read is not None:
            self.read.append(read)
        self.layers_seen.append(layer_index)
        self.on_attention(layer_index, attn)

    def _input_hook(self, layer_index: int) -> Callable[..., None]:
        # A forward pre-hook of the module that takes the probabilities (CaiT's proj_w, heads last).
        def hook(module: nn.Module, args: Any, *_rest: Any) -> None:
            if threading.get_ident() == self.owner:
                self._deliver(layer_index, args[0])
            return None

        return hook

    def _assembled_hooks(self, layer_index: int, site: _AttentionSite) -> list[torch.utils.hooks.RemovableHandle]:
        """CaiT's talking heads (read at proj_w's input) and parallel branches (each read as a plain site)."""
        if site.heads_last:
            return [site.drop.register_forward_pre_hook(self._input_hook(layer_index))]
        handles = []
        for part in site.parts:
            if not part.owner.fused_attn:
                handles.append(part.drop.register_forward_hook(self._unfused_hook(layer_index)))
                continue
            handles.append(part.enter.register_forward_hook(self._enter_hook(layer_index)))
            handles.append(part.exit.register_forward_pre_hook(self._exit_hook))
        return handles

    def _enter_hook(self, layer_index: int) -> Callable[..., None]:
        # A forward hook of the attention's k_norm: q, k and v exist and the attention call comes next.
        # Variadic: hooks of other threads' sessions may be called with either hook signature while
        # a registration or removal is half-way through in another thread.
        mode = _ExplicitAttention(functools.partial(self._deliver, layer_index))  # entered once per forward

        def hook(module: nn.Module, *_rest: Any) -> None:
            if threading.get_ident() != self.owner:
                return None
            mode.__enter__()
            self.active_modes.append(mode)
            return None

        return hook

    def _exit_hook(self, module: nn.Module, *_rest: Any) -> None:
        # A forward pre-hook of the attention's proj.
        if threading.get_ident() == self.owner and self.active_modes:
            self.active_modes.pop().__exit__(None, None, None)

    def _unfused_hook(self, layer_index: int) -> Callable[..., None]:
        # timm's non-fused path (fused_attn off) passes the probabilities through attn_drop: read them there.
        def hook(module: nn.Module, args: Any, *rest: Any) -> None:
            if threading.get_ident() == self.owner:
                self._deliver(layer_index, rest[-1])
            return None

        return hook

    def _returned_hook(self, layer_index: int) -> Callable[..., None]:
        # Hugging Face eager attention returns (output, probabilities); the probabilities are the very tensor
        # its output was computed from, so they also carry the gradient for gradient rollout.
        def hook(module: nn.Module, args: Any, *rest: Any) -> None:
            if threading.get_ident() != self.owner:
                return None
            output = rest[-1]
            probabilities = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(probabilities, torch.Tensor):
                raise RuntimeError(f"{type(module).__name__} returned no attention probabilities (not eager?)")
            self._deliver(layer_index, probabilities)
            return None

        return hook

    def _reader_hooks(self, layer_index: int, site: _AttentionSite) -> list[torch.utils.hooks.RemovableHandle]:
        """Differential and windowed attention: their own mode spans the attention call(s) to the product with v,
        from k_norm's output (fused path) or attn_drop's (non-fused path, after timm's softmax) to ``exit``."""
        fused = bool(site.owner.fused_attn)
        deliver = functools.partial(self._deliver, layer_index)
        handles = []
        mode: _ExplicitAttention
        if site.reader == "differential":
            mode = _DifferentialAttention(deliver, fused)
        else:
            assert site.block is not None
            windowed = _WindowedAttention(deliver, site.owner.num_heads, int(site.block.window_size), fused)

            def grid_hook(module: nn.Module, args: Any, *_rest: Any) -> None:
                if threading.get_ident() == self.owner:
                    windowed.grid = tuple(args[0].shape[:3])  # the block's input [B, H, W, C]
                return None

            handles.append(site.block.register_forward_pre_hook(grid_hook))
            mode = windowed

        def enter(module: nn.Module, *_rest: Any) -> None:
            if threading.get_ident() == self.owner:
                mode.__enter__()
                self.active_modes.append(mode)
            return None

        handles.append((site.enter if fused else site.drop).register_forward_hook(enter))
        handles.append(site.exit.register_forward_pre_hook(self._exit_hook))
        return handles

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Install the hooks for the duration of the block; they are removed however it exits."""
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            with HOOK_LOCK:
                for layer_index, site in enumerate(self.sites):
                    if site.returns_probabilities:
                        handles.append(site.owner.register_forward_hook(self._returned_hook(layer_index)))
                        continue
                    if site.parts or site.heads_last:
                        handles.extend(self._assembled_hooks(layer_index, site))
                        continue
                    if site.reader is not None:
                        handles.extend(self._reader_hooks(layer_index, site))
                        continue
                    if not site.owner.fused_attn:
                        handles.append(site.drop.register_forward_hook(self._unfused_hook(layer_index)))
                        continue
                    # The mode spans k_norm's output to proj's input: the attention call and the few reshapes
                    # around it. Spanning the whole module would also route qkv and proj through it, which costs
                    # about 2% of a ViT-S/16 forward at batch 1 (measured) for nothing. Both forwards call
                    # proj after the attention; if the forward raises in between, the mode is left below.
                    enter = self._enter_hook(layer_index)
                    if site.enter_before:
                        handles.append(site.enter.register_forward_pre_hook(enter))
                    else:
                        handles.append(site.enter.register_forward_hook(enter))
                    handles.append(site.exit.register_forward_pre_hook(self._exit_hook))
            yield
        finally:
            while self.active_modes:  # a forward that raised inside an attention module
                self.active_modes.pop().__exit__(None, None, None)
            with HOOK_LOCK:
                for handle in handles:
                    handle.remove()

    def check_complete(self) -> None:
        expected = list(range(len(self.sites)))
        if self.layers_seen != expected:
            raise RuntimeError(f"captured layers {self.layers_seen}, expected {expected}")


def _any_training(model: nn.Module) -> bool:
    """Whether any module of the tree is in training mode (model.modules() builds a name for every module, which
    costs a tenth of a millisecond per call on a ViT-S)."""
    stack = [model]
    while stack:
        module = stack.pop()
        if module.training:
            return True
        stack.extend(child for child in module._modules.values() if child is not None)
    return False


def _check_capturable(model: nn.Module) -> list[_AttentionSite]:
    if _any_training(model):
        raise ValueError("attention capture needs model.eval(): training mode makes attention random")
    return _attention_sites(model)


def _as_consumers(consumers: AttentionConsumer | Sequence[AttentionConsumer]) -> list[AttentionConsumer]:
    if hasattr(consumers, "consume"):
        return [consumers]  # type: ignore[list-item]
    return list(consumers)  # type: ignore[arg-type]


def capture_attention(
    model: nn.Module,
    images: torch.Tensor,
    consumers: AttentionConsumer | Sequence[AttentionConsumer],
    *,
    with_logits: bool = True,
) -> torch.Tensor | None:
    """Run one forward without autograd, streaming every layer's attention [B, H, N, N] to the consumers.

    Args:
        model: a timm VisionTransformer-family model in eval mode; it is not changed.
        images: [B, C, H, W] preprocessed images on the model's device.
        consumers: one consumer or several; each gets every layer in order, then the tensor is dropped.
        with_logits: run the classifier head and return its logits; False stops after forward_features.

    Returns:
        The logits [B, num_classes], or None when ``with_logits`` is False.
    """
    sites = _check_capturable(model)
    targets = _as_consumers(consumers)

    def deliver(layer_index: int, attn: torch.Tensor) -> None:
        for consumer in targets:
            consumer.consume(layer_index, attn)

    session = _CaptureSession(sites, deliver)
    with torch.no_grad(), session.installed():
        output = model(images) if with_logits else model.forward_features(images)
    session.check_complete()
    return output if with_logits else None


def attention_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention [B, H, N, N] kept in memory; fine for small models, tests and one image."""
    keep = KeepAllAttention()
    capture_attention(model, images, [keep], with_logits=False)
    return keep.result()


def _map_gradients(
    output: torch.Tensor, sites: Sequence[_AttentionSite], read: Sequence[Sequence[torch.Tensor]]
) -> list[torch.Tensor]:
    """d output / d map for every layer: autograd with respect to the tensors each layer was read as (the ones its
    forward used), assembled as the maps were (zero where a map is fixed); zero for a tensor the output does not
    use (a class attention a model that pools patch tokens never reads)."""
    flat = [tensor for tensors in read for tensor in tensors]
    flat_gradients = torch.autograd.grad(output, flat, allow_unused=True, materialize_grads=True)
    gradients, start = [], 0
    for site, tensors in zip(sites, read):
        layer = flat_gradients[start : start + len(tensors)]
        start += len(tensors)
        gradients.append(layer[0] if site.assemble is None else site.assemble(layer, False))
    return gradients


def attention_gradients(
    model: nn.Module,
    images: torch.Tensor,
    target_class: int | torch.Tensor | None = None,
) -> AttentionGradients:
    """Attention of every layer and d logit_c / d attn, for gradient-weighted rollout.

    Args:
        model: a timm VisionTransformer-family model in eval mode; it is not changed.
        images: [B, C, H, W] preprocessed images.
        target_class: the class c, one for all images or a [B] tensor; None takes each image's predicted class.
    """
    sites = _check_capturable(model)
    if getattr(model, "grad_checkpointing", False):
        raise ValueError("attention gradients need gradient checkpointing off (it re-runs blocks in backward)")
    attentions: list[torch.Tensor] = []
    session = _CaptureSession(sites, lambda _layer, attn: attentions.append(attn), keep_read=True)
    # The input, not the parameters, carries requires_grad, so every attention joins the graph even when
    # the parameters are frozen, and no parameter is touched.
    with torch.inference_mode(False), torch.enable_grad():
        inputs = images.detach().clone().requires_grad_(True)
        with session.installed():
            logits = model(inputs)
        session.check_complete()
        if target_class is None:
            target = logits.argmax(dim=-1)
        else:
            target = torch.as_tensor(target_class, dtype=torch.long, device=logits.device).expand(logits.shape[0])
        num_classes = logits.shape[-1]
        if bool(((target < 0) | (target >= num_classes)).any()):
            raise VitvizError(f"target class {target.tolist()} is out of range: the model has {num_classes} classes")
        chosen = logits.gather(1, target[:, None]).sum()  # images are independent, so one backward serves all
        gradients = _map_gradients(chosen, sites, session.read or [])
    return AttentionGradients(
        logits=logits.detach(),
        target_class=target.detach().clone(),
        attentions=[attn.detach() for attn in attentions],
        gradients=[grad.detach() for grad in gradients],
    )
