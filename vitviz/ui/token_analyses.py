"""The token analyses the Tokens page asks for: `vitviz.pipeline`'s service, kept in the disk cache.

No streamlit here. One call runs tokens, features, head maps and the logit lens over a set of images in one
streamed forward per batch, and stores the typed results as .npz arrays keyed by the model's content hash, the
images' content hashes and every option that changes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vitviz import pipeline
from vitviz.errors import VitvizError
from vitviz.models import LoadedModel
from vitviz.pipeline import (
    AnalysisOptions,
    FeaturesResult,
    HeadMapsResult,
    LogitLensResult,
    NotApplicable,
    Progress,
    TokensResult,
)
from vitviz.ui.analyses import InputImage, ModelInputs, cached_result
from vitviz.ui.diskcache import cache_key

ANALYSES = ("tokens", "features", "head-maps", "logit-lens")
CACHE_NAME = "tokens"


@dataclass(frozen=True)
class TokenAnalyses:
    """Everything the Tokens page draws, for the images in the order given."""

    tokens: TokensResult
    features: FeaturesResult
    head_maps: tuple[HeadMapsResult, ...]
    logit_lens: tuple[LogitLensResult, ...] | NotApplicable

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"tokens.{k}": v for k, v in self.tokens.to_arrays().items()}
        arrays.update({f"features.{k}": v for k, v in self.features.to_arrays().items()})
        arrays["heads.attention"] = np.stack([h.attention for h in self.head_maps])
        arrays["heads.masks"] = np.stack([h.masks for h in self.head_maps])
        arrays["heads.mass_share"] = np.asarray(self.head_maps[0].mass_share, dtype=np.float64)
        arrays["heads.uses_class_token"] = np.asarray(self.head_maps[0].uses_class_token)
        if isinstance(self.logit_lens, NotApplicable):
            arrays["lens.not_applicable"] = np.asarray(self.logit_lens.reason)
        else:
            arrays["lens.probabilities"] = np.stack([lens.probabilities for lens in self.logit_lens])
            arrays["lens.target_class"] = np.asarray([lens.target_class for lens in self.logit_lens])
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TokenAnalyses:
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

        share = float(arrays["heads.mass_share"])
        uses_cls = bool(arrays["heads.uses_class_token"])
        heads = tuple(
            HeadMapsResult(attention=a, masks=m.astype(bool), mass_share=share, uses_class_token=uses_cls)
            for a, m in zip(arrays["heads.attention"], arrays["heads.masks"])
        )
        lens: tuple[LogitLensResult, ...] | NotApplicable
        if "lens.not_applicable" in arrays:
            lens = NotApplicable(str(arrays["lens.not_applicable"]))
        else:
            lens = tuple(
                LogitLensResult(probabilities=p, target_class=int(t))
                for p, t in zip(arrays["lens.probabilities"], arrays["lens.target_class"])
            )
        return cls(
            tokens=TokensResult.from_arrays(part("tokens.")),
            features=FeaturesResult.from_arrays(part("features.")),
            head_maps=heads,
            logit_lens=lens,
        )


def token_analyses(
    loaded: LoadedModel,
    images: Sequence[InputImage],
    options: AnalysisOptions,
    progress: Progress | None = None,
) -> TokenAnalyses:
    """Tokens, features, head maps and logit lens over `images` with `options`' outlier factor, mass share and
    target class (None: each image's prediction); computed once, then read from the disk cache."""
    key = cache_key(
        CACHE_NAME,
        model=loaded.content_hash,
        images=[image.digest for image in images],
        outlier_factor=options.outlier_factor,
        mass_share=options.mass_share,
        target=options.target_class,
    )

    def compute() -> TokenAnalyses:
        results = pipeline.image_analyses(loaded, ModelInputs(loaded, images), ANALYSES, options, progress)
        for part in (results.tokens, results.head_maps):
            if isinstance(part, NotApplicable):  # the model's attention cannot be read: say why in one line
                raise VitvizError(f"the token analyses do not apply to this model: {part.reason}")
        assert results.tokens is not None and results.features is not None
        return TokenAnalyses(
            tokens=results.tokens,
            features=results.features,
            head_maps=results.head_maps,
            logit_lens=results.logit_lens,
        )

    return cached_result(CACHE_NAME, key, compute, TokenAnalyses.to_arrays, TokenAnalyses.from_arrays)
