"""The logit lens per patch: each layer's patch tokens through the final norm and head (per image)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitviz.analyses import register
from vitviz.analyses.base import (
    Analysis,
    FigureContext,
    Figures,
    NotApplicable,
    Stream,
    StreamContext,
    check_target_class,
)

if TYPE_CHECKING:
    import torch

    from vitviz.models import LoadedModel

NO_CLASSIFIER_HEAD = "the model has no classification head"


@dataclass(frozen=True)
class LogitLensResult:
    """One image's per-patch logit lens: each layer's patch tokens through the final norm and head."""

    probabilities: np.ndarray  # [L, gh, gw] float64: the target class's softmax probability
    target_class: int


class _LogitLensStream(Stream):
    def __init__(self, context: StreamContext) -> None:
        from vitviz.analysis.tokens import LogitLens

        self.target_class = context.options.target_class
        self.needs_logits = self.target_class is None
        self.lens = LogitLens(context.model, context.layout)
        self.blocks = (self.lens,)

    def after_batch(self, batch: torch.Tensor, logits: torch.Tensor | None, blocks_fit: bool) -> None:
        import torch

        if not blocks_fit:
            return
        if self.target_class is None:
            assert logits is not None
            self.lens.finish_batch(logits.argmax(dim=-1))
        else:
            self.lens.finish_batch(torch.full((batch.shape[0],), self.target_class, dtype=torch.long))

    def result(self, blocks_unfit: str | None) -> tuple[LogitLensResult, ...] | NotApplicable:
        if blocks_unfit is not None:
            return NotApplicable(blocks_unfit)
        maps, targets = self.lens.result()
        return tuple(LogitLensResult(probabilities=m, target_class=int(t)) for m, t in zip(maps, targets))


def _json(lenses: Sequence[LogitLensResult], images: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"image": name, "target_class": lens.target_class, "probabilities": lens.probabilities.tolist()}
        for name, lens in zip(images, lenses)
    ]


def _figures(lenses: Sequence[LogitLensResult], context: FigureContext) -> Figures:
    from vitviz.plots import tokens as plots

    names = context.loaded.meta.class_names
    for lens, stem in zip(lenses, context.stems):
        name = names[lens.target_class] if lens.target_class < len(names) else str(lens.target_class)
        yield f"logit-lens-{stem}", plots.logit_lens_figure(lens.probabilities, name)


def _has_head(loaded: LoadedModel) -> bool:
    from vitviz.analysis.tokens import has_classifier_head

    return has_classifier_head(loaded.model)


def _not_applicable(loaded: LoadedModel) -> str | None:
    return None if _has_head(loaded) else NO_CLASSIFIER_HEAD


def _check_model(loaded: LoadedModel, options: Any) -> None:
    if _has_head(loaded):
        check_target_class(loaded, options)


ANALYSIS = register(
    Analysis(
        name="logit-lens",
        section="logit_lens",
        summary="each layer's patch tokens read through the final norm and head (per image)",
        order=90,
        uses=("target_class",),
        empty=(),
        not_applicable=_not_applicable,
        check_model=_check_model,
        stream=_LogitLensStream,
        to_json=_json,
        figures=_figures,
    )
)
