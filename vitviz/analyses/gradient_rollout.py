"""Gradient-weighted attention rollout (Chefer et al. 2021) of each image for one class."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitviz.analyses import register
from vitviz.analyses.base import Analysis, FigureContext, Figures, Stream, StreamContext, check_target_class
from vitviz.analyses.rollout import overlay_figures

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitviz.models import LoadedModel

NO_CLASS_LOGITS = "the model has no classification head: it outputs features, not class logits"


@dataclass(frozen=True)
class GradientRolloutResult:
    """Gradient-weighted rollout of one image for one class (Chefer et al. 2021), raw."""

    map: np.ndarray  # [gh, gw] float64
    target_class: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"map": self.map, "target": np.asarray(self.target_class)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> GradientRolloutResult:
        return cls(map=np.asarray(arrays["map"]), target_class=int(arrays["target"]))


def has_class_logits(model: nn.Module) -> bool:
    """Whether the model's output is class logits (gradient rollout differentiates one). Unlike the logit lens,
    which needs one head module applied to tokens, any classifier counts: a distilled model's two heads, or a
    Hugging Face classifier that pools before its head."""
    return int(getattr(model, "num_classes", 0) or 0) > 0


class _GradientStream(Stream):
    """Its own forward and backward per batch (after the shared forward): d logit_c / d attention."""

    def __init__(self, context: StreamContext) -> None:
        self.context = context
        self.maps: list[np.ndarray] = []
        self.targets: list[int] = []

    def after_batch(self, batch: torch.Tensor, logits: torch.Tensor | None, blocks_fit: bool) -> None:
        import torch

        from vitviz.analysis.rollout import gradient_rollout
        from vitviz.capture import attention_gradients

        grads = attention_gradients(self.context.model, batch, self.context.options.target_class)
        self.maps.append(gradient_rollout(grads.attentions, grads.gradients, self.context.layout).cpu().numpy())
        self.targets.extend(int(t) for t in torch.as_tensor(grads.target_class).expand(batch.shape[0]).tolist())

    def result(self, blocks_unfit: str | None) -> tuple[GradientRolloutResult, ...]:
        return tuple(
            GradientRolloutResult(map=m, target_class=t) for m, t in zip(np.concatenate(self.maps), self.targets)
        )


def _json(gradients: Sequence[GradientRolloutResult], images: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"image": name, "target_class": gradient.target_class, "map": gradient.map.tolist()}
        for name, gradient in zip(images, gradients)
    ]


def _figures(gradients: Sequence[GradientRolloutResult], context: FigureContext) -> Figures:
    return overlay_figures("gradient-rollout", "Gradient-weighted rollout", [g.map for g in gradients], context)


def _not_applicable(loaded: LoadedModel) -> str | None:
    return None if has_class_logits(loaded.model) else NO_CLASS_LOGITS


ANALYSIS = register(
    Analysis(
        name="gradient-rollout",
        section="gradient_rollout",
        summary="rollout weighted by the gradient of one class's logit (per image)",
        order=50,
        default=True,
        needs_attention=True,
        over_dataset=True,
        uses=("target_class",),
        empty=(),
        not_applicable=_not_applicable,
        check_model=check_target_class,
        stream=_GradientStream,
        to_json=_json,
        figures=_figures,
    )
)
