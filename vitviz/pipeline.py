"""The one analysis service: every analysis of a loaded model, returned as typed, frozen results.

`python -m vitviz analyze` serialises these results to the JSON of docs/design.md (vitviz/cli.py); the studio's pages
cache and draw them (vitviz/ui). Both go through the same options, validation, batch loop and top-k here, so
they compute the same numbers. Pure computation: images arrive preprocessed and nothing here reads or
writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import numpy as np
import torch
from torch import nn

from vitviz import analyses as registry
from vitviz.analyses import AnalysisOptions, NotApplicable
from vitviz.analyses.base import images_batch
from vitviz.analyses.distance import DISTANCE_MODES, DistanceResult
from vitviz.analyses.features import FeaturesResult
from vitviz.analyses.filters import FilterResult, filters, scaled_for_display
from vitviz.analyses.gradient_rollout import NO_CLASS_LOGITS, GradientRolloutResult, has_class_logits
from vitviz.analyses.head_maps import HeadMapsResult
from vitviz.analyses.logit_lens import NO_CLASSIFIER_HEAD, LogitLensResult
from vitviz.analyses.position import (
    NO_POSITION_EMBEDDINGS,
    PositionResult,
    ResampledPosition,
    position,
    resampled_position,
)
from vitviz.analyses.rollout import HEAD_FUSIONS, TOP_K, Prediction, RolloutResult, TopK, top_k
from vitviz.analyses.tokens import TokensResult
from vitviz.analysis.differences import MapDifferences, map_differences
from vitviz.analysis.tokens import block_outputs
from vitviz.capture import QueryAttention, capture_attention, unreadable_reason
from vitviz.errors import VitvizError
from vitviz.models import LoadedModel, count_parameters, model_device
from vitviz.tokens import TokenLayout, token_layout

logger = logging.getLogger(__name__)

__all__ = [
    "ANALYSES",
    "ATTENTION_ANALYSES",
    "DATASET_ANALYSES",
    "DEFAULT_ANALYSES",
    "DISTANCE_MODES",
    "HEAD_FUSIONS",
    "IMAGE_ANALYSES",
    "NO_CLASSIFIER_HEAD",
    "NO_CLASS_LOGITS",
    "NO_POSITION_EMBEDDINGS",
    "TOP_K",
    "AnalysisOptions",
    "DatasetPass",
    "DatasetResults",
    "DistanceResult",
    "FeaturesResult",
    "FilterResult",
    "GradientRolloutResult",
    "HeadMapsResult",
    "ImageAttention",
    "ImageResults",
    "LogitLensResult",
    "MapDifferences",
    "ModelCard",
    "NotApplicable",
    "PairPass",
    "PositionResult",
    "Prediction",
    "Progress",
    "QueryAttentionResult",
    "ResampledPosition",
    "RolloutResult",
    "TokensResult",
    "TopK",
    "analysis_figures",
    "attention_not_applicable",
    "dataset_analyses",
    "filters",
    "gradient_rollout_map",
    "has_class_logits",
    "image_analyses",
    "image_attention",
    "map_differences",
    "model_card",
    "pair_analyses",
    "parse_analyses",
    "position",
    "resampled_position",
    "run_analysis",
    "scaled_for_display",
    "top_k",
]

DEFAULT_ANALYSES = registry.default_names()  # what no --analyses runs
ANALYSES = registry.names()
IMAGE_ANALYSES = registry.image_names()
# The image analyses that read attention (tokens: its prefix attention); the others need only block outputs.
ATTENTION_ANALYSES = tuple(a.name for a in registry.analyses() if a.needs_attention)

Progress = Callable[[int, int], None]  # progress(done, total), called after every batch


# --- options ----------------------------------------------------------------------------------------


def parse_analyses(text: str | None) -> list[str]:
    """Parse a comma-separated --analyses list; None means DEFAULT_ANALYSES (the paper's five)."""
    return registry.parse(text)


def attention_not_applicable(loaded: LoadedModel) -> NotApplicable | None:
    """None when vitviz reads the model's attention exactly; otherwise why the attention analyses do not apply."""
    reason = unreadable_reason(loaded.model)
    return NotApplicable(reason) if reason is not None else None


# --- the model card ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """What a model is: geometry read from the model itself, plus its checkpoint's description."""

    source: str
    arch: str
    img_size: tuple[int, int]
    grid: tuple[int, int]
    stride: tuple[int, int]
    num_prefix_tokens: int
    depth: int
    num_heads: int
    embed_dim: int
    num_classes: int
    parameters: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    config: dict[str, Any] | None  # ViTConfig.to_dict() of vitviz models; None for timm models
    class_names: tuple[str, ...]
    training: dict[str, Any] = field(default_factory=dict)
    resolution_history: tuple[dict[str, Any], ...] = ()
    content_hash: str = ""

    def model_section(self) -> dict[str, Any]:
        """The JSON's "model" section."""
        return {
            "source": self.source,
            "arch": self.arch,
            "img_size": list(self.img_size),
            "grid": list(self.grid),
            "stride": list(self.stride),
            "num_prefix_tokens": self.num_prefix_tokens,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "embed_dim": self.embed_dim,
            "num_classes": self.num_classes,
        }

    def to_dict(self) -> dict[str, Any]:
        """The whole card as JSON data (what `python -m vitviz info --json` prints)."""
        return {
            **self.model_section(),
            "parameters": self.parameters,
            "in_chans": self.in_chans,
            "mean": list(self.mean),
            "std": list(self.std),
            "config": copy.deepcopy(self.config),
            "class_names": list(self.class_names),
            "training": copy.deepcopy(self.training),
            "resolution_history": copy.deepcopy(list(self.resolution_history)),
            "content_hash": self.content_hash,
        }


def _num_heads(block: nn.Module) -> int:
    """Heads of a block's attention as the analyses see them: timm's parallel blocks hold them themselves, and
    ParallelThingsBlock's branches are side by side (K branches x H heads)."""
    if hasattr(block, "attns"):
        return sum(_num_heads(branch) for branch in block.attns)
    return int(getattr(block, "num_heads", None) or block.attn.num_heads)


def model_card(loaded: LoadedModel) -> ModelCard:
    """The card of a loaded model."""
    model, meta = loaded.model, loaded.meta
    layout = token_layout(model)
    blocks = getattr(model, "blocks", [])
    return ModelCard(
        source=loaded.source,
        arch=meta.arch,
        img_size=tuple(layout.img_size),
        grid=tuple(layout.grid),
        stride=tuple(layout.stride),
        num_prefix_tokens=layout.num_prefix_tokens,
        depth=len(blocks),
        num_heads=_num_heads(blocks[0]) if len(blocks) else 0,
        embed_dim=int(getattr(model, "embed_dim", 0)),
        num_classes=int(getattr(model, "num_classes", 0)),
        parameters=count_parameters(model),
        in_chans=meta.in_chans,
        mean=tuple(meta.mean),
        std=tuple(meta.std),
        config=meta.config.to_dict() if meta.config is not None else None,
        class_names=tuple(meta.class_names),
        training=copy.deepcopy(meta.training),
        resolution_history=tuple(copy.deepcopy(meta.resolution_history)),
        content_hash=loaded.content_hash,
    )


# --- analyses of images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryAttentionResult:
    """One query token's attention in every layer and head of one image."""

    query_index: int
    attention: np.ndarray  # [L, H, N] over all tokens, prefix tokens first
    num_prefix_tokens: int
    grid_size: tuple[int, int]  # (gh, gw) patch grid

    @property
    def grid(self) -> np.ndarray:
        """The attention over the patches only, [L, H, gh, gw]."""
        return self.attention[..., self.num_prefix_tokens :].reshape(*self.attention.shape[:-1], *self.grid_size)


@dataclass(frozen=True)
class ImageResults:
    """What the batch loop computed for B images: each analysis asked for, by name, in image order.

    An analysis that was asked for but does not apply to the model (its attention cannot be read exactly, or
    its blocks' outputs do not hold the whole token sequence) is NotApplicable with the reason; the others run.
    `results[name]` (or `results.get(name)`) is its typed result; the named properties below are the same values,
    with the analysis's empty value when it was not asked for.
    """

    by_name: Mapping[str, Any]
    probabilities: np.ndarray | None  # [B, K] float32 softmax, from the shared forward (with rollout)
    top5: tuple[TopK, ...]
    queries: tuple[QueryAttentionResult, ...] = ()

    def __getitem__(self, name: str) -> Any:
        return self.by_name[name]

    def get(self, name: str) -> Any:
        """The result of `name`, or the analysis's empty value when it was not asked for."""
        return self.by_name[name] if name in self.by_name else registry.get(name).empty

    @property
    def distance(self) -> DistanceResult | NotApplicable | None:
        return self.get("distance")

    @property
    def rollouts(self) -> tuple[RolloutResult, ...] | NotApplicable:
        return self.get("rollout")

    @property
    def gradients(self) -> tuple[GradientRolloutResult, ...] | NotApplicable:
        return self.get("gradient-rollout")

    @property
    def tokens(self) -> TokensResult | NotApplicable | None:
        return self.get("tokens")

    @property
    def features(self) -> FeaturesResult | None:
        return self.get("features")

    @property
    def head_maps(self) -> tuple[HeadMapsResult, ...] | NotApplicable:
        return self.get("head-maps")

    @property
    def logit_lens(self) -> tuple[LogitLensResult, ...] | NotApplicable:
        return self.get("logit-lens")

    @property
    def rollout_maps(self) -> np.ndarray | None:
        """The rollout maps stacked, [B, gh, gw], or None when rollout did not run or does not apply."""
        if isinstance(self.rollouts, NotApplicable) or not self.rollouts:
            return None
        return np.stack([r.map for r in self.rollouts])


def _not_applicable(analysis: registry.Analysis, loaded: LoadedModel, unreadable: NotApplicable | None) -> Any:
    """Why an image analysis does not apply to the model before any forward (None: it runs)."""
    if analysis.needs_attention and unreadable is not None:
        return unreadable
    reason = analysis.not_applicable(loaded) if analysis.not_applicable is not None else None
    return NotApplicable(reason) if reason is not None else None


class _BlockOutputs:
    """Hands each block's output to the streams that read blocks, while the outputs are the token sequence.

    SAM's blocks keep a (windowed) grid [B, h, w, D]; CaiT's blocks run on the patches alone (the class token
    joins in its class-attention blocks): there the block analyses are not applicable, with the reason."""

    def __init__(self, consumers: Sequence[Any], num_tokens: int) -> None:
        self.consumers = consumers
        self.num_tokens = num_tokens
        self.unfit: str | None = None

    def __call__(self, layer_index: int, x: torch.Tensor) -> None:
        if self.unfit is not None:
            return
        if x.ndim != 3:
            self.unfit = f"the blocks' outputs are a {x.ndim}-D grid, not a token sequence"
        elif x.shape[1] != self.num_tokens:
            self.unfit = (
                f"the blocks' outputs hold {x.shape[1]} tokens, not the model's {self.num_tokens} "
                "(prefix and patch tokens)"
            )
        else:
            for consumer in self.consumers:
                consumer.consume(layer_index, x)


def _forward(
    model: nn.Module,
    batch: torch.Tensor,
    attention: Sequence[Any],
    on_block: Callable[[int, Any], None] | None,
    features: Any,
    logits: bool,
) -> torch.Tensor | None:
    """One forward feeding every consumer: attention through the capture, block outputs and the final features
    through forward hooks. Returns the logits when asked for."""
    with block_outputs(model, on_block, features):
        if attention:
            # Nothing after the last attention is read when no block, feature or logit consumer waits for it.
            tail_unread = not logits and on_block is None and features is None
            return capture_attention(
                model, batch, list(attention), with_logits=logits, stop_after_attention=tail_unread
            )
        with torch.no_grad():  # nothing reads attention: a plain forward feeds the hooks
            if logits:
                return model(batch)
            model.forward_features(batch)
            return None


def _block_hook(blocks: _BlockOutputs, pair_blocks: Sequence[Any]) -> Callable[[int, Any], None] | None:
    """One block hook for the streams' consumers (while the outputs are the token sequence) and a comparison's
    (every block's output as the block returns it, its first element when a tuple); None when nobody reads."""
    if not pair_blocks:
        return blocks if blocks.consumers else None

    def hand_on(layer: int, output: Any) -> None:
        x = output[0] if isinstance(output, tuple) else output
        for consumer in pair_blocks:
            consumer.consume(layer, x)
        if blocks.consumers:
            blocks(layer, output)

    return hand_on


def _features_hook(streams: Sequence[registry.Stream]) -> Callable[[torch.Tensor], None] | None:
    """One hook handing the final features to every stream that reads them; None when none does."""
    hooks = [s.features for s in streams if s.features is not None]
    if not hooks:
        return None

    def hand_on(features: torch.Tensor) -> None:
        for hook in hooks:
            hook(features)

    return hand_on


def image_analyses(
    loaded: LoadedModel,
    images: torch.Tensor | Sequence[torch.Tensor],
    analyses: Sequence[str],
    options: AnalysisOptions,
    progress: Progress | None = None,
    *,
    query_index: int | None = None,
    pair_blocks: Sequence[Any] = (),
) -> ImageResults:
    """The image analyses named in `analyses` over all images, `options.batch_size` images per forward.

    One streamed forward per batch feeds every registered analysis asked for (vitviz/analyses) and, when
    `query_index` is given, that token's attention; an analysis that needs more (gradient rollout's backward)
    runs it after the shared forward. `pair_blocks` are a comparison's consumers of this model's block outputs
    (`PairPass`), fed by the same forward, so that comparing two models reads and runs each model once.

    Args:
        images: preprocessed images, a [B, C, H, W] tensor or a sequence of [C, H, W] tensors (read one
            batch at a time, so it may produce them lazily).
        analyses: names of image analyses; the analyses of the weights (filters, position) are ignored.
        progress: called as progress(done, total) after every batch.

    One analysis never stops the others: when vitviz cannot read the model's attention exactly
    (`unreadable_reason`), the attention analyses asked for are NotApplicable with that reason and the rest run
    on a plain forward; when the blocks' outputs are not the whole token sequence (CaiT, SAM), the analyses of
    block outputs are NotApplicable. Only `query_index` with unreadable attention raises (VitvizError, one line).
    """
    total = len(images)
    if total == 0:
        raise VitvizError("no images to analyse")
    options.check_model(loaded, analyses)
    model = loaded.model
    layout = token_layout(model)
    unreadable = attention_not_applicable(loaded)
    if unreadable is not None and query_index is not None:
        raise VitvizError(unreadable.reason)
    context = registry.StreamContext(loaded, layout, options, images)
    by_name: dict[str, Any] = {}
    streams: dict[str, registry.Stream] = {}
    for name in analyses:
        analysis = registry.get(name)
        if not analysis.on_images:
            continue
        skipped = _not_applicable(analysis, loaded, unreadable)
        if skipped is not None:
            by_name[name] = skipped
        else:
            streams[name] = analysis.stream(context)
    if unreadable is not None and (refused := [n for n, r in by_name.items() if r == unreadable]):
        logger.info("%s not applicable: %s", ", ".join(refused), unreadable.reason)
    query_acc = QueryAttention(query_index) if query_index is not None else None
    attention = [c for s in streams.values() for c in s.attention] + ([query_acc] if query_acc is not None else [])
    blocks = _BlockOutputs([c for s in streams.values() for c in s.blocks], layout.num_tokens)
    on_block = _block_hook(blocks, pair_blocks)
    features = _features_hook(list(streams.values()))
    needs_logits = any(s.needs_logits for s in streams.values())
    shared_forward = bool(attention or on_block is not None or features is not None)
    device = model_device(model)
    for start in range(0, total, options.batch_size):
        stop = min(start + options.batch_size, total)
        batch = images_batch(images, start, stop).to(device)
        logits = _forward(model, batch, attention, on_block, features, needs_logits) if shared_forward else None
        for stream in streams.values():
            stream.after_batch(batch, logits, blocks.unfit is None)
        if progress is not None:
            progress(stop, total)
    for name, stream in streams.items():
        by_name[name] = stream.result(blocks.unfit)
    # The predictions come from the stream that computed them with the shared forward (rollout's top-5).
    predicting = next((s for s in streams.values() if s.reports_predictions), None)
    probs, top5 = predicting.predictions() if predicting is not None else (None, ())
    return ImageResults(
        by_name={name: by_name[name] for name in analyses if name in by_name},
        probabilities=probs,
        top5=top5,
        queries=_queries(query_acc, layout) if query_acc is not None else (),
    )


def _queries(query_acc: QueryAttention, layout: TokenLayout) -> tuple[QueryAttentionResult, ...]:
    rows = query_acc.result().cpu().numpy()  # (L, B, H, N)
    return tuple(
        QueryAttentionResult(
            query_index=int(query_acc.query_index),
            attention=rows[:, b],
            num_prefix_tokens=layout.num_prefix_tokens,
            grid_size=tuple(layout.grid),
        )
        for b in range(rows.shape[1])
    )


def run_analysis(
    loaded: LoadedModel,
    name: str,
    images: torch.Tensor | Sequence[torch.Tensor] = (),
    options: AnalysisOptions | None = None,
    progress: Progress | None = None,
) -> Any:
    """One registered analysis by name: of the weights, or of the preprocessed `images` (image_analyses)."""
    analysis = registry.get(name)
    options = AnalysisOptions() if options is None else options
    if analysis.compute is not None:
        options.check_model(loaded, [name])
        return analysis.compute(loaded, options)
    return image_analyses(loaded, images, [name], options, progress)[name]


def analysis_figures(
    loaded: LoadedModel,
    results: Mapping[str, Any],
    images: torch.Tensor | Sequence[torch.Tensor] = (),
    image_names: Sequence[str] = (),
    colormap: str = "viridis",
) -> Iterator[tuple[str, Any]]:
    """(file stem, matplotlib figure) for every result (by analysis name) whose analysis draws figures, in the
    registry's order; per-image figures are drawn over the preprocessed `images`, named after `image_names`."""
    from vitviz.images import to_display

    meta = loaded.meta
    names = [PurePath(name) for name in image_names]
    context = registry.FigureContext(
        loaded,
        pictures=[to_display(images[index], meta.mean, meta.std) for index in range(len(names))],
        stems=[f"{index:03d}-{name.stem}" for index, name in enumerate(names)],
        names=[name.name for name in names],
        colormap=colormap,
    )
    for analysis in registry.analyses():
        result = results.get(analysis.name)
        if analysis.figures is not None and result is not None and not isinstance(result, NotApplicable):
            yield from analysis.figures(result, context)


@dataclass(frozen=True)
class ImageAttention:
    """One forward over one image: its rollout map, class probabilities and one query token's attention."""

    rollout: RolloutResult
    probabilities: np.ndarray  # [K] float32 softmax
    query: QueryAttentionResult

    @property
    def top5(self) -> TopK:
        """The most probable classes, as the pipeline computed them with the rollout's forward."""
        assert self.rollout.top5 is not None
        return self.rollout.top5

    def to_arrays(self) -> dict[str, np.ndarray]:
        top5 = self.top5
        return {
            "top5_index": np.asarray([p.index for p in top5], dtype=np.int64),
            "top5_name": np.asarray([p.name for p in top5], dtype=str),
            "top5_probability": np.asarray([p.probability for p in top5], dtype=np.float64),
            "rollout": self.rollout.map,
            "head_fusion": np.asarray(self.rollout.head_fusion),
            "discard_ratio": np.asarray(self.rollout.discard_ratio, dtype=np.float64),
            "start_layer": np.asarray(self.rollout.start_layer),
            "probs": self.probabilities,
            "query": self.query.attention,
            "query_index": np.asarray(self.query.query_index),
            "num_prefix_tokens": np.asarray(self.query.num_prefix_tokens),
            "grid_size": np.asarray(self.query.grid_size),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ImageAttention:
        gh, gw = (int(v) for v in arrays["grid_size"])
        return cls(
            rollout=RolloutResult(
                map=np.asarray(arrays["rollout"]),
                head_fusion=str(arrays["head_fusion"]),
                discard_ratio=float(arrays["discard_ratio"]),
                start_layer=int(arrays["start_layer"]),
                top5=TopK(
                    tuple(
                        Prediction(int(i), str(n), float(p))
                        for i, n, p in zip(arrays["top5_index"], arrays["top5_name"], arrays["top5_probability"])
                    )
                ),
            ),
            probabilities=np.asarray(arrays["probs"]),
            query=QueryAttentionResult(
                query_index=int(arrays["query_index"]),
                attention=np.asarray(arrays["query"]),
                num_prefix_tokens=int(arrays["num_prefix_tokens"]),
                grid_size=(gh, gw),
            ),
        )


def image_attention(
    loaded: LoadedModel, image: torch.Tensor, options: AnalysisOptions, query_index: int = 0
) -> ImageAttention:
    """Rollout (with `options`' fusion, discard ratio and start layer), probabilities and the attention of
    token `query_index`, from one forward over one preprocessed image [C, H, W]."""
    results = image_analyses(loaded, image[None], ("rollout",), options, query_index=query_index)
    assert results.probabilities is not None
    return ImageAttention(rollout=results.rollouts[0], probabilities=results.probabilities[0], query=results.queries[0])


def gradient_rollout_map(
    loaded: LoadedModel, image: torch.Tensor, target_class: int | None = None
) -> GradientRolloutResult:
    """Gradient-weighted rollout of one preprocessed image [C, H, W] for `target_class` (None: the prediction)."""
    options = AnalysisOptions(target_class=target_class)
    gradients = image_analyses(loaded, image[None], ("gradient-rollout",), options).gradients
    if isinstance(gradients, NotApplicable):
        raise VitvizError(gradients.reason)
    return gradients[0]


# --- a data set, streamed (docs/design.md, "Data sets and torchrun") -----------------------------------

# What a data-set run computes: per image only small summaries are kept (each image's distance per layer
# and head, its label, prediction and gradient target), never a map; the maps are averaged over the images.
DATASET_ANALYSES = tuple(a.name for a in registry.analyses() if a.over_dataset)


@dataclass(frozen=True)
class DatasetResults:
    """The image analyses of a data-set slice, combined over batches (and torchrun ranks) in image order.

    Per image (index order, [N]): the image's position in the slice, its label, and, when rollout ran, the
    predicted class and its softmax probability; when gradient rollout ran, the class it followed.
    """

    num_images: int
    indices: np.ndarray  # [N] int64, 0..N-1
    labels: np.ndarray  # [N] int64
    distance: DistanceResult | NotApplicable | None  # per_image [L, N, H] as for image_analyses
    rollout_mean: np.ndarray | NotApplicable | None  # [gh, gw] float64: the mean of the raw rollout maps
    gradient_mean: np.ndarray | NotApplicable | None  # [gh, gw] float64: the mean of the raw gradient-rollout maps
    predicted: np.ndarray | None = None  # [N] int64 (with rollout)
    probability: np.ndarray | None = None  # [N] float64: the predicted class's probability (float32 softmax)
    gradient_targets: np.ndarray | None = None  # [N] int64 (with gradient rollout)

    def accuracy(self) -> float | None:
        """Share of images whose prediction is their label; None without predictions."""
        if self.predicted is None or self.num_images == 0:
            return None
        return float(np.count_nonzero(self.predicted == self.labels)) / self.num_images


def _batch_parts(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, indices) of a vitviz.data.stream.DatasetBatch or of an (images, labels, indices) tuple."""
    if hasattr(batch, "images"):
        return batch.images, batch.labels, batch.indices
    images, labels, indices = batch
    return images, torch.as_tensor(labels), torch.as_tensor(indices)


def _dataset_record(results: ImageResults, labels: torch.Tensor, indices: torch.Tensor) -> dict[str, Any]:
    """What one batch leaves behind: small per-image numbers and the float64 sums of its maps."""
    record: dict[str, Any] = {
        "indices": indices.to(torch.int64).tolist(),
        "labels": labels.to(torch.int64).tolist(),
    }
    for key, value in (("distance", results.distance), ("rollout", results.rollouts), ("gradient", results.gradients)):
        if isinstance(value, NotApplicable):
            record[f"{key}_not_applicable"] = value
    if isinstance(results.distance, DistanceResult):
        record["distance"] = results.distance  # per_image [L, b, H] float64
    maps = results.rollout_maps
    if maps is not None and results.probabilities is not None:
        record["rollout_sum"] = maps.astype(np.float64).sum(axis=0)
        record["predicted"] = results.probabilities.argmax(axis=1).astype(np.int64).tolist()
        record["probability"] = results.probabilities.max(axis=1).astype(np.float64).tolist()
    if not isinstance(results.gradients, NotApplicable) and results.gradients:
        record["gradient_sum"] = np.stack([g.map for g in results.gradients]).astype(np.float64).sum(axis=0)
        record["gradient_targets"] = [g.target_class for g in results.gradients]
    return record


def _in_image_order(parts: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every rank's batch records, ordered by their first image; the images must be 0..N-1, each once."""
    records = sorted((r for part in parts for r in part), key=lambda r: r["indices"][0])
    order = [i for r in records for i in r["indices"]]
    if order != list(range(len(order))):
        raise ValueError("the batches do not hold the images 0..N-1 once each, in order")
    return records


def dataset_analyses(
    loaded: LoadedModel,
    batches: Any,
    analyses: Sequence[str],
    options: AnalysisOptions,
    progress: Callable[[int], None] | None = None,
    *,
    ranks: Any = None,
) -> DatasetResults:
    """DATASET_ANALYSES over a stream of batches, memory independent of the number of images.

    Args:
        batches: an iterable of vitviz.data.stream.DatasetBatch (or (images, labels, indices) tuples): the
            preprocessed images [b, C, H, W], their labels and their positions in the slice. Under torchrun each
            rank passes its own batches (vitviz.data.stream.dataset_batches).
        analyses: names from DATASET_ANALYSES; filters and position are not image analyses and are ignored here;
            the other image analyses keep per-image maps and are refused (VitvizError).
        progress: called with the number of images after each batch.
        ranks: a vitviz.data.stream.Ranks under torchrun; its `gather` collects every rank's per-batch records,
            which are combined in image order, so every rank returns what one process would.

    Each batch goes through `image_analyses` on its own; a batch's per-image numbers therefore equal those of a
    one-process run with the same batches. The means add the batches' float64 sums in image order.
    """
    run = DatasetPass(loaded, analyses, options)
    for batch in batches:
        added = run.add(batch)
        if progress is not None:
            progress(added)
        del batch  # nothing of a batch is held while the next one is read
    return run.result(ranks)


class DatasetPass:
    """`dataset_analyses` one batch at a time: `add` each batch, then `result`. A comparison drives two of them
    (one per model) and its own consumers of block outputs (`pair_blocks`) with the same forwards."""

    def __init__(self, loaded: LoadedModel, analyses: Sequence[str], options: AnalysisOptions) -> None:
        refused = [name for name in analyses if name in IMAGE_ANALYSES and name not in DATASET_ANALYSES]
        if refused:
            verb = "keeps" if len(refused) == 1 else "keep"
            raise VitvizError(
                f"{', '.join(refused)} {verb} a map per image: run on --images for that; a data-set run computes "
                f"{', '.join(DATASET_ANALYSES)}"
            )
        self.wanted = [name for name in analyses if name in DATASET_ANALYSES]
        if not self.wanted:
            raise VitvizError(f"nothing to compute over a data set: ask for one of {', '.join(DATASET_ANALYSES)}")
        options.check_model(loaded, self.wanted)
        self.loaded, self.options = loaded, options
        self.records: list[dict[str, Any]] = []

    def add(self, batch: Any, *, pair_blocks: Sequence[Any] = ()) -> int:
        """Analyse one batch (a DatasetBatch or (images, labels, indices)); returns its number of images."""
        images, labels, indices = _batch_parts(batch)
        results = image_analyses(self.loaded, images, self.wanted, self.options, pair_blocks=pair_blocks)
        self.records.append(_dataset_record(results, labels, indices))
        return len(indices)

    def result(self, ranks: Any = None) -> DatasetResults:
        """The results over every batch added (under torchrun, every rank's, gathered through `ranks`)."""
        return _dataset_results(self.loaded, ranks.gather(self.records) if ranks is not None else [self.records])


def _dataset_results(loaded: LoadedModel, parts: Sequence[Sequence[dict[str, Any]]]) -> DatasetResults:
    """The batch records of every rank combined in image order: per-image numbers, float64 means."""
    ordered = _in_image_order(parts)
    if not ordered:
        raise VitvizError("no images to analyse")
    count = sum(len(r["indices"]) for r in ordered)

    def not_applicable(key: str) -> NotApplicable | None:
        return next((r[f"{key}_not_applicable"] for r in ordered if f"{key}_not_applicable" in r), None)

    def mean_map(key: str) -> np.ndarray | NotApplicable | None:
        skipped = not_applicable("rollout" if key == "rollout_sum" else "gradient")
        if skipped is not None:
            return skipped
        if key not in ordered[0]:
            return None
        total = ordered[0][key].copy()
        for record in ordered[1:]:
            total += record[key]
        return total / count

    distance: DistanceResult | NotApplicable | None = not_applicable("distance")
    if distance is None and "distance" in ordered[0]:
        per_image = torch.from_numpy(np.concatenate([r["distance"].per_image for r in ordered], axis=1))  # (L, N, H)
        pixels = per_image.mean(dim=1)
        # The first batch's result with the statistics over all images (its other fields describe the layers).
        distance = dataclasses.replace(
            ordered[0]["distance"],
            pixels=pixels.numpy(),
            std=per_image.std(dim=1, correction=0).numpy(),
            fraction=(pixels / token_layout(loaded.model).img_size[1]).numpy(),
            per_image=per_image.numpy(),
            num_images=count,
        )

    def per_image(key: str, dtype: type) -> np.ndarray | None:
        return np.asarray([v for r in ordered for v in r[key]], dtype=dtype) if key in ordered[0] else None

    return DatasetResults(
        num_images=count,
        indices=np.arange(count, dtype=np.int64),
        labels=per_image("labels", np.int64),
        distance=distance,
        rollout_mean=mean_map("rollout_sum"),
        gradient_mean=mean_map("gradient_sum"),
        predicted=per_image("predicted", np.int64),
        probability=per_image("probability", np.float64),
        gradient_targets=per_image("gradient_targets", np.int64),
    )


# --- comparisons of two models over the same images (docs/design.md, "Comparing two models") ---------------


def _pair_forward(model: nn.Module, batch: torch.Tensor, consumers: Sequence[Any]) -> None:
    """One forward of `model` handing every block's output (a tensor, as the block returns it) to `consumers`."""

    def hand_on(layer: int, output: Any) -> None:
        x = output[0] if isinstance(output, tuple) else output
        for consumer in consumers:
            consumer.consume(layer, x)

    with block_outputs(model, hand_on), torch.no_grad():
        model.forward_features(batch.to(model_device(model)))


def pair_analyses(
    loaded_a: LoadedModel,
    loaded_b: LoadedModel,
    batches: Any,
    analyses: Sequence[str],
    options: AnalysisOptions,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The comparisons (`registry.pairs()`) named in `analyses` of model A and model B over the same images.

    Args:
        batches: an iterable of (images for A [b, C, H, W], images for B [b, C', H', W']) pairs: the same b
            images in the same order, each preprocessed as its model expects (input size, channels, normalisation).
            Each pair is forwarded through A, then B, and dropped before the next is read, so memory does not
            grow with the number of images.
        progress: called with the number of images after each batch.

    Returns each comparison's typed result (or NotApplicable) by name. `vitviz.comparison.compare_models` runs
    the same comparisons inside each model's data-set analyses instead (`PairPass`), one forward per model.
    """
    run = PairPass(loaded_a, loaded_b, analyses, options)
    for images_a, images_b in batches:
        _pair_forward(loaded_a.model, images_a, run.blocks_a)
        _pair_forward(loaded_b.model, images_b, run.blocks_b)
        run.after_batch(len(images_a), len(images_b))
        if progress is not None:
            progress(len(images_a))
        del images_a, images_b
    return run.result()


class PairPass:
    """The comparisons named in `analyses` over batches that the caller forwards through both models, handing
    each model's block outputs to `blocks_a` and `blocks_b` (their `consume(layer, x)`), then `after_batch`."""

    def __init__(
        self, loaded_a: LoadedModel, loaded_b: LoadedModel, analyses: Sequence[str], options: AnalysisOptions
    ) -> None:
        context = registry.PairContext(loaded_a, loaded_b, options)
        self.analyses = list(analyses)
        self.by_name: dict[str, Any] = {}
        self.streams: dict[str, registry.PairStream] = {}
        for name in analyses:
            analysis = registry.get(name)
            if not analysis.on_pairs:
                raise VitvizError(f"{name} is an analysis of one model: run it with `python -m vitviz analyze`")
            if analysis.check_model is not None:
                analysis.check_model(loaded_a, options)
                analysis.check_model(loaded_b, options)
            reasons = [
                f"model {side}: {reason}"
                for side, loaded in (("A", loaded_a), ("B", loaded_b))
                if analysis.not_applicable is not None and (reason := analysis.not_applicable(loaded)) is not None
            ]
            if reasons:
                self.by_name[name] = NotApplicable("; ".join(reasons))
            else:
                self.streams[name] = analysis.pair(context)
        self.blocks_a = [c for s in self.streams.values() for c in s.blocks_a]
        self.blocks_b = [c for s in self.streams.values() for c in s.blocks_b]
        self.seen = 0

    def after_batch(self, size_a: int, size_b: int) -> None:
        """Both models have seen the batch (`size_a` and `size_b` images: the same images)."""
        if size_a != size_b:
            raise ValueError(f"a batch holds {size_a} images for model A and {size_b} for model B")
        for stream in self.streams.values():
            stream.after_batch(size_a)
        self.seen += size_a

    def result(self) -> dict[str, Any]:
        if self.seen == 0:
            raise VitvizError("no images to compare the models on")
        self.by_name.update({name: stream.result() for name, stream in self.streams.items()})
        return {name: self.by_name[name] for name in self.analyses}
