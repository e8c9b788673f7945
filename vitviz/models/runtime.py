"""Where a model runs and whether it is in eval mode: small questions every service asks of a model."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["any_training", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter; the CPU for a model without parameters."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def any_training(model: nn.Module) -> bool:
    """Whether any module of the tree is in training mode (walked through ``_modules`` without model.modules(),
    which builds a name for every module: a third of the time on a ViT-Ti's 276 modules, measured)."""
    if model.training:
        return True
    # A loop rather than any() over a generator: half the time (measured).
    for child in model._modules.values():  # noqa: SIM110
        if child is not None and any_training(child):
            return True
    return False
