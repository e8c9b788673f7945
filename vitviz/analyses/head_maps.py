"""Each head's last-layer attention over the patches, with DINO's mass-threshold masks (per image)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitviz.analyses import register
from vitviz.analyses.base import Analysis, FigureContext, Figures, Option, Stream, StreamContext


@dataclass(frozen=True)
class HeadMapsResult:
    """One image's last-layer attention of every head over the patches, and DINO's mass-threshold masks."""

    attention: np.ndarray  # [H, gh, gw] float64
    masks: np.ndarray  # [H, gh, gw] bool: the smallest set of patches holding `mass_share` of each head's map
    mass_share: float
    uses_class_token: bool  # False: the mean over patch queries (the model has no class token)

    @property
    def query(self) -> str:
        return "class token" if self.uses_class_token else "mean patch query"


class _HeadMapsStream(Stream):
    def __init__(self, context: StreamContext) -> None:
        from vitviz.analysis.tokens import HeadMapAccumulator

        self.mass_share = float(context.options.mass_share)
        self.accumulator = HeadMapAccumulator(context.layout, context.attention_depth)
        self.attention = (self.accumulator,)

    def result(self, blocks_unfit: str | None) -> tuple[HeadMapsResult, ...]:
        from vitviz.analysis.tokens import mass_threshold_masks

        maps = self.accumulator.result()
        masks = mass_threshold_masks(maps, self.mass_share)
        uses_class_token = self.accumulator.uses_class_token
        return tuple(
            HeadMapsResult(attention=m, masks=k, mass_share=self.mass_share, uses_class_token=uses_class_token)
            for m, k in zip(maps, masks)
        )


def _json(head_maps: Sequence[HeadMapsResult], images: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {
            "image": name,
            "query": maps.query,
            "uses_class_token": maps.uses_class_token,
            "mass_share": maps.mass_share,
            "attention": maps.attention.tolist(),
            "masks": maps.masks.astype(int).tolist(),
        }
        for name, maps in zip(images, head_maps)
    ]


def _figures(head_maps: Sequence[HeadMapsResult], context: FigureContext) -> Figures:
    from vitviz.plots import tokens as plots

    for heads, stem in zip(head_maps, context.stems):
        figure = plots.head_maps_figure(heads.attention, heads.masks, query=heads.query, mass_share=heads.mass_share)
        yield f"head-maps-{stem}", figure


def _share(value: Any) -> str | None:
    return None if 0.0 < float(value) <= 1.0 else "must be in (0, 1]"


ANALYSIS = register(
    Analysis(
        name="head-maps",
        section="head_maps",
        summary="each head's last-layer attention over the patches, with mass-threshold masks (per image)",
        order=80,
        needs_attention=True,
        options=(Option("mass_share", 0.6, "head maps: share of a head's attention its mask holds", float, _share),),
        empty=(),
        stream=_HeadMapsStream,
        to_json=_json,
        figures=_figures,
    )
)
