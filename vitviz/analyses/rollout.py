"""Attention rollout (Abnar & Zuidema 2020) of each image, with its top-5 predictions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitviz.analyses import register
from vitviz.analyses.base import Analysis, FigureContext, Figures, Option, Stream, StreamContext, at_least
from vitviz.errors import VitvizError

if TYPE_CHECKING:
    import torch

    from vitviz.models import LoadedModel

TOP_K = 5  # predictions reported beside a rollout map
HEAD_FUSIONS = ("mean", "max", "min")


@dataclass(frozen=True)
class Prediction:
    """One class and its softmax probability."""

    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class TopK:
    """The most probable classes, most probable first (ties: the lower class index first)."""

    entries: tuple[Prediction, ...]

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Prediction:
        return self.entries[index]


def top_k(probabilities: Any, class_names: Sequence[str], k: int = TOP_K) -> TopK:
    """The k most probable classes of one image's probabilities [K] (array or tensor); a class without a name is
    its index."""
    if hasattr(probabilities, "detach"):
        probabilities = probabilities.detach().cpu().numpy()
    probs = np.asarray(probabilities)
    order = np.argsort(-probs, kind="stable")[: min(k, probs.shape[-1])]
    return TopK(
        tuple(
            Prediction(int(i), class_names[i] if i < len(class_names) else str(int(i)), float(probs[i])) for i in order
        )
    )


@dataclass(frozen=True)
class RolloutResult:
    """Attention rollout of one image (Abnar & Zuidema 2020), raw (not divided by its maximum)."""

    map: np.ndarray  # [gh, gw] float64
    head_fusion: str
    discard_ratio: float
    start_layer: int
    top5: TopK | None = None  # the image's most probable classes, from the same forward


class _RolloutStream(Stream):
    needs_logits = True
    reports_predictions = True

    def __init__(self, context: StreamContext) -> None:
        from vitviz.analysis.rollout import RolloutAccumulator

        options = context.options
        self.options = options
        self.class_names = context.loaded.meta.class_names
        self.accumulator = RolloutAccumulator(
            context.layout,
            head_fusion=options.head_fusion,
            discard_ratio=options.discard_ratio,
            start_layer=options.start_layer,
        )
        self.attention = (self.accumulator,)
        self.probabilities: list[np.ndarray] = []
        self.top5: list[TopK] = []

    def after_batch(self, batch: torch.Tensor, logits: torch.Tensor | None, blocks_fit: bool) -> None:
        assert logits is not None
        probabilities = logits.float().softmax(dim=-1).cpu().numpy()
        self.probabilities.append(probabilities)
        self.top5.extend(top_k(p, self.class_names) for p in probabilities)

    def predictions(self) -> tuple[np.ndarray, tuple[TopK, ...]]:
        return np.concatenate(self.probabilities), tuple(self.top5)

    def result(self, blocks_unfit: str | None) -> tuple[RolloutResult, ...]:
        o = self.options
        maps = self.accumulator.result().cpu().numpy()
        return tuple(
            RolloutResult(
                map=m, head_fusion=o.head_fusion, discard_ratio=o.discard_ratio, start_layer=o.start_layer, top5=t
            )
            for m, t in zip(maps, self.top5)
        )


def _json(rollouts: Sequence[RolloutResult], images: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {
            "image": name,
            "head_fusion": rollout.head_fusion,
            "discard_ratio": rollout.discard_ratio,
            "start_layer": rollout.start_layer,
            "map": rollout.map.tolist(),
            "top5": [[p.name, round(p.probability, 6)] for p in rollout.top5 or ()],
        }
        for name, rollout in zip(images, rollouts)
    ]


def overlay_figures(kind: str, title: str, maps: Sequence[np.ndarray], context: FigureContext) -> Figures:
    """A map over its picture per image, as the `kind-NNN-stem` figures."""
    from vitviz.plots import paper

    for picture, stem, name, relevance in zip(context.pictures, context.stems, context.names, maps):
        yield (
            f"{kind}-{stem}",
            paper.rollout_overlay_figure(picture, relevance, title=f"{title}: {name}", colormap=context.colormap),
        )


def _figures(rollouts: Sequence[RolloutResult], context: FigureContext) -> Figures:
    return overlay_figures("rollout", "Attention rollout", [r.map for r in rollouts], context)


def _check_start_layer(loaded: LoadedModel, options: Any) -> None:
    from vitviz.capture import attention_depth

    depth = attention_depth(loaded.model)
    if options.start_layer >= depth:
        raise VitvizError(f"--start-layer {options.start_layer} is past the last layer ({depth - 1})")


def _discard_ratio(value: Any) -> str | None:
    if not 0.0 <= float(value) < 1.0:  # the kernel's own wording, as the studio shows it
        raise VitvizError(f"discard ratio must be in [0, 1), got {value}")
    return None


ANALYSIS = register(
    Analysis(
        name="rollout",
        section="rollout",
        summary="which patches the class token's attention flows from, through every layer (per image)",
        order=40,
        default=True,
        needs_attention=True,
        over_dataset=True,
        options=(
            Option("head_fusion", "mean", "rollout: how heads are fused: mean, max or min", str, choices=HEAD_FUSIONS),
            Option(
                "discard_ratio", 0.0, "rollout: share of the weakest links dropped, in [0, 1)", float, _discard_ratio
            ),
            Option("start_layer", 0, "rollout: first layer multiplied in", int, at_least(0)),
        ),
        empty=(),
        check_model=_check_start_layer,
        stream=_RolloutStream,
        to_json=_json,
        figures=_figures,
    )
)
