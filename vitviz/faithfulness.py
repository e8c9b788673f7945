"""Faithfulness of explanation maps: deletion and insertion curves, and the cascading-randomisation sanity check.

Methods: the map methods of vitviz.methods (each gives a raw [gh, gw] map per image, larger = more relevant;
rollout, gradient-rollout, attention-last, integrated-gradients, occlusion, random and whatever else is
registered there). This module asks the registry for maps and wires none itself.

Protocol (Petsiuk et al. 2018, written down exactly so that anyone can reproduce it):
    n = gh*gw patch tokens; patch (i, j) covers pixels [i*sh, (i+1)*sh) x [j*sw, (j+1)*sw) (``layout.stride``:
    for a hybrid the stem's stride). Patches are ordered by the map quantised to 1e-6 of its range
    (round((v - min) / (max - min) * 1e6)), descending, ties to the lower row-major index, so the order does not
    depend on batch size or kernels. Step i = 0..S uses k_i = floor(i*n / S) patches. Deletion: the preprocessed
    image with the first k_i patches set to 0 in normalised space (the model's mean colour). Insertion: an all-0
    normalised image with the first k_i patches restored. Pixels outside the grid, if any, are never deleted
    and never restored. The curve is the softmax probability (float64, from the logits) of the target class,
    by default the class predicted on the clean image. AUC = sum_{i<S} (p_i + p_{i+1}) / (2S). Default
    S = min(n, 50). The 2(S+1) masked inputs of one image are plain forwards under torch.inference_mode, in
    batches of ``batch_size``.

Sanity check (Adebayo et al. 2018, cascading randomisation): on a deep copy of the model, the classifier head
(``get_classifier()``) is randomised, then the blocks from the last to the first, cumulatively. Every parameter
tensor of a randomised module is replaced by normal draws with that tensor's own mean and standard deviation
(sample std; 0 for one element), from one CPU torch.Generator seeded 0, drawn in stage order and, within a stage,
in ``named_parameters`` order. The patch embedding, position embeddings, prefix tokens and final norms are never
randomised. After each stage every method's map is recomputed (target classes fixed to the original ones) and
compared with the original map by Spearman's rank correlation (average ranks for ties), per image and as the
mean over images.
Rollout never reads the head, so its first entry is exactly 1; so is every entry of ``random``.

Public API:
    METHODS, DEFAULT_METHODS, parse_methods(text) -> list of method names
    FaithfulnessOptions(methods, steps, target_class, batch_size, ig_steps, ig_max_steps, sanity)
    run_faithfulness(model, images, names, options) -> FaithfulnessResult (.to_json(model_section); .summary: the
        AUCs' 95% paired-bootstrap intervals and comparisons of vitviz.intervals; MethodResult.convergence: the
        integrated-gradients steps and completeness errors)
    dataset_faithfulness(model, batches, options, ...) -> DatasetFaithfulnessResult: a data set streamed in batches
    explanation_maps(model, images, method, targets, ...) -> [B, gh, gw] float64
    deletion_insertion_curves(model, image, relevance, target, steps, stride) -> (deletion, insertion) [S+1]
    sanity_check(model, images, original_maps, targets, options) -> {method: SanityResult}
    patch_order, quantised_map, step_counts, masked_inputs, curve_auc, spearman, randomise_tensor, cascading_randomisation
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vitviz.errors import VitvizError
from vitviz.intervals import Summary, summarise
from vitviz.method_names import parse_method_list
from vitviz.methods import (
    IG_MAX_STEPS,
    IG_STEPS,
    IG_STEPS_LIMIT,
    IG_TOLERANCE,
    LastLayerAttention,
    MapSettings,
    default_method_names,
    get_method,
    method_names,
)
from vitviz.models import any_training, model_device
from vitviz.tokens import token_layout

logger = logging.getLogger(__name__)

__all__ = [
    "BASELINE",
    "DEFAULT_METHODS",
    "METHODS",
    "Convergence",
    "DatasetFaithfulnessResult",
    "DatasetImage",
    "DatasetMethodResult",
    "FaithfulnessOptions",
    "FaithfulnessResult",
    "ImageCurves",
    "LastLayerAttention",  # re-exported from vitviz.methods
    "MethodResult",
    "SanityResult",
    "cascading_randomisation",
    "curve_auc",
    "dataset_faithfulness",
    "default_steps",
    "deletion_insertion_curves",
    "explanation_maps",
    "masked_inputs",
    "parse_methods",
    "patch_order",
    "quantised_map",
    "randomise_tensor",
    "run_faithfulness",
    "sanity_check",
    "spearman",
    "step_counts",
]

# Snapshots of the registry (vitviz.methods) when this module is imported; parse_methods reads it live.
METHODS = method_names()
DEFAULT_METHODS = default_method_names()
BASELINE = "normalised-zero"  # what deleted patches become and insertion starts from: 0 after normalisation
MAX_DEFAULT_STEPS = 50
ORDER_LEVELS = 1_000_000  # patch_order compares map values quantised to 1e-6 of the map's range
NO_CLASSIFICATION_HEAD = "the model has no classification head: faithfulness follows a class probability"
SANITY_SEED = 0


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """A comma-separated method list (or a sequence of names), checked against the registry; None gives
    DEFAULT_METHODS."""
    return parse_method_list(text, method_names(), default_method_names())


@dataclass(frozen=True)
class FaithfulnessOptions:
    """What to compute; the defaults are the protocol's."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    steps: int | None = None  # S; None = min(n, 50)
    target_class: int | None = None  # None = each image's predicted class
    batch_size: int = 64  # masked inputs per forward; images per map forward; Captum's internal batch
    ig_steps: int = IG_STEPS  # integrated gradients: the first step count (Gauss-Legendre nodes)
    ig_max_steps: int = IG_MAX_STEPS  # integrated gradients: steps are doubled up to this until converged
    sanity: bool = False  # run the cascading randomisation

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(parse_methods(self.methods)))
        if self.steps is not None and self.steps < 1:
            raise VitvizError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise VitvizError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 1 <= self.ig_steps <= IG_STEPS_LIMIT:
            raise VitvizError(f"integrated-gradients steps must be between 1 and {IG_STEPS_LIMIT}, got {self.ig_steps}")
        if not self.ig_steps <= self.ig_max_steps <= IG_STEPS_LIMIT:
            raise VitvizError(
                f"--ig-max-steps must be between --ig-steps ({self.ig_steps}) and {IG_STEPS_LIMIT}, "
                f"got {self.ig_max_steps}"
            )
        if self.target_class is not None and self.target_class < 0:
            raise VitvizError(f"--target-class must be 0 or more, got {self.target_class}")


