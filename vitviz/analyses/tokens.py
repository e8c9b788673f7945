"""Token norms after every block, attention to prefix tokens, and high-norm patch tokens (docs/design.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitviz.analyses import register
from vitviz.analyses.base import Analysis, FigureContext, Figures, NotApplicable, Option, Stream, StreamContext


@dataclass(frozen=True)
class TokensResult:
    """Token norms after every block, attention to prefix tokens and high-norm patch tokens (docs/design.md)."""

    norms: np.ndarray  # [L, N] float64: L2 norm of every token of every block's output, mean over images
    token_names: tuple[str, ...]  # [N] cls, dist, reg0..., then patches r{row}c{col}, the model's order
    prefix_attention: np.ndarray  # [L, H] float64: patch queries' attention to all prefix tokens (0: none)
    outlier_factor: float
    outlier_image: np.ndarray  # [M] int64; outliers sorted by image, layer, row, column
    outlier_layer: np.ndarray  # [M] int64
    outlier_row: np.ndarray  # [M] int64
    outlier_col: np.ndarray  # [M] int64
    outlier_norm: np.ndarray  # [M] float64
    outlier_ratio: np.ndarray  # [M] float64: norm / that image's median patch-token norm at that layer
    num_prefix_tokens: int
    num_images: int

    @property
    def outlier_counts(self) -> np.ndarray:
        """[L] int64: outliers per layer, over all images."""
        return np.bincount(self.outlier_layer, minlength=self.norms.shape[0]).astype(np.int64)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "norms": self.norms,
            "token_names": np.asarray(self.token_names),
            "prefix_attention": self.prefix_attention,
            "outlier_factor": np.asarray(self.outlier_factor, dtype=np.float64),
            "outlier_image": self.outlier_image,
            "outlier_layer": self.outlier_layer,
            "outlier_row": self.outlier_row,
            "outlier_col": self.outlier_col,
            "outlier_norm": self.outlier_norm,
            "outlier_ratio": self.outlier_ratio,
            "num_prefix_tokens": np.asarray(self.num_prefix_tokens),
            "num_images": np.asarray(self.num_images),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TokensResult:
        return cls(
            norms=np.asarray(arrays["norms"]),
            token_names=tuple(str(n) for n in arrays["token_names"]),
            prefix_attention=np.asarray(arrays["prefix_attention"]),
            outlier_factor=float(arrays["outlier_factor"]),
            outlier_image=np.asarray(arrays["outlier_image"]),
            outlier_layer=np.asarray(arrays["outlier_layer"]),
            outlier_row=np.asarray(arrays["outlier_row"]),
            outlier_col=np.asarray(arrays["outlier_col"]),
            outlier_norm=np.asarray(arrays["outlier_norm"]),
            outlier_ratio=np.asarray(arrays["outlier_ratio"]),
            num_prefix_tokens=int(arrays["num_prefix_tokens"]),
            num_images=int(arrays["num_images"]),
        )


class _TokensStream(Stream):
    def __init__(self, context: StreamContext) -> None:
        from vitviz.analysis.tokens import PrefixAttention, TokenNorms

        self.layout = context.layout
        depth = len(getattr(context.model, "blocks", []))
        self.norms = TokenNorms(context.layout, depth, context.options.outlier_factor)
        self.prefix = PrefixAttention(context.layout, context.attention_depth)
        self.blocks = (self.norms,)
        self.attention = (self.prefix,)

    def result(self, blocks_unfit: str | None) -> TokensResult | NotApplicable:
        from vitviz.analysis.tokens import token_names

        if blocks_unfit is not None:
            return NotApplicable(blocks_unfit)
        outliers = self.norms.outliers()
        return TokensResult(
            norms=self.norms.norms(),
            token_names=tuple(token_names(self.layout)),
            prefix_attention=self.prefix.result(),
            outlier_factor=self.norms.factor,
            outlier_image=outliers.image,
            outlier_layer=outliers.layer,
            outlier_row=outliers.row,
            outlier_col=outliers.col,
            outlier_norm=outliers.norm,
            outlier_ratio=outliers.ratio,
            num_prefix_tokens=self.layout.num_prefix_tokens,
            num_images=self.norms.num_images,
        )


def _json(t: TokensResult, images: Sequence[str]) -> dict[str, Any]:
    return {
        "token_names": list(t.token_names),
        "num_prefix_tokens": t.num_prefix_tokens,
        "num_images": t.num_images,
        "norms": t.norms.tolist(),
        "prefix_attention": t.prefix_attention.tolist(),
        "outlier_factor": t.outlier_factor,
        "outlier_counts": t.outlier_counts.tolist(),
        "outliers": [
            {"image": images[i], "layer": int(layer), "row": int(r), "col": int(c), "norm": n, "ratio": q}
            for i, layer, r, c, n, q in zip(
                t.outlier_image.tolist(),
                t.outlier_layer,
                t.outlier_row,
                t.outlier_col,
                t.outlier_norm.tolist(),
                t.outlier_ratio.tolist(),
            )
        ],
    }


def _figures(t: TokensResult, context: FigureContext) -> Figures:
    from vitviz.plots import tokens as plots

    yield "token-norms", plots.norm_heatmap_figure(t.norms, t.token_names, t.num_prefix_tokens)
    yield "prefix-attention", plots.prefix_attention_figure(t.prefix_attention, t.num_prefix_tokens)
    for index, (picture, stem) in enumerate(zip(context.pictures, context.stems)):
        chosen = t.outlier_image == index
        yield (
            f"outliers-{stem}",
            plots.outliers_figure(
                picture, t.outlier_row[chosen], t.outlier_col[chosen], t.outlier_ratio[chosen], context.grid
            ),
        )


def _above_one(value: Any) -> str | None:
    return None if float(value) > 1.0 and np.isfinite(value) else "must be a number above 1"


ANALYSIS = register(
    Analysis(
        name="tokens",
        section="tokens",
        summary="token norms after every block, attention to prefix tokens, high-norm patches",
        order=60,
        needs_attention=True,
        options=(
            Option(
                "outlier_factor",
                2.0,
                "tokens: a patch is an outlier above F x the median patch norm",
                float,
                _above_one,
            ),
        ),
        stream=_TokensStream,
        to_json=_json,
        figures=_figures,
    )
)
