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
from typing import Any

import numpy as np
import torch
from torch import nn

from vitviz.analysis.differences import MapDifferences, map_differences
from vitviz.analysis.distance import DISTANCE_MODES, AttentionDistance, DistanceAccumulator
from vitviz.analysis.filters import components_for_display, filter_pca, filters_applicable, patch_embedding_filters
from vitviz.analysis.position import position_similarity
from vitviz.analysis.rollout import HEAD_FUSIONS, RolloutAccumulator, check_discard_ratio, gradient_rollout
from vitviz.analysis.tokens import (
    FeatureMoments,
    FeatureProjections,
    HeadMapAccumulator,
    LogitLens,
    PrefixAttention,
    TokenNorms,
    block_outputs,
    has_classifier_head,
    mass_threshold_masks,
    token_names,
)
from vitviz.capture import (
    QueryAttention,
    attention_gradients,
    attention_modules,
    capture_attention,
    class_attention_layers,
    unreadable_reason,
)
from vitviz.errors import VitvizError
from vitviz.models import LoadedModel, count_parameters, patch_position_embeddings, resample_input_size
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
    "TOP_K",
    "AnalysisOptions",
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
    "PositionResult",
    "Prediction",
    "Progress",
    "QueryAttentionResult",
    "ResampledPosition",
    "RolloutResult",
    "TokensResult",
    "TopK",
    "attention_not_applicable",
    "dataset_analyses",
    "filters",
    "gradient_rollout_map",
    "image_analyses",
    "image_attention",
    "map_differences",
    "model_card",
    "parse_analyses",
    "position",
    "resampled_position",
    "scaled_for_display",
    "top_k",
]

DEFAULT_ANALYSES = ("filters", "position", "distance", "rollout", "gradient-rollout")  # what no --analyses runs
ANALYSES = (*DEFAULT_ANALYSES, "tokens", "features", "head-maps", "logit-lens")
IMAGE_ANALYSES = ("distance", "rollout", "gradient-rollout", "tokens", "features", "head-maps", "logit-lens")
# The image analyses that read attention (tokens: its prefix attention); the others need only block outputs.
ATTENTION_ANALYSES = ("distance", "rollout", "gradient-rollout", "tokens", "head-maps")
TOP_K = 5  # predictions reported beside a rollout map
NO_POSITION_EMBEDDINGS = "the model has no absolute position embeddings (none or relative positions)"

Progress = Callable[[int, int], None]  # progress(done, total), called after every batch


# --- options -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalysisOptions:
    """Every analysis option, with the papers' defaults; invalid values are refused when the object is made."""

    components: int = 28  # principal components of the patch filters (paper Fig. 7 shows 28)
    distance_mode: str = "paper"  # "paper" (authors' definition) or "renormalised"
    head_fusion: str = "mean"  # rollout: how heads are fused
    discard_ratio: float = 0.0  # rollout: share of the smallest fused entries set to zero, in [0, 1)
    start_layer: int = 0  # rollout: first layer multiplied in
    target_class: int | None = None  # gradient rollout: class c; None = each image's prediction
    batch_size: int = 16  # images per forward
    outlier_factor: float = 2.0  # tokens: a patch token is an outlier above this many times the median norm
    mass_share: float = 0.6  # head maps: share of a head's attention its mask holds (DINO's threshold)

    def __post_init__(self) -> None:
        if self.components < 1:
            raise VitvizError(f"--components must be at least 1, got {self.components}")
        if self.distance_mode not in DISTANCE_MODES:
            raise VitvizError(f"--distance-mode must be one of {', '.join(DISTANCE_MODES)}, got {self.distance_mode!r}")
        if self.head_fusion not in HEAD_FUSIONS:
            raise VitvizError(f"--head-fusion must be one of {', '.join(HEAD_FUSIONS)}, got {self.head_fusion!r}")
        check_discard_ratio(self.discard_ratio)
        if self.start_layer < 0:
            raise VitvizError(f"--start-layer must be 0 or more, got {self.start_layer}")
        if self.batch_size < 1:
            raise VitvizError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not float(self.outlier_factor) > 1.0 or not np.isfinite(self.outlier_factor):
            raise VitvizError(f"--outlier-factor must be a number above 1, got {self.outlier_factor}")
        if not 0.0 < float(self.mass_share) <= 1.0:
            raise VitvizError(f"--mass-share must be in (0, 1], got {self.mass_share}")

    def check_model(self, loaded: LoadedModel, analyses: Sequence[str] = ANALYSES) -> None:
        """Refuse options that do not fit this model (a start layer past the last, a class it does not have)."""
        model = loaded.model
        if "rollout" in analyses:
            depth = _attention_depth(model)
            if self.start_layer >= depth:
                raise VitvizError(f"--start-layer {self.start_layer} is past the last layer ({depth - 1})")
        num_classes = int(getattr(model, "num_classes", 0))
        follows_class = "gradient-rollout" in analyses or ("logit-lens" in analyses and has_classifier_head(model))
        if follows_class and self.target_class is not None and not 0 <= self.target_class < num_classes:
            raise VitvizError(
                f"--target-class {self.target_class} is out of range: the model has {num_classes} classes"
            )