# ---------------------------------------------------------------- the protocol


def default_steps(num_patches: int) -> int:
    """S = min(n, 50)."""
    return min(num_patches, MAX_DEFAULT_STEPS)


def checked_steps(model: nn.Module, steps: int | None) -> int:
    """S for `model`: `steps`, or the default; refuses a model without class logits and S above its patch count
    (each step deletes at least one more patch, so S <= n; a larger S would only repeat steps, S + 1 at a time)."""
    if int(getattr(model, "num_classes", 0) or 0) < 1:
        raise VitvizError(NO_CLASSIFICATION_HEAD)
    num_patches = token_layout(model).num_patches
    if steps is None:
        return default_steps(num_patches)
    if steps > num_patches:
        raise VitvizError(f"--steps {steps} is more than the model's {num_patches} patches: use at most {num_patches}")
    return steps


def step_counts(num_patches: int, steps: int) -> torch.Tensor:
    """k_i = floor(i*n / S) for i = 0..S: [S+1] long, from 0 to n."""
    if steps < 1:
        raise VitvizError(f"--steps must be at least 1, got {steps}")
    return torch.div(torch.arange(steps + 1, dtype=torch.long) * num_patches, steps, rounding_mode="floor")


def quantised_map(relevance: torch.Tensor) -> torch.Tensor:
    """[n] int64: each value's position on a grid of ORDER_LEVELS steps over the map's range, row-major.

    q = round((v - min) / (max - min) * ORDER_LEVELS); a constant map gives all 0. Two values closer than about
    1/ORDER_LEVELS of the range get the same q, so kernel or batch-size differences of a few ulps in the map
    (a batched matmul sums in another order) cannot swap two patches; only a value that falls within an ulp of
    a rounding boundary can still move, by one level.
    """
    flat = relevance.reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("the map has non-finite values; patches cannot be ordered")
    low, high = flat.min(), flat.max()
    span = high - low
    if not bool(span > 0):
        return torch.zeros(flat.shape, dtype=torch.long)
    return torch.round((flat - low) / span * ORDER_LEVELS).to(torch.long)


