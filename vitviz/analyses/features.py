"""PCA of the final features' patch tokens, three components shown as RGB (per image)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitviz.analyses import register
from vitviz.analyses.base import Analysis, FigureContext, Figures, Stream, StreamContext, images_batch


@dataclass(frozen=True)
class FeaturesResult:
    """PCA of the final features' patch tokens, centred over all patch tokens of all images (raw projections)."""

    explained_variance_ratio: np.ndarray  # [k] float64, k = 3 (fewer when the width is smaller)
    projections: np.ndarray  # [B, gh, gw, k] float64
    components: np.ndarray  # [k, D] float64, unit norm, largest-|loading| entry positive
    mean: np.ndarray  # [D] float64

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "explained_variance_ratio": self.explained_variance_ratio,
            "projections": self.projections,
            "components": self.components,
            "mean": self.mean,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FeaturesResult:
        names = ("explained_variance_ratio", "projections", "components", "mean")
        return cls(**{name: np.asarray(arrays[name]) for name in names})


class _FeaturesStream(Stream):
    """The first pass collects the moments; `result` makes the PCA's second pass. Every batch but the last
    (whose features the moments still hold) runs forward_features again, and only its projections are kept."""

    def __init__(self, context: StreamContext) -> None:
        from vitviz.analysis.tokens import FeatureMoments

        self.context = context
        self.moments = FeatureMoments(context.layout)
        self.features = self.moments.consume_features

    def result(self, blocks_unfit: str | None) -> FeaturesResult:
        import torch

        from vitviz.analysis.tokens import FeatureProjections, block_outputs
        from vitviz.models import model_device

        context, moments = self.context, self.moments
        images, batch_size, model = context.images, context.options.batch_size, context.model
        pca = moments.pca(3)
        projector = FeatureProjections(context.layout, pca)
        total = len(images)
        last_start = (total - 1) // batch_size * batch_size
        assert moments.images == total and moments.latest is not None
        device = model_device(model)
        for start in range(0, last_start, batch_size):
            batch = images_batch(images, start, min(start + batch_size, total))
            with block_outputs(model, None, projector.consume_features), torch.no_grad():
                model.forward_features(batch.to(device))
        projector.consume_patches(moments.latest)
        moments.latest = None
        return FeaturesResult(
            explained_variance_ratio=pca.explained_variance_ratio.cpu().numpy(),
            projections=projector.result(),
            components=pca.components.cpu().numpy(),
            mean=pca.mean.cpu().numpy(),
        )


def _json(f: FeaturesResult, images: Sequence[str]) -> dict[str, Any]:
    return {
        "images": list(images),
        "explained_variance_ratio": f.explained_variance_ratio.tolist(),
        "projections": f.projections.tolist(),
    }


def _figures(f: FeaturesResult, context: FigureContext) -> Figures:
    from vitviz.plots import tokens as plots

    rgb = plots.features_rgb(f.projections)
    for index, (picture, stem) in enumerate(zip(context.pictures, context.stems)):
        yield f"features-{stem}", plots.features_figure(picture, rgb[index], f.explained_variance_ratio)


ANALYSIS = register(
    Analysis(
        name="features",
        section="features",
        summary="the final patch features' first three principal components as colours (per image)",
        order=70,
        stream=_FeaturesStream,
        to_json=_json,
        figures=_figures,
    )
)