def parse_analyses(text: str | None) -> list[str]:
    """Parse a comma-separated --analyses list; None means DEFAULT_ANALYSES (the paper's five)."""
    if text is None:
        return list(DEFAULT_ANALYSES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ANALYSES]
    if unknown or not names:
        raise VitvizError(f"unknown analysis {', '.join(unknown) or repr(text)}: choose from {','.join(ANALYSES)}")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class NotApplicable:
    """An analysis that does not apply to this model, and why."""

    reason: str


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


def _attention_depth(model: nn.Module) -> int:
    """Attention layers: the blocks, plus CaiT's class-attention blocks (when vitviz reads the attention)."""
    return len(getattr(model, "blocks", [])) if unreadable_reason(model) is not None else len(attention_modules(model))


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


# --- analyses of the weights ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterResult:
    """The raw patch-embedding filters and their top principal components (paper Fig. 7 left)."""

    weight: np.ndarray  # [D, C, P, P] float32, raw
    components: np.ndarray  # [k, C, P, P] float64, unit norm
    explained_variance_ratio: np.ndarray  # [k] float64


def filters(loaded: LoadedModel, components: int | None = None) -> FilterResult | NotApplicable:
    """PCA of the patch-embedding filters: `components` of them (at most what exists; None: all)."""
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
    return components_for_display(torch.from_numpy(np.asarray(arrays))).numpy()


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
    new_model, new_meta = resample_input_size(loaded.model, loaded.meta, tuple(new_size))
    record = new_meta.resolution_history[-1]
    return ResampledPosition(
        position=_position_of(new_model),
        method=str(record.get("method", "")),
        old_grid=tuple(record.get("old_grid", ())),
        new_grid=tuple(record.get("new_grid", ())),
    )


# --- analyses of images --------------------------------------------------------------------------------


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


def top_k(probabilities: np.ndarray | torch.Tensor, class_names: Sequence[str], k: int = TOP_K) -> TopK:
    """The k most probable classes of one image's probabilities [K]; a class without a name is its index."""
    if isinstance(probabilities, torch.Tensor):
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


@dataclass(frozen=True)
class GradientRolloutResult:
    """Gradient-weighted rollout of one image for one class (Chefer et al. 2021), raw."""

    map: np.ndarray  # [gh, gw] float64
    target_class: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"map": self.map, "target": np.asarray(self.target_class)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> GradientRolloutResult:
        return cls(map=np.asarray(arrays["map"]), target_class=int(arrays["target"]))


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


NO_CLASSIFIER_HEAD = "the model has no classification head"
NO_CLASS_LOGITS = "the model has no classification head: it outputs features, not class logits"


def has_class_logits(model: nn.Module) -> bool:
    """Whether the model's output is class logits (gradient rollout differentiates one). Unlike the logit lens,
    which needs one head module applied to tokens, any classifier counts: a distilled model's two heads, or a
    Hugging Face classifier that pools before its head."""
    return int(getattr(model, "num_classes", 0) or 0) > 0


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


@dataclass(frozen=True)
class LogitLensResult:
    """One image's per-patch logit lens: each layer's patch tokens through the final norm and head."""

    probabilities: np.ndarray  # [L, gh, gw] float64: the target class's softmax probability
    target_class: int


