"""Patch-embedding filters and their principal components (the ViT paper's Fig. 7, left)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitviz.analyses import register
from vitviz.analyses.base import Analysis, FigureContext, Figures, NotApplicable, Option, at_least

if TYPE_CHECKING:
    from vitviz.models import LoadedModel


@dataclass(frozen=True)
class FilterResult:
    """The raw patch-embedding filters and their top principal components (paper Fig. 7 left)."""

    weight: np.ndarray  # [D, C, P, P] float32, raw
    components: np.ndarray  # [k, C, P, P] float64, unit norm
    explained_variance_ratio: np.ndarray  # [k] float64


def filters(loaded: LoadedModel, components: int | None = None) -> FilterResult | NotApplicable:
    """PCA of the patch-embedding filters: `components` of them (at most what exists; None: all)."""
    from vitviz.analysis.filters import filter_pca, filters_applicable, patch_embedding_filters

    model = loaded.model
    applicable, reason = filters_applicable(model)
    if not applicable:
        return NotApplicable(reason)
    weight = patch_embedding_filters(model)
    available = min(weight.shape[0], weight[0].numel())
    pca = filter_pca(weight, available if components is None else min(components, available))
    return FilterResult(
        weight=weight.float().cpu().numpy(),
        components=pca.components.cpu().numpy(),
        explained_variance_ratio=pca.explained_variance_ratio.cpu().numpy(),
    )


def scaled_for_display(arrays: np.ndarray) -> np.ndarray:
    """Each of n arrays [n, ...] min-max scaled on its own to [0, 1] (a constant one becomes 0.5), for pictures."""
    import torch

    from vitviz.analysis.filters import components_for_display

    return components_for_display(torch.from_numpy(np.asarray(arrays))).numpy()


def _json(result: FilterResult, _images: Sequence[str]) -> dict[str, Any]:
    components = result.components
    return {
        "explained_variance_ratio": result.explained_variance_ratio.tolist(),
        "components": components.reshape(components.shape[0], -1).tolist(),
    }


def _figures(result: FilterResult, _context: FigureContext) -> Figures:
    from vitviz.plots import paper

    yield "filters", paper.filters_figure(result.components, result.explained_variance_ratio)


ANALYSIS = register(
    Analysis(
        name="filters",
        section="filters",
        summary="the patch-embedding filters' principal components",
        order=10,
        default=True,
        options=(Option("components", 28, "principal components of the filters", int, at_least(1)),),
        compute=lambda loaded, options: filters(loaded, options.components),
        to_json=_json,
        figures=_figures,
    )
)
