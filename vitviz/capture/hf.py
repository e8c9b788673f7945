"""A wrapped Hugging Face model (``vitviz.models.hf``), read as a whole model.

Each attention module the wrapper lists (``attention_probability_modules``) runs transformers' eager path and
returns (output, probabilities), where transformers' own output_attentions reads them: a forward hook takes them
from that return value, one layer at a time. They are the very tensor the output was computed from, so they also
carry the gradient for gradient rollout.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vitviz.capture.core import AttentionSite, CaptureSession, Handles, Reader


def _returned_hooks(session: CaptureSession, layer_index: int, site: AttentionSite) -> Handles:
    def hook(module: nn.Module, args: Any, *rest: Any) -> None:
        if threading.get_ident() != session.owner:
            return None
        output = rest[-1]
        probabilities = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if not isinstance(probabilities, torch.Tensor):
            raise RuntimeError(f"{type(module).__name__} returned no attention probabilities (not eager?)")
        session.deliver(layer_index, probabilities)
        return None

    return [site.owner.register_forward_hook(hook)]


def _layers(model: nn.Module) -> Sequence[nn.Module] | None:
    returning = getattr(model, "attention_probability_modules", None)
    return list(returning()) if callable(returning) else None


def _site(module: nn.Module, model: nn.Module) -> AttentionSite:
    return AttentionSite(module, module, False, module, module, install=_returned_hooks)


READER = Reader("Hugging Face eager attention (returns its probabilities)", _site, layers=_layers)