@dataclass(frozen=True)
class ImageResults:
    """What the batch loop computed for B images; per-image tuples are in image order (empty when not run).

    An analysis that was asked for but does not apply to the model (its attention cannot be read exactly, or
    its blocks' outputs do not hold the whole token sequence) is NotApplicable with the reason; the others run.
    """

    distance: DistanceResult | NotApplicable | None
    rollouts: tuple[RolloutResult, ...] | NotApplicable
    probabilities: np.ndarray | None  # [B, K] float32 softmax, computed with the rollout's forward
    top5: tuple[TopK, ...]
    gradients: tuple[GradientRolloutResult, ...] | NotApplicable
    queries: tuple[QueryAttentionResult, ...]
    tokens: TokensResult | NotApplicable | None = None
    features: FeaturesResult | None = None
    head_maps: tuple[HeadMapsResult, ...] | NotApplicable = ()
    logit_lens: tuple[LogitLensResult, ...] | NotApplicable = ()

    @property
    def rollout_maps(self) -> np.ndarray | None:
        """The rollout maps stacked, [B, gh, gw], or None when rollout did not run or does not apply."""
        if isinstance(self.rollouts, NotApplicable) or not self.rollouts:
            return None
        return np.stack([r.map for r in self.rollouts])


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _batch(images: torch.Tensor | Sequence[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[start:stop]
    return torch.stack([images[index] for index in range(start, stop)])


def image_analyses(
    loaded: LoadedModel,
    images: torch.Tensor | Sequence[torch.Tensor],
    analyses: Sequence[str],
    options: AnalysisOptions,
    progress: Progress | None = None,
    *,
    query_index: int | None = None,
) -> ImageResults:
    """The image analyses named in `analyses` over all images, `options.batch_size` images per forward.

    One streamed forward per batch feeds distance, rollout (with the logits, for the top-5) and, when
    `query_index` is given, that token's attention; gradient rollout needs its own forward and backward.

    Args:
        images: preprocessed images, a [B, C, H, W] tensor or a sequence of [C, H, W] tensors (read one
            batch at a time, so it may produce them lazily).
        analyses: names from IMAGE_ANALYSES; other names are ignored.
        progress: called as progress(done, total) after every batch.

    One analysis never stops the others: when vitviz cannot read the model's attention exactly
    (`unreadable_reason`), the ATTENTION_ANALYSES asked for are NotApplicable with that reason and the rest run
    on a plain forward; when the blocks' outputs are not the whole token sequence (CaiT), tokens and the logit
    lens are NotApplicable. Only `query_index` with unreadable attention raises (VitvizError, one line).
    """
    total = len(images)
    if total == 0:
        raise VitvizError("no images to analyse")
    requested_analyses = list(analyses)
    options.check_model(loaded, analyses)
    model = loaded.model
    layout = token_layout(model)
    device = _device(model)
    unreadable = attention_not_applicable(loaded)
    if unreadable is not None:
        if query_index is not None:
            raise VitvizError(unreadable.reason)
        skipped = [name for name in ATTENTION_ANALYSES if name in analyses]
        if skipped:
            logger.info("%s not applicable: %s", ", ".join(skipped), unreadable.reason)
        analyses = [name for name in analyses if name not in ATTENTION_ANALYSES]
    distance_acc = (
        DistanceAccumulator(layout, options.distance_mode, class_attention_layers(model))
        if "distance" in analyses
        else None
    )
    rollout_acc = (
        RolloutAccumulator(
            layout,
            head_fusion=options.head_fusion,
            discard_ratio=options.discard_ratio,
            start_layer=options.start_layer,
        )
        if "rollout" in analyses
        else None
    )
    query_acc = QueryAttention(query_index) if query_index is not None else None
    depth = len(getattr(model, "blocks", []))
    norms_acc = TokenNorms(layout, depth, options.outlier_factor) if "tokens" in analyses else None
    attention_depth = _attention_depth(model)  # CaiT: its class-attention layers follow the blocks
    prefix_acc = PrefixAttention(layout, attention_depth) if "tokens" in analyses else None
    head_acc = HeadMapAccumulator(layout, attention_depth) if "head-maps" in analyses else None
    moments = FeatureMoments(layout) if "features" in analyses else None
    lens_applicable = "logit-lens" in analyses and has_classifier_head(model)
    lens = LogitLens(model, layout) if lens_applicable else None
    consumers = [c for c in (distance_acc, rollout_acc, query_acc, prefix_acc, head_acc) if c is not None]
    block_consumers = [c for c in (norms_acc, lens) if c is not None]
    blocks_unfit: list[str] = []  # why the block outputs cannot be read as the token sequence, once known

    def on_block(layer_index: int, x: torch.Tensor) -> None:
        if blocks_unfit:
            return
        if x.ndim != 3:  # SAM: the blocks keep a (windowed) grid [B, h, w, D]
            blocks_unfit.append(f"the blocks' outputs are a {x.ndim}-D grid, not a token sequence")
            return
        if x.shape[1] != layout.num_tokens:
            # CaiT: the blocks run on the patches; the class token joins only in the class-attention blocks.
            blocks_unfit.append(
                f"the blocks' outputs hold {x.shape[1]} tokens, not the model's {layout.num_tokens} "
                "(prefix and patch tokens)"
            )
            return
        for consumer in block_consumers:
            consumer.consume(layer_index, x)

    needs_logits = rollout_acc is not None or (lens is not None and options.target_class is None)
    probabilities: list[np.ndarray] = []
    gradient_maps: list[np.ndarray] = []
    targets: list[int] = []
    for start in range(0, total, options.batch_size):
        stop = min(start + options.batch_size, total)
        batch = _batch(images, start, stop).to(device)
        if consumers or block_consumers or moments is not None:
            # One streamed forward feeds every consumer: attention through the capture, block outputs and the
            # final features through forward hooks.
            with block_outputs(
                model,
                on_block if block_consumers else None,
                moments.consume_features if moments is not None else None,
            ):
                if consumers:
                    logits = capture_attention(model, batch, consumers, with_logits=needs_logits)
                else:  # nothing reads attention: a plain forward feeds the hooks
                    with torch.no_grad():
                        if needs_logits:
                            logits = model(batch)
                        else:
                            model.forward_features(batch)
                            logits = None
            if logits is not None and rollout_acc is not None:
                probabilities.append(logits.float().softmax(dim=-1).cpu().numpy())
            if lens is not None and not blocks_unfit:
                if options.target_class is None:
                    assert logits is not None
                    lens.finish_batch(logits.argmax(dim=-1))
                else:
                    lens.finish_batch(torch.full((batch.shape[0],), options.target_class, dtype=torch.long))
        if "gradient-rollout" in analyses and has_class_logits(model):
            grads = attention_gradients(model, batch, options.target_class)
            gradient_maps.append(gradient_rollout(grads.attentions, grads.gradients, layout).cpu().numpy())
            targets.extend(int(t) for t in torch.as_tensor(grads.target_class).expand(batch.shape[0]).tolist())
        if progress is not None:
            progress(stop, total)

    def not_run(name: str, empty: Any) -> Any:
        """NotApplicable for an attention analysis the model's attention refuses; `empty` when not asked for."""
        return unreadable if unreadable is not None and name in requested else empty

    requested = set(requested_analyses)
    probs = np.concatenate(probabilities) if probabilities else None
    rollouts: tuple[RolloutResult, ...] | NotApplicable = not_run("rollout", ())
    if rollout_acc is not None:
        maps = rollout_acc.result().cpu().numpy()
        rollouts = tuple(
            RolloutResult(
                map=m,
                head_fusion=options.head_fusion,
                discard_ratio=options.discard_ratio,
                start_layer=options.start_layer,
            )
            for m in maps
        )
    queries: tuple[QueryAttentionResult, ...] = ()
    if query_acc is not None:
        rows = query_acc.result().cpu().numpy()  # (L, B, H, N)
        queries = tuple(
            QueryAttentionResult(
                query_index=int(query_index),
                attention=rows[:, b],
                num_prefix_tokens=layout.num_prefix_tokens,
                grid_size=tuple(layout.grid),
            )
            for b in range(rows.shape[1])
        )
    gradients: tuple[GradientRolloutResult, ...] | NotApplicable = not_run("gradient-rollout", ())
    if "gradient-rollout" in analyses and not has_class_logits(model):  # no class logit to differentiate
        gradients = NotApplicable(NO_CLASS_LOGITS)
    if gradient_maps:
        gradients = tuple(
            GradientRolloutResult(map=m, target_class=t) for m, t in zip(np.concatenate(gradient_maps), targets)
        )
    tokens: TokensResult | NotApplicable | None = not_run("tokens", None)
    if norms_acc is not None and prefix_acc is not None:
        tokens = NotApplicable(blocks_unfit[0]) if blocks_unfit else _tokens_result(norms_acc, prefix_acc, layout)
    logit_lens: tuple[LogitLensResult, ...] | NotApplicable = ()
    if lens is not None:
        logit_lens = NotApplicable(blocks_unfit[0]) if blocks_unfit else _logit_lens(lens)
    elif "logit-lens" in requested:
        logit_lens = NotApplicable(NO_CLASSIFIER_HEAD)
    return ImageResults(
        distance=DistanceResult.of(distance_acc.result()) if distance_acc is not None else not_run("distance", None),
        rollouts=rollouts,
        probabilities=probs,
        top5=tuple(top_k(p, loaded.meta.class_names) for p in probs) if probs is not None else (),
        gradients=gradients,
        queries=queries,
        tokens=tokens,
        features=_features_result(model, images, moments, options.batch_size) if moments is not None else None,
        head_maps=_head_maps(head_acc, options.mass_share) if head_acc is not None else not_run("head-maps", ()),
        logit_lens=logit_lens,
    )


def _tokens_result(norms: TokenNorms, prefix: PrefixAttention, layout: TokenLayout) -> TokensResult:
    outliers = norms.outliers()
    return TokensResult(
        norms=norms.norms(),
        token_names=tuple(token_names(layout)),
        prefix_attention=prefix.result(),
        outlier_factor=norms.factor,
        outlier_image=outliers.image,
        outlier_layer=outliers.layer,
        outlier_row=outliers.row,
        outlier_col=outliers.col,
        outlier_norm=outliers.norm,
        outlier_ratio=outliers.ratio,
        num_prefix_tokens=layout.num_prefix_tokens,
        num_images=norms.num_images,
    )


def _features_result(
    model: nn.Module, images: torch.Tensor | Sequence[torch.Tensor], moments: FeatureMoments, batch_size: int
) -> FeaturesResult:
    """The PCA's second pass: the components come from the first pass's moments; every batch but the last (whose
    features the moments still hold) runs forward_features again, and only its projections are kept."""
    pca = moments.pca(3)
    projector = FeatureProjections(token_layout(model), pca)
    total = len(images)
    last_start = (total - 1) // batch_size * batch_size
    assert moments.images == total and moments.latest is not None
    device = _device(model)
    for start in range(0, last_start, batch_size):
        batch = _batch(images, start, min(start + batch_size, total)).to(device)
        with block_outputs(model, None, projector.consume_features), torch.no_grad():
            model.forward_features(batch)
    projector.consume_patches(moments.latest)
    moments.latest = None
    return FeaturesResult(
        explained_variance_ratio=pca.explained_variance_ratio.cpu().numpy(),
        projections=projector.result(),
        components=pca.components.cpu().numpy(),
        mean=pca.mean.cpu().numpy(),
    )


def _head_maps(head_acc: HeadMapAccumulator, mass_share: float) -> tuple[HeadMapsResult, ...]:
    maps = head_acc.result()
    masks = mass_threshold_masks(maps, mass_share)
    return tuple(
        HeadMapsResult(attention=m, masks=k, mass_share=float(mass_share), uses_class_token=head_acc.uses_class_token)
        for m, k in zip(maps, masks)
    )


def _logit_lens(lens: LogitLens) -> tuple[LogitLensResult, ...]:
    maps, targets = lens.result()
    return tuple(LogitLensResult(probabilities=m, target_class=int(t)) for m, t in zip(maps, targets))


@dataclass(frozen=True)
class ImageAttention:
    """One forward over one image: its rollout map, class probabilities and one query token's attention."""

    rollout: RolloutResult
    probabilities: np.ndarray  # [K] float32 softmax
    query: QueryAttentionResult

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
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
DATASET_ANALYSES = ("distance", "rollout", "gradient-rollout")


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
    refused = [name for name in analyses if name in IMAGE_ANALYSES and name not in DATASET_ANALYSES]
    if refused:
        verb = "keeps" if len(refused) == 1 else "keep"
        raise VitvizError(
            f"{', '.join(refused)} {verb} a map per image: run on --images for that; a data-set run computes "
            f"{', '.join(DATASET_ANALYSES)}"
        )
    wanted = [name for name in analyses if name in DATASET_ANALYSES]
    if not wanted:
        raise VitvizError(f"nothing to compute over a data set: ask for one of {', '.join(DATASET_ANALYSES)}")
    options.check_model(loaded, wanted)
    records: list[dict[str, Any]] = []
    for batch in batches:
        images, labels, indices = _batch_parts(batch)
        results = image_analyses(loaded, images, wanted, options)
        records.append(_dataset_record(results, labels, indices))
        if progress is not None:
            progress(len(indices))
        del batch, images, results  # nothing of a batch is held while the next one is read
    parts = ranks.gather(records) if ranks is not None else [records]
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