def patch_order(relevance: torch.Tensor) -> torch.Tensor:
    """Row-major patch indices [n] by the quantised map (quantised_map), descending, ties to the lower index."""
    return torch.sort(-quantised_map(relevance), stable=True).indices


def _rank_pixels(relevance: torch.Tensor, stride: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[H, W] long: the position in patch_order of the patch covering each pixel; n outside the grid."""
    gh, gw = relevance.shape
    sh, sw = stride
    num_patches = gh * gw
    if size[0] < gh * sh or size[1] < gw * sw:
        raise ValueError(f"an image of {size} is smaller than the {gh}x{gw} grid at stride {stride}")
    order = patch_order(relevance)
    rank = torch.empty(num_patches, dtype=torch.long)
    rank[order] = torch.arange(num_patches)
    pixels = torch.full(size, num_patches, dtype=torch.long)
    pixels[: gh * sh, : gw * sw] = rank.reshape(gh, gw).repeat_interleave(sh, 0).repeat_interleave(sw, 1)
    return pixels


def masked_inputs(
    image: torch.Tensor, relevance: torch.Tensor, counts: torch.Tensor, stride: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deletion and insertion inputs of one image [C, H, W]: two [len(counts), C, H, W] tensors.

    Row i of deletion is the image with its first counts[i] patches (patch_order of ``relevance`` [gh, gw]) set to
    0; row i of insertion is 0 except those patches.
    """
    pixels = _rank_pixels(relevance.detach().cpu(), stride, tuple(image.shape[-2:])).to(image.device)
    chosen = (pixels[None] < counts.to(image.device)[:, None, None])[:, None]  # (S+1, 1, H, W)
    zero = image.new_zeros(())
    return torch.where(chosen, zero, image), torch.where(chosen, image, zero)


def _target_probabilities(model: nn.Module, inputs: torch.Tensor, target: int, batch_size: int) -> torch.Tensor:
    """Softmax probability (float64) of ``target`` for every input, plain forwards in batches."""
    probs = []
    with torch.inference_mode():
        for start in range(0, inputs.shape[0], batch_size):
            logits = model(inputs[start : start + batch_size])
            probs.append(logits.to(torch.float64).softmax(dim=-1)[:, target].cpu())
    return torch.cat(probs)


def deletion_insertion_curves(
    model: nn.Module,
    image: torch.Tensor,
    relevance: torch.Tensor,
    target: int,
    steps: int,
    stride: tuple[int, int],
    *,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves [S+1] float64 of one preprocessed image [C, H, W] under a map [gh, gw].

    The 2(S+1) masked inputs are evaluated together, ``batch_size`` per forward.
    """
    counts = step_counts(relevance.numel(), steps)
    deletion, insertion = masked_inputs(image, relevance, counts, stride)
    probs = _target_probabilities(model, torch.cat([deletion, insertion]), target, batch_size)
    return probs[: steps + 1], probs[steps + 1 :]


def curve_auc(curve: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Trapezoidal area on [0, 1] of a curve of S+1 equally spaced points: sum_{i<S} (p_i + p_{i+1}) / (2S)."""
    if isinstance(curve, torch.Tensor):
        values = curve.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    else:
        values = torch.from_numpy(np.array(curve, dtype=np.float64)).reshape(-1)  # a copy: any strides
    steps = values.numel() - 1
    if steps < 1:
        raise ValueError("a curve needs at least two points")
    return float((values[:-1] + values[1:]).sum() / (2 * steps))


# ---------------------------------------------------------------- maps


def explanation_maps(
    model: nn.Module,
    images: torch.Tensor,
    method: str,
    targets: torch.Tensor,
    *,
    image_indices: Sequence[int] | None = None,
    batch_size: int = 64,
    ig_steps: int = IG_STEPS,
    ig_max_steps: int | None = None,
    diagnostics: dict[str, list[Any]] | None = None,
) -> torch.Tensor:
    """Raw maps [B, gh, gw] float64 (on the CPU) of one method for preprocessed images [B, C, H, W].

    Args:
        targets: [B] long, the class each image is explained for (unused by methods that read no logits).
        image_indices: the seeds of seeded methods (``random``), one per image; default 0..B-1.
        ig_max_steps: integrated gradients' cap on the doubled steps; None: max(ig_steps, IG_MAX_STEPS).
        diagnostics: filled with what the method reports per image (integrated gradients: "ig_steps" and
            "completeness_error").
    """
    (method,) = parse_methods([method])
    cap = max(ig_steps, IG_MAX_STEPS) if ig_max_steps is None else ig_max_steps
    return get_method(method).maps(
        model,
        images,
        targets,
        image_indices=image_indices,
        options=MapSettings(batch_size=batch_size, ig_steps=ig_steps, ig_max_steps=cap),
        diagnostics=diagnostics,
    )


# ---------------------------------------------------------------- sanity check


def randomise_tensor(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Normal draws shaped like ``tensor`` with its mean and (sample) standard deviation; 0 spread for one element.

    Drawn on the CPU from ``generator`` (so the draws do not depend on the device), returned on tensor's device.
    """
    source = tensor.detach().to(torch.float64)
    mean = float(source.mean())
    std = float(source.std()) if source.numel() > 1 else 0.0
    draws = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std + mean
    return draws.to(dtype=tensor.dtype, device=tensor.device)


def _classifier_modules(model: nn.Module) -> list[nn.Module]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    heads = list(head) if isinstance(head, (tuple, list)) else [head]
    heads = [module for module in heads if isinstance(module, nn.Module)]
    if not any(True for module in heads for _ in module.parameters()):
        raise VitvizError(f"{type(model).__name__} has no classifier head with parameters to randomise")
    return heads


def cascading_randomisation(model: nn.Module, *, seed: int = SANITY_SEED) -> Iterator[tuple[str, nn.Module]]:
    """Yield ("head", copy), ("block L-1", copy), ..., ("block 0", copy): one deep copy of ``model``, randomised
    cumulatively a stage at a time (the same copy each time, changed in place; ``model`` is never touched)."""
    work = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    blocks = list(work.blocks)
    stages: list[tuple[str, list[nn.Module]]] = [("head", _classifier_modules(work))]
    stages += [(f"block {index}", [blocks[index]]) for index in reversed(range(len(blocks)))]
    for name, modules in stages:
        with torch.no_grad():
            for module in modules:
                for parameter in module.parameters():
                    parameter.copy_(randomise_tensor(parameter, generator))
        yield name, work


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n (float64) of a 1D tensor, ties given the mean of the ranks they span."""
    ordered, order = torch.sort(values.to(torch.float64), stable=True)
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    average = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(ordered)
    ranks[order] = average[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two maps (flattened), average ranks for ties; NaN if either is constant.

    Identical inputs give exactly 1.0 (the ranks are multiples of 1/2, so the sums below are exact).
    """
    ra = _average_ranks(a.reshape(-1))
    rb = _average_ranks(b.reshape(-1))
    if ra.numel() != rb.numel():
        raise ValueError(f"maps of {ra.numel()} and {rb.numel()} values cannot be compared")
    da, db = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    return float((da * db).sum()) / denominator if denominator > 0 else math.nan


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Convergence:
    """Integrated gradients' convergence over a set of images: per image the steps used and the relative
    completeness error |sum(attr) − (f(x) − f(x0))| / |f(x) − f(x0)| reached (infinite when the gap is 0 and the
    attributions are not). The maps count as converged when the median error is at most ``tolerance``."""

    steps: tuple[int, ...]
    errors: tuple[float, ...]
    start_steps: int
    max_steps: int
    tolerance: float = IG_TOLERANCE

    @property
    def median_error(self) -> float:
        return float(np.median(np.asarray(self.errors, dtype=np.float64)))

    @property
    def converged(self) -> bool:
        return self.median_error <= self.tolerance

    def image_converged(self, index: int) -> bool:
        return self.errors[index] <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {
            "start_steps": self.start_steps,
            "max_steps": self.max_steps,
            "tolerance": self.tolerance,
            "steps": list(self.steps),
            "relative_error": [_finite_or_none(v) for v in self.errors],
            "median_relative_error": _finite_or_none(self.median_error),
            "converged": self.converged,
        }

    @staticmethod
    def from_diagnostics(diagnostics: Mapping[str, Sequence[Any]], options: FaithfulnessOptions) -> Convergence | None:
        """From a method's per-image diagnostics; None for a method that reports no completeness error."""
        if "completeness_error" not in diagnostics:
            return None
        return Convergence(
            steps=tuple(int(v) for v in diagnostics["ig_steps"]),
            errors=tuple(float(v) for v in diagnostics["completeness_error"]),
            start_steps=options.ig_steps,
            max_steps=options.ig_max_steps,
        )


@dataclass(frozen=True)
class ImageCurves:
    """One image under one method."""

    image: str
    target_class: int
    map: torch.Tensor  # [gh, gw] float64, raw
    deletion: torch.Tensor  # [S+1] float64
    insertion: torch.Tensor  # [S+1] float64
    deletion_auc: float
    insertion_auc: float

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "target_class": self.target_class,
            "map": self.map.tolist(),
            "deletion": self.deletion.tolist(),
            "insertion": self.insertion.tolist(),
            "deletion_auc": self.deletion_auc,
            "insertion_auc": self.insertion_auc,
        }


@dataclass(frozen=True)
class MethodResult:
    """One method over all images: mean AUCs (lower deletion and higher insertion are better)."""

    method: str
    deletion_auc: float
    insertion_auc: float
    seconds_per_image: float  # wall time of the map and both curves, per image
    per_image: tuple[ImageCurves, ...]
    convergence: Convergence | None = None  # integrated gradients: steps and completeness error per image

    def to_json(self) -> dict[str, Any]:
        document = {
            "deletion_auc": self.deletion_auc,
            "insertion_auc": self.insertion_auc,
            "seconds_per_image": self.seconds_per_image,
            "per_image": [curves.to_json() for curves in self.per_image],
        }
        if self.convergence is not None:
            document["convergence"] = self.convergence.to_json()
        return document


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class SanityResult:
    """One method under cascading randomisation."""

    method: str
    randomised: tuple[str, ...]  # ("head", "block L-1", ..., "block 0")
    spearman: tuple[float, ...]  # mean over images after each stage; NaN where a map was constant
    per_image_spearman: tuple[tuple[float, ...], ...]  # [B][stages]: each image's Spearman after each stage
    maps: torch.Tensor = field(repr=False)  # [stages, B, gh, gw] float64: the maps after each stage

    def to_json(self) -> dict[str, Any]:
        return {
            "randomised": list(self.randomised),
            "spearman": [_finite_or_none(v) for v in self.spearman],
            "per_image_spearman": [[_finite_or_none(v) for v in row] for row in self.per_image_spearman],
        }


@dataclass(frozen=True)
class FaithfulnessResult:
    """Everything run_faithfulness computed."""

    steps: int
    baseline: str
    target_class: int | None  # None: each image's prediction
    methods: Mapping[str, MethodResult]
    sanity: Mapping[str, SanityResult] | None = None

    @functools.cached_property
    def summary(self) -> Summary:
        """The methods' AUC intervals and paired comparisons over the images (vitviz.intervals)."""
        return _summary(self.methods)

    def to_json(self, model_section: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON document; ``model_section`` is the "model" section as `analyze` writes it."""
        document: dict[str, Any] = {
            "model": dict(model_section),
            "protocol": {
                "steps": self.steps,
                "baseline": self.baseline,
                "target": "predicted" if self.target_class is None else self.target_class,
            },
            "methods": _methods_json(self.methods, self.summary),
            "comparisons": self.summary.to_json(),
        }
        if self.sanity is not None:
            document["sanity"] = {name: result.to_json() for name, result in self.sanity.items()}
        return document


def _summary(methods: Mapping[str, Any]) -> Summary:
    """summarise() of the per-image AUCs of MethodResults or DatasetMethodResults."""
    return summarise(
        {name: [image.deletion_auc for image in method.per_image] for name, method in methods.items()},
        {name: [image.insertion_auc for image in method.per_image] for name, method in methods.items()},
    )


def _methods_json(methods: Mapping[str, Any], summary: Summary) -> dict[str, Any]:
    """Each method's JSON with its AUC intervals beside its AUCs."""
    documents = {}
    for name, method in methods.items():
        document = method.to_json()
        documents[name] = {
            "deletion_auc": document.pop("deletion_auc"),
            "insertion_auc": document.pop("insertion_auc"),
            **summary.interval_json(name),
            **document,
        }
    return documents


# ---------------------------------------------------------------- driver


def _targets(model: nn.Module, images: torch.Tensor, target_class: int | None, batch_size: int) -> torch.Tensor:
    """[B] long on the CPU: ``target_class`` for every image, or each image's predicted class."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if target_class is not None:
        if not 0 <= target_class < num_classes:
            raise VitvizError(f"--target-class {target_class} is out of range: the model has {num_classes} classes")
        return torch.full((images.shape[0],), target_class, dtype=torch.long)
    predicted = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            predicted.append(model(images[start : start + batch_size]).argmax(dim=-1).cpu())
    return torch.cat(predicted)


def run_faithfulness(
    model: nn.Module,
    images: torch.Tensor,
    names: Sequence[str],
    options: FaithfulnessOptions | None = None,
    *,
    image_indices: Sequence[int] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> FaithfulnessResult:
    """Maps, deletion and insertion curves of every method on every image, and optionally the sanity check.

    Args:
        model: a timm VisionTransformer-family classifier in eval mode; it is not changed.
        images: [B, C, H, W] preprocessed images on the model's device.
        names: one label per image for the JSON (e.g. its path).
        image_indices: seeds of the random map, one per image; default 0..B-1.
        progress: called as progress(method, images finished) after each image's curves.
    """
    options = options or FaithfulnessOptions()
    if images.dim() != 4 or images.shape[0] == 0:
        raise VitvizError("faithfulness needs at least one image")
    if len(names) != images.shape[0]:
        raise ValueError(f"{len(names)} names for {images.shape[0]} images")
    if any_training(model):
        raise ValueError("faithfulness needs model.eval()")
    steps = checked_steps(model, options.steps)
    layout = token_layout(model)
    indices = list(range(images.shape[0])) if image_indices is None else list(image_indices)
    targets = _targets(model, images, options.target_class, options.batch_size)

    methods: dict[str, MethodResult] = {}
    originals: dict[str, torch.Tensor] = {}
    for method in options.methods:
        started = time.perf_counter()
        diagnostics: dict[str, list[Any]] = {}
        maps = explanation_maps(
            model,
            images,
            method,
            targets,
            image_indices=indices,
            batch_size=options.batch_size,
            ig_steps=options.ig_steps,
            ig_max_steps=options.ig_max_steps,
            diagnostics=diagnostics,
        )
        per_image = []
        for index in range(images.shape[0]):
            deletion, insertion = deletion_insertion_curves(
                model,
                images[index],
                maps[index],
                int(targets[index]),
                steps,
                layout.stride,
                batch_size=options.batch_size,
            )
            per_image.append(
                ImageCurves(
                    image=str(names[index]),
                    target_class=int(targets[index]),
                    map=maps[index],
                    deletion=deletion,
                    insertion=insertion,
                    deletion_auc=curve_auc(deletion),
                    insertion_auc=curve_auc(insertion),
                )
            )
            if progress is not None:
                progress(method, index + 1)
        elapsed = time.perf_counter() - started
        originals[method] = maps
        methods[method] = MethodResult(
            method=method,
            deletion_auc=sum(c.deletion_auc for c in per_image) / len(per_image),
            insertion_auc=sum(c.insertion_auc for c in per_image) / len(per_image),
            seconds_per_image=elapsed / len(per_image),
            per_image=tuple(per_image),
            convergence=Convergence.from_diagnostics(diagnostics, options),
        )
        logger.debug(  # a data set runs this per batch: its totals are logged once, by dataset_faithfulness
            "%s: deletion AUC %.4f, insertion AUC %.4f",
            method,
            methods[method].deletion_auc,
            methods[method].insertion_auc,
        )

    sanity = None
    if options.sanity:
        sanity = sanity_check(model, images, originals, targets, options, image_indices=indices)
    return FaithfulnessResult(
        steps=steps, baseline=BASELINE, target_class=options.target_class, methods=methods, sanity=sanity
    )


def sanity_check(
    model: nn.Module,
    images: torch.Tensor,
    original_maps: Mapping[str, torch.Tensor],
    targets: torch.Tensor,
    options: FaithfulnessOptions,
    *,
    image_indices: Sequence[int] | None = None,
) -> dict[str, SanityResult]:
    """Cascading randomisation: each method's Spearman correlation with its original map after each stage."""
    stages: list[str] = []
    after: dict[str, list[torch.Tensor]] = {method: [] for method in original_maps}
    for stage, randomised in cascading_randomisation(model):
        stages.append(stage)
        for method in original_maps:
            after[method].append(
                explanation_maps(
                    randomised,
                    images,
                    method,
                    targets,
                    image_indices=image_indices,
                    batch_size=options.batch_size,
                    ig_steps=options.ig_steps,
                    ig_max_steps=options.ig_max_steps,
                )
            )
    results = {}
    for method, original in original_maps.items():
        correlations = []
        per_stage = []
        for maps in after[method]:
            values = [spearman(original[i], maps[i]) for i in range(original.shape[0])]
            per_stage.append(values)
            correlations.append(sum(values) / len(values))
        results[method] = SanityResult(
            method=method,
            randomised=tuple(stages),
            spearman=tuple(correlations),
            per_image_spearman=tuple(zip(*per_stage)),
            maps=torch.stack(after[method]),
        )
    return results


# ---------------------------------------------------------------- a data set, streamed


@dataclass(frozen=True)
class DatasetImage:
    """One image of a data-set run under one method: its numbers, without its map and curves."""

    image: str
    index: int  # position in the slice
    label: int
    target_class: int
    deletion_auc: float
    insertion_auc: float

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "index": self.index,
            "label": self.label,
            "target_class": self.target_class,
            "deletion_auc": self.deletion_auc,
            "insertion_auc": self.insertion_auc,
        }


@dataclass(frozen=True)
class DatasetMethodResult:
    """One method over a data-set slice: mean AUCs, mean curves, and per image its AUCs (no maps, no curves)."""

    method: str
    deletion_auc: float
    insertion_auc: float
    seconds_per_image: float  # wall time of the maps and curves summed over the ranks, per image
    mean_deletion: torch.Tensor  # [S+1] float64, the mean of the images' curves
    mean_insertion: torch.Tensor  # [S+1] float64
    per_image: tuple[DatasetImage, ...]
    convergence: Convergence | None = None  # integrated gradients, in image order

    def to_json(self) -> dict[str, Any]:
        document = {
            "deletion_auc": self.deletion_auc,
            "insertion_auc": self.insertion_auc,
            "seconds_per_image": self.seconds_per_image,
            "mean_deletion": self.mean_deletion.tolist(),
            "mean_insertion": self.mean_insertion.tolist(),
            "per_image": [image.to_json() for image in self.per_image],
        }
        if self.convergence is not None:
            document["convergence"] = self.convergence.to_json()
        return document


@dataclass(frozen=True)
class DatasetFaithfulnessResult:
    """What dataset_faithfulness computed; `dataset` describes the slice (its JSON "dataset" section)."""

    steps: int
    baseline: str
    target_class: int | None
    methods: Mapping[str, DatasetMethodResult]
    dataset: Mapping[str, Any]

    @functools.cached_property
    def summary(self) -> Summary:
        """The methods' AUC intervals and paired comparisons over the images (vitviz.intervals)."""
        return _summary(self.methods)

    def to_json(self, model_section: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "model": dict(model_section),
            "dataset": dict(self.dataset),
            "protocol": {
                "steps": self.steps,
                "baseline": self.baseline,
                "target": "predicted" if self.target_class is None else self.target_class,
            },
            "methods": _methods_json(self.methods, self.summary),
            "comparisons": self.summary.to_json(),
        }


def dataset_faithfulness(
    model: nn.Module,
    batches: Any,
    options: FaithfulnessOptions | None = None,
    *,
    image_name: Callable[[int], str] = str,
    dataset: Mapping[str, Any] | None = None,
    ranks: Any = None,
    progress: Callable[[int], None] | None = None,
) -> DatasetFaithfulnessResult:
    """run_faithfulness over a stream of batches, keeping per image only its AUCs: memory independent of N.

    Args:
        batches: an iterable of vitviz.data.stream.DatasetBatch (images, labels, indices); under torchrun, this
            rank's batches (vitviz.data.stream.dataset_batches).
        image_name: the name of the image at a position of the slice, for the JSON.
        dataset: the slice's description (DatasetSlice.describe()); num_images is added.
        ranks: a vitviz.data.stream.Ranks under torchrun: every rank's per-batch records are gathered and combined
            in image order, so every rank returns what one process would (but for the wall times).
        progress: called with the number of maps finished (images x methods) after each batch.

    Each batch is one run_faithfulness call with the images' positions as the random map's seeds, so an image's
    numbers do not depend on the batch or rank it falls in. The mean AUCs sum the images' AUCs in image order;
    the mean curves add the batches' float64 sums in image order. The sanity check keeps every map of every
    stage and is refused here (run it on --images).
    """
    options = options or FaithfulnessOptions()
    if options.sanity:
        raise VitvizError("--sanity keeps every map of every randomisation stage: run it on --images, not --dataset")
    if any_training(model):
        raise ValueError("faithfulness needs model.eval()")
    steps = checked_steps(model, options.steps)
    device = model_device(model)
    records: list[dict[str, Any]] = []
    for batch in batches:
        if hasattr(batch, "images"):
            images, labels, indices = batch.images, batch.labels, batch.indices
        else:
            images, labels, indices = batch
        positions = [int(i) for i in torch.as_tensor(indices).tolist()]
        result = run_faithfulness(
            model,
            images.to(device),
            [image_name(i) for i in positions],
            options,
            image_indices=positions,
        )
        methods = {}
        for name, method in result.methods.items():
            methods[name] = {
                "targets": [c.target_class for c in method.per_image],
                "deletion_auc": [c.deletion_auc for c in method.per_image],
                "insertion_auc": [c.insertion_auc for c in method.per_image],
                "deletion_sum": torch.stack([c.deletion for c in method.per_image]).sum(dim=0),
                "insertion_sum": torch.stack([c.insertion for c in method.per_image]).sum(dim=0),
                "seconds": method.seconds_per_image * len(positions),
                "convergence": method.convergence,
            }
        labels_list = [int(v) for v in torch.as_tensor(labels).tolist()]
        records.append({"indices": positions, "labels": labels_list, "methods": methods})
        if progress is not None:
            progress(len(positions) * len(options.methods))
        del batch, images, result  # nothing of a batch is held while the next one is read
    parts = ranks.gather(records) if ranks is not None else [records]
    ordered = sorted((r for part in parts for r in part), key=lambda r: r["indices"][0])
    order = [i for r in ordered for i in r["indices"]]
    if not order:
        raise VitvizError("faithfulness needs at least one image")
    if order != list(range(len(order))):
        raise ValueError("the batches do not hold the images 0..N-1 once each, in order")
    count = len(order)
    results: dict[str, DatasetMethodResult] = {}
    for name in options.methods:
        per_image = []
        deletion = ordered[0]["methods"][name]["deletion_sum"].clone()
        insertion = ordered[0]["methods"][name]["insertion_sum"].clone()
        for position, record in enumerate(ordered):
            entry = record["methods"][name]
            if position:
                deletion += entry["deletion_sum"]
                insertion += entry["insertion_sum"]
            for index, label, target, d_auc, i_auc in zip(
                record["indices"], record["labels"], entry["targets"], entry["deletion_auc"], entry["insertion_auc"]
            ):
                per_image.append(DatasetImage(image_name(index), index, label, target, d_auc, i_auc))
        parts_of = [r["methods"][name]["convergence"] for r in ordered]
        convergence = None
        if all(part is not None for part in parts_of):
            convergence = Convergence(
                steps=tuple(v for part in parts_of for v in part.steps),
                errors=tuple(v for part in parts_of for v in part.errors),
                start_steps=options.ig_steps,
                max_steps=options.ig_max_steps,
            )
        results[name] = DatasetMethodResult(
            method=name,
            deletion_auc=sum(image.deletion_auc for image in per_image) / count,
            insertion_auc=sum(image.insertion_auc for image in per_image) / count,
            seconds_per_image=sum(r["methods"][name]["seconds"] for r in ordered) / count,
            mean_deletion=deletion / count,
            mean_insertion=insertion / count,
            per_image=tuple(per_image),
            convergence=convergence,
        )
        logger.info("%s: deletion AUC %.4f, insertion AUC %.4f over %d images", name,
                    results[name].deletion_auc, results[name].insertion_auc, count)  # fmt: skip
    return DatasetFaithfulnessResult(
        steps=steps,
        baseline=BASELINE,
        target_class=options.target_class,
        methods=results,
        dataset={**(dataset or {}), "num_images": count},
    )
