"""The capturing forwards: ``capture_attention`` streams every layer's attention to consumers without autograd,
``attention_maps`` keeps them all, ``attention_gradients`` also differentiates one class logit with respect to them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vitviz.capture.consumers import AttentionConsumer, KeepAllAttention
from vitviz.capture.core import AttentionSite, CaptureSession
from vitviz.capture.readers import attention_sites
from vitviz.capture.view import attention_view
from vitviz.errors import VitvizError
from vitviz.models.runtime import any_training


@dataclass(frozen=True)
class AttentionGradients:
    """Attention of every layer and the gradient of one class logit with respect to it."""

    logits: torch.Tensor  # [B, num_classes]
    target_class: torch.Tensor  # [B] long, the class whose logit was differentiated
    attentions: list[torch.Tensor]  # L x [B, H, N, N]
    gradients: list[torch.Tensor]  # L x [B, H, N, N], d logit_c / d attn


def _check_capturable(model: nn.Module) -> list[AttentionSite]:
    if any_training(model):
        raise ValueError("attention capture needs model.eval(): training mode makes attention random")
    return attention_sites(model)


def _as_consumers(consumers: AttentionConsumer | Sequence[AttentionConsumer]) -> list[AttentionConsumer]:
    if hasattr(consumers, "consume"):
        return [consumers]  # type: ignore[list-item]
    return list(consumers)  # type: ignore[arg-type]


class _LastLayerRead(Exception):
    """Raised after the last layer's attention was delivered, to skip the rest of a forward nobody reads."""


def capture_attention(
    model: nn.Module,
    images: torch.Tensor,
    consumers: AttentionConsumer | Sequence[AttentionConsumer],
    *,
    with_logits: bool = True,
    stop_after_attention: bool = False,
) -> torch.Tensor | None:
    """Run one forward without autograd, streaming every layer's attention [B, H, N, N] to the consumers.

    Args:
        model: a timm VisionTransformer-family model in eval mode; it is not changed.
        images: [B, C, H, W] preprocessed images on the model's device.
        consumers: one consumer or several; each gets every layer in order, then the tensor is dropped.
        with_logits: run the classifier head and return its logits; False stops after forward_features.
        stop_after_attention: (with ``with_logits`` False) stop the forward once the last layer's attention has
            been delivered: the last block's projection and MLP and the final norm are not run. Only for callers
            that read nothing but the attention (no block or feature hooks of their own).

    Returns:
        The logits [B, num_classes], or None when ``with_logits`` is False.
    """
    if stop_after_attention and with_logits:
        raise ValueError("stop_after_attention skips the head: pass with_logits=False")
    sites = _check_capturable(model)
    targets = _as_consumers(consumers)
    last = len(sites) - 1

    def deliver(layer_index: int, attn: torch.Tensor) -> None:
        for consumer in targets:
            consumer.consume(layer_index, attn)
        if stop_after_attention and layer_index == last:
            raise _LastLayerRead

    session = CaptureSession(sites, deliver)
    output = None
    with attention_view(model, sites, session) as view:
        if view is not None:  # no hooks, no function mode: see capture/view.py
            with torch.no_grad(), contextlib.suppress(_LastLayerRead):
                output = view(images) if with_logits else view.forward_features(images)
    if session.layers_seen:  # a forward the view ran but that reached no attention is read with the hooks below
        session.check_complete()
        return output if with_logits else None
    with torch.no_grad(), session.installed(), contextlib.suppress(_LastLayerRead):
        output = model(images) if with_logits else model.forward_features(images)
    session.check_complete()
    return output if with_logits else None


def attention_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention [B, H, N, N] kept in memory; fine for small models, tests and one image."""
    keep = KeepAllAttention()
    capture_attention(model, images, [keep], with_logits=False, stop_after_attention=True)
    return keep.result()


def _map_gradients(
    output: torch.Tensor, sites: Sequence[AttentionSite], read: Sequence[Sequence[torch.Tensor]]
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
    session = CaptureSession(sites, lambda _layer, attn: attentions.append(attn), keep_read=True)
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
