"""Mean attention distance of every head of every layer (the ViT paper's Fig. 7, right)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitviz.analyses import register
from vitviz.analyses.base import Analysis, FigureContext, Figures, Option, Stream, StreamContext

if TYPE_CHECKING:
    from vitviz.analysis.distance import AttentionDistance

DISTANCE_MODES = ("paper", "renormalised")


@dataclass(frozen=True)
class DistanceResult:
    """Mean attention distance of every head of every layer (paper Fig. 7 right)."""

    mode: str
    pixels: np.ndarray  # [L, H] float64: mean over queries, then images
    std: np.ndarray  # [L, H] population std over images
    fraction: np.ndarray  # [L, H] pixels / image width
    per_image: np.ndarray  # [L, B, H] per-image values
    num_images: int
    layers: tuple[int, ...] = ()  # the model layer of each row (() from old caches: 0 .. L-1)
    not_applicable_layers: tuple[tuple[int, str], ...] = ()  # (layer, why): CaiT's class-attention layers

    @classmethod
    def of(cls, distance: AttentionDistance) -> DistanceResult:
        return cls(
            mode=distance.mode,
            pixels=distance.pixels.cpu().numpy(),
            std=distance.std.cpu().numpy(),
            fraction=distance.fraction.cpu().numpy(),
            per_image=distance.per_image.cpu().numpy(),
            num_images=int(distance.num_images),
            layers=tuple(distance.layers) or tuple(range(distance.pixels.shape[0])),
            not_applicable_layers=tuple(distance.not_applicable),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "mode": np.asarray(self.mode),
            "pixels": self.pixels,
            "std": self.std,
            "fraction": self.fraction,
            "per_image": self.per_image,
            "layers": np.asarray(self.layers, dtype=np.int64),
            "not_applicable_layers": np.asarray([layer for layer, _ in self.not_applicable_layers], dtype=np.int64),
            "not_applicable_reasons": np.asarray([why for _, why in self.not_applicable_layers], dtype=str),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> DistanceResult:
        per_image = np.asarray(arrays["per_image"])
        skipped = zip(arrays.get("not_applicable_layers", ()), arrays.get("not_applicable_reasons", ()))
        return cls(
            mode=str(arrays["mode"]),
            pixels=np.asarray(arrays["pixels"]),
            std=np.asarray(arrays["std"]),
            fraction=np.asarray(arrays["fraction"]),
            per_image=per_image,
            num_images=int(per_image.shape[1]),
            layers=tuple(int(layer) for layer in arrays.get("layers", range(per_image.shape[0]))),
            not_applicable_layers=tuple((int(layer), str(why)) for layer, why in skipped),
        )


class _DistanceStream(Stream):
    def __init__(self, context: StreamContext) -> None:
        from vitviz.analysis.distance import DistanceAccumulator
        from vitviz.capture import class_attention_layers

        self.accumulator = DistanceAccumulator(
            context.layout, context.options.distance_mode, class_attention_layers(context.model)
        )
        self.attention = (self.accumulator,)

    def result(self, blocks_unfit: str | None) -> DistanceResult:
        return DistanceResult.of(self.accumulator.result())


def _json(d: DistanceResult, _images: Sequence[str]) -> dict[str, Any]:
    section: dict[str, Any] = {
        "mode": d.mode,
        "pixels": d.pixels.tolist(),
        "std": d.std.tolist(),
        "fraction": d.fraction.tolist(),
        "num_images": d.num_images,
    }
    if d.not_applicable_layers:  # CaiT's class-attention layers: the rows are the other layers
        section["layers"] = list(d.layers)
        section["not_applicable_layers"] = [{"layer": layer, "reason": why} for layer, why in d.not_applicable_layers]
    return section


def _figures(d: DistanceResult, _context: FigureContext) -> Figures:
    from vitviz.plots import paper

    yield "distance", paper.distance_figure(d.pixels, std=d.std)


ANALYSIS = register(
    Analysis(
        name="distance",
        section="distance",
        summary="how far each head looks, in pixels, averaged over the images",
        order=30,
        default=True,
        needs_attention=True,
        over_dataset=True,
        options=(
            Option(
                "distance_mode",
                "paper",
                "paper (the authors' definition) or renormalised",
                str,
                choices=DISTANCE_MODES,
            ),
        ),
        stream=_DistanceStream,
        to_json=_json,
        figures=_figures,
    )
)
