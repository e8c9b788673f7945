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
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from timm.models.vision_transformer import ParallelScalingBlock
from timm.models.vision_transformer_relpos import RelPosAttention
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


def _site(block: nn.Module) -> _AttentionSite | None:
    """The attention site of one block, or None when vitviz cannot read its attention exactly."""
    if type(block).forward is ParallelScalingBlock.forward:
        # Fused qkv + MLP input projection; the attention output goes through a reshape to the MLP activation.
        return _AttentionSite(block, block.k_norm, False, block.mlp_act, block.attn_drop)
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
    return None


# Attention classes known not to be read yet, with why (the one-line refusal says it).
_NOT_READ_YET = {
    "vision_transformer_sam.Attention": "windowed attention with decomposed relative position (SAM) is not read yet",
    "cait.TalkingHeadAttn": "talking-heads attention (CaiT) mixes heads after the softmax; it is not read yet",
    "diff_attention.DiffAttention": "differential attention (two softmax maps per head) is not read yet",
    "vision_transformer.DiffParallelScalingBlock": "differential attention (two softmax maps per head) is not read yet",
    "vision_transformer.ParallelThingsBlock": "parallel attention branches in one block are not read yet",
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
    for index, block in enumerate(blocks):
        site = _site(block)
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
    return attn, attn @ value  # (B, H, N, N), (B, H, N, hd)


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


class _CaptureSession:
    """Hooks for one capture: they act only in the thread that created the session."""

    def __init__(self, sites: Sequence[_AttentionSite], on_attention: Callable[[int, torch.Tensor], None]) -> None:
        self.sites = list(sites)
        self.on_attention = on_attention
        self.owner = threading.get_ident()
        self.active_modes: list[_ExplicitAttention] = []
        self.layers_seen: list[int] = []

    def _deliver(self, layer_index: int, attn: torch.Tensor) -> None:
        self.layers_seen.append(layer_index)
        self.on_attention(layer_index, attn)

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
    session = _CaptureSession(sites, lambda _layer, attn: attentions.append(attn))
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
        gradients = torch.autograd.grad(chosen, attentions)
    return AttentionGradients(
        logits=logits.detach(),
        target_class=target.detach().clone(),
        attentions=[attn.detach() for attn in attentions],
        gradients=[grad.detach() for grad in gradients],
    )
