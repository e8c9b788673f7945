"""Cosine similarity of the patch-position embeddings (the ViT paper's Fig. 7, centre)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitviz.analyses import register
from vitviz.analyses.base import Analysis, FigureContext, Figures, NotApplicable

if TYPE_CHECKING:
    from torch import nn

    from vitviz.models import LoadedModel

NO_POSITION_EMBEDDINGS = "the model has no absolute position embeddings (none or relative positions)"


@dataclass(frozen=True)
class PositionResult:
    """Cosine similarity of the patch-position embeddings (paper Fig. 7 centre)."""

    similarity: np.ndarray  # [gh, gw, gh, gw] float64: entry [r, c] is patch (r, c)'s map over the grid

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.similarity.shape[0]), int(self.similarity.shape[1])

    def matrix(self) -> np.ndarray:
        """The similarity as [N, N] over patches in row-major order (N = gh*gw)."""
        patches = self.grid[0] * self.grid[1]
        return self.similarity.reshape(patches, patches)


def _position_of(model: nn.Module) -> PositionResult | NotApplicable:
    from vitviz.analysis.position import position_similarity
    from vitviz.models import patch_position_embeddings
    from vitviz.tokens import token_layout

    table = patch_position_embeddings(model)
    if table is None:
        return NotApplicable(NO_POSITION_EMBEDDINGS)
    return PositionResult(position_similarity(table.detach(), token_layout(model).grid).cpu().numpy())


def position(loaded: LoadedModel) -> PositionResult | NotApplicable:
    """Cosine similarity of the model's patch-position embeddings, or why there are none."""
    return _position_of(loaded.model)


@dataclass(frozen=True)
class ResampledPosition:
    """Position similarity after resampling the model to another input size, and how it was resampled."""

    position: PositionResult | NotApplicable
    method: str
    old_grid: tuple[int, int]
    new_grid: tuple[int, int]


def resampled_position(loaded: LoadedModel, new_size: tuple[int, int]) -> ResampledPosition:
    """Position similarity of a copy of the model resampled to `new_size` pixels (the model is not changed)."""
    from vitviz.models import resample_input_size

    new_model, new_meta = resample_input_size(loaded.model, loaded.meta, tuple(new_size))
    record = new_meta.resolution_history[-1]
    return ResampledPosition(
        position=_position_of(new_model),
        method=str(record.get("method", "")),
        old_grid=tuple(record.get("old_grid", ())),
        new_grid=tuple(record.get("new_grid", ())),
    )


def _json(result: PositionResult, _images: Sequence[str]) -> dict[str, Any]:
    return {"similarity": result.matrix().tolist()}


def _figures(result: PositionResult, context: FigureContext) -> Figures:
    from vitviz.plots import paper

    yield "position", paper.position_similarity_figure(result.similarity, colormap=context.colormap)


ANALYSIS = register(
    Analysis(
        name="position",
        section="position",
        summary="how similar each patch position's embedding is to every other",
        order=20,
        default=True,
        compute=lambda loaded, _options: position(loaded),
        to_json=_json,
        figures=_figures,
    )
)
