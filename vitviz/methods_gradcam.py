"""The ``grad-cam`` map method: Grad-CAM (Selvaraju et al. 2017) through the grad-cam package, made to fit a ViT.

Target layer: the last block's first norm (``blocks[-1].norm1`` in timm, ``layernorm_before`` in transformers
ViTs). Its output [B, N, D] loses the prefix tokens (``token_layout(model).num_prefix_tokens`` of them, read from
the model) and becomes [B, D, gh, gw] (the ``reshape_transform`` the package applies to the activations and to their
gradients). Per image: weight_c = the mean over the grid of d logit_target / d activation_c, and the map is
ReLU(sum_c weight_c * activation_c) [gh, gw], at token resolution. The package also returns that map min-max scaled
and resized to the input; the raw map is taken from the same activations and gradients with its ``get_cam_image``.

It is a baseline: one gradient of a late layer, blind to what the earlier blocks did. Registered in vitviz.methods.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vitviz.errors import VitvizError
from vitviz.methods import BASELINE, MapBatch, register_method
from vitviz.models import any_training
from vitviz.tokens import TokenLayout

__all__ = ["gradcam_target_layer", "reshape_tokens"]

NORM_NAMES = ("norm1", "layernorm_before")  # timm's Block, transformers' ViTLayer and its relatives


def gradcam_target_layer(model: nn.Module) -> nn.Module | str:
    """The last block's first norm, or a one-line reason why the model has none."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        return f"{type(model).__name__} has no list of blocks: grad-cam reads the last block's first norm"
    last = blocks[-1]
    for name in NORM_NAMES:
        layer = getattr(last, name, None)
        if isinstance(layer, nn.Module):
            return layer
    return f"{type(last).__name__} has no first norm ({' or '.join(NORM_NAMES)}): grad-cam has no target layer"


def _not_applicable(model: nn.Module) -> str | None:
    layer = gradcam_target_layer(model)
    return layer if isinstance(layer, str) else None


def reshape_tokens(layout: TokenLayout) -> Callable[[torch.Tensor], torch.Tensor]:
    """[B, N, D] tokens -> [B, D, gh, gw]: the prefix tokens dropped, the patch tokens laid on the grid."""
    gh, gw = layout.grid

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3 or tokens.shape[1] != layout.num_tokens:
            raise VitvizError(
                f"grad-cam: the last block's first norm gives {tuple(tokens.shape)}, not "
                f"[B, {layout.num_tokens}, D] ({layout.num_prefix_tokens} prefix tokens and a {gh}x{gw} grid)"
            )
        patches = tokens[:, layout.num_prefix_tokens :, :]
        return patches.reshape(tokens.shape[0], gh, gw, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


@register_method(
    "grad-cam",
    label="Grad-CAM",
    kind=BASELINE,
    description="Baseline: Grad-CAM (Selvaraju et al. 2017) on the last block's first norm, patch tokens only: "
    "ReLU of the activations weighted by their mean gradient for the target class.",
    needs_logits=True,
    default=False,
    applies=_not_applicable,
)
def _grad_cam(batch: MapBatch) -> torch.Tensor:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = batch.model
    if any_training(model):
        raise ValueError("grad-cam needs model.eval()")
    layer = gradcam_target_layer(model)
    assert not isinstance(layer, str)
    targets = [ClassifierOutputTarget(int(t)) for t in batch.targets.tolist()]
    parameters = list(model.parameters())
    saved = [None if p.grad is None else p.grad.clone() for p in parameters]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # A normal tensor even if the caller's came from inference mode; requiring its gradient puts the norm
            # in the graph even when no parameter requires one.
            inputs = batch.images.detach().clone().requires_grad_(True)
            with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape_tokens(batch.layout)) as cam:
                cam(input_tensor=inputs, targets=targets)  # forward, backward; its maps are scaled and resized
                (activations,) = cam.activations_and_grads.activations
                (gradients,) = cam.activations_and_grads.gradients
                raw = cam.get_cam_image(inputs, layer, targets, activations.numpy(), gradients.numpy())
    finally:
        for parameter, grad in zip(parameters, saved):  # the backward filled the parameters' .grad
            parameter.grad = grad
    return torch.from_numpy(raw).to(torch.float64).clamp_min(0)
