"""Map methods: every way vitviz turns a model and an image into a relevance map [gh, gw], declared once.

A method is one decorated function::

    @register_method("rollout", label="Rollout", kind=ATTENTION, needs_attention=True,
                     description="Attention rollout ...", streams_attention=True)
    def _rollout(model, layout): return RolloutAccumulator(layout)

Its name is the ``--methods`` spelling; ``label`` is the short name for tables; ``kind`` one of KINDS;
``needs_attention`` (capture must read every block) and ``needs_logits`` (a classifier head) decide
``not_applicable``, and so does ``applies`` (model -> None or a one-line reason) for what those two cannot say;
``default`` puts it in DEFAULT_METHODS. The function takes a MapBatch (one batch of at most
``batch_size`` preprocessed images, their target classes, the seeds of seeded methods, the token layout and the
options) and returns [b, gh, gw], larger = more relevant. With ``streams_attention=True`` it instead takes
(model, layout) and returns a vitviz.capture consumer whose ``result()`` is [B, gh, gw]: the registry runs the
capture, and several such methods can share one forward (``attention_maps_and_logits``).

Options are read from any object with the attributes a method needs (vitviz.faithfulness.FaithfulnessOptions
has them all); MapSettings holds the defaults: ``batch_size`` (images per forward, Captum's internal batch and
occlusion's perturbations per forward), ``ig_steps`` and ``ig_max_steps`` (integrated gradients' first step count
and the cap of its doubling).

Registered here (the numbers of docs/design.md, "Faithfulness and the Trust page"):
    rollout               attention rollout (vitviz.analysis.rollout, default options: mean fusion, no discard)
    gradient-rollout      Chefer et al.'s generic rule for the target class
    attention-last        the last layer's attention, mean over heads: the class token's row over patch columns,
                          or for a model without a class token the mean of the patch rows over patch columns
    integrated-gradients  integrated gradients of the target logit from the all-zero normalised image (ig_schedule:
                          Gauss-Legendre in log alpha on [1e-7, 1]), steps doubled per image
                          from ig_steps up to ig_max_steps until the relative completeness error is <= 5%;
                          |attribution| summed over channels and over each token's stride x stride pixel block
    occlusion             Captum's Occlusion of the target logit, one window per token (its stride x stride block,
                          all channels) set to 0; the map is the logit drop of each token's block
    random                uniform [0, 1) draws from a torch.Generator seeded by the image's index
    grad-cam              Grad-CAM on the last block's first norm, patch tokens only (vitviz.methods_gradcam)
    attnlrp               AttnLRP relevance of the tokens entering the first block (vitviz.methods_lrp)

Public API:
    register_method(name, ...) -> decorator; unregister_method(name)
    get_method(name) -> MapMethod (unknown: a one-line VitvizError listing the names)
    method_names() -> names in registration order; default_method_names()
    MapMethod.maps(model, images, targets, *, image_indices, options) -> [B, gh, gw] float64 on the CPU
    MapMethod.not_applicable(loaded_or_model) -> None or a one-line reason
    attention_maps_and_logits(model, images, names) -> ({name: [B, gh, gw]}, logits): one capture forward
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from vitviz.analysis.rollout import RolloutAccumulator, gradient_rollout, patch_grid
from vitviz.capture import (
    AttentionConsumer,
    attention_gradients,
    attention_modules,
    capture_attention,
    unreadable_reason,
)
from vitviz.errors import VitvizError
from vitviz.tokens import TokenLayout, token_layout

__all__ = [
    "ATTENTION",
    "BASELINE",
    "GRADIENT",
    "KINDS",
    "PERTURBATION",
    "LastLayerAttention",
    "MapBatch",
    "MapMethod",
    "MapOptions",
    "MapSettings",
    "attention_maps_and_logits",
    "default_method_names",
    "get_method",
    "method_names",
    "register_method",
    "unregister_method",
]

ATTENTION = "attention-based"
GRADIENT = "gradient"
PERTURBATION = "perturbation"
BASELINE = "baseline"
KINDS = (ATTENTION, GRADIENT, PERTURBATION, BASELINE)


IG_STEPS = 50  # integrated gradients: the first step count
IG_MAX_STEPS = 800  # the steps are doubled up to this (50, 100, 200, 400, 800)
IG_STEPS_LIMIT = 8192  # the largest --ig-max-steps accepted
IG_TOLERANCE = 0.05  # the relative completeness error a map must reach
IG_FLOOR = 1e-7  # ig_schedule: Gauss-Legendre in log alpha on [IG_FLOOR, 1]


class MapOptions(Protocol):
    """What the registered methods read; FaithfulnessOptions and MapSettings both have it."""

    batch_size: int
    ig_steps: int
    ig_max_steps: int


@dataclass(frozen=True)
class MapSettings:
    """The options' defaults, for callers that have no FaithfulnessOptions."""

    batch_size: int = 64
    ig_steps: int = IG_STEPS
    ig_max_steps: int = IG_MAX_STEPS


@dataclass(frozen=True)
class MapBatch:
    """One batch handed to a method's function."""

    model: nn.Module
    images: torch.Tensor  # [b, C, H, W] preprocessed, on the model's device
    targets: torch.Tensor  # [b] long, on the images' device: the class each image is explained for
    indices: tuple[int, ...]  # the images' seeds (their positions in the whole set)
    layout: TokenLayout
    options: Any  # a MapOptions; a method may read further attributes with getattr and a default
    # Per-image numbers a method reports beside its maps (name -> one value per image of the batch), which
    # MapMethod.maps concatenates over the batches for a caller that asks (integrated gradients: its steps and
    # completeness error).
    diagnostics: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class MapMethod:
    """One registered method; see the module docstring for the fields."""

    name: str
    label: str
    kind: str
    description: str
    needs_attention: bool
    needs_logits: bool
    default: bool
    streams_attention: bool
    function: Callable[..., Any]
    applies: Callable[[nn.Module], str | None] | None = None

    def _reason(self, module: nn.Module) -> str | None:
        if self.needs_attention:
            reason = unreadable_reason(module)
            if reason is not None:
                return reason
        if self.needs_logits and not int(getattr(module, "num_classes", 0) or 0):
            return f"{type(module).__name__} has no classifier head: {self.name} explains a class logit"
        return None if self.applies is None else self.applies(module)

    def not_applicable(self, model: Any) -> str | None:
        """None when the method can explain ``model`` (an nn.Module or a LoadedModel), else a one-line reason."""
        return self._reason(model if isinstance(model, nn.Module) else model.model)

    def consumer(self, model: nn.Module, layout: TokenLayout) -> AttentionConsumer:
        """A fresh capture consumer (methods registered with streams_attention only)."""
        if not self.streams_attention:
            raise ValueError(f"{self.name} does not stream attention")
        return self.function(model, layout)

    def maps(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        image_indices: Sequence[int] | None = None,
        options: Any = None,
        diagnostics: dict[str, list[Any]] | None = None,
    ) -> torch.Tensor:
        """Raw maps [B, gh, gw] float64 (on the CPU) of preprocessed images [B, C, H, W], ``batch_size`` at a time.

        Args:
            targets: [B] long, the class each image is explained for (unused by methods that read no logits).
            image_indices: the seeds of seeded methods (random), one per image; default 0..B-1.
            options: a MapOptions; default MapSettings().
            diagnostics: filled, when given, with what the method reports per image (MapBatch.diagnostics), each
                list in image order.
        """
        options = MapSettings() if options is None else options
        layout = token_layout(model)
        indices = list(range(images.shape[0])) if image_indices is None else [int(i) for i in image_indices]
        if len(indices) != images.shape[0] or targets.shape[0] != images.shape[0]:
            raise ValueError(f"need one index and one target per image: {images.shape[0]} images")
        if self.needs_attention or self.applies is not None:
            reason = self._reason(model)
            if reason is not None:
                raise VitvizError(reason)
        maps = []
        size = options.batch_size
        for start in range(0, images.shape[0], size):
            batch = images[start : start + size]
            if self.streams_attention:
                consumer = self.consumer(model, layout)
                capture_attention(model, batch, consumer, with_logits=False, stop_after_attention=True)
                maps.append(consumer.result())
                continue
            chosen = targets[start : start + size].to(batch.device)
            part = MapBatch(model, batch, chosen, tuple(indices[start : start + size]), layout, options)
            maps.append(self.function(part))
            if diagnostics is not None:
                for name, values in part.diagnostics.items():
                    diagnostics.setdefault(name, []).extend(values)
        return torch.cat(maps).to(torch.float64).cpu()


_REGISTRY: dict[str, MapMethod] = {}


def register_method(
    name: str,
    *,
    label: str,
    kind: str,
    description: str,
    needs_attention: bool = False,
    needs_logits: bool = False,
    default: bool = True,
    streams_attention: bool = False,
    applies: Callable[[nn.Module], str | None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a map method; the decorated function is returned unchanged."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if not name or "," in name or name != name.strip():
        raise ValueError(f"a method name must be a non-empty --methods spelling without commas: {name!r}")
    if streams_attention and not needs_attention:
        raise ValueError(f"{name} streams attention, so it needs readable attention")

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"a map method named {name} is already registered")
        _REGISTRY[name] = MapMethod(
            name=name,
            label=label,
            kind=kind,
            description=description,
            needs_attention=needs_attention,
            needs_logits=needs_logits,
            default=default,
            streams_attention=streams_attention,
            function=function,
            applies=applies,
        )
        return function

    return decorate


def unregister_method(name: str) -> None:
    """Remove a method (a plug-in's or a test's); unknown names are an error."""
    get_method(name)
    del _REGISTRY[name]


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order (the --methods choices)."""
    return tuple(_REGISTRY)


def default_method_names() -> tuple[str, ...]:
    """The methods run when none are named."""
    return tuple(name for name, method in _REGISTRY.items() if method.default)


def get_method(name: str) -> MapMethod:
    """The method registered as ``name``; otherwise a one-line VitvizError listing the names."""
    method = _REGISTRY.get(name)
    if method is None:
        raise VitvizError(f"unknown method {name}: choose from {','.join(_REGISTRY)}")
    return method


def attention_maps_and_logits(
    model: nn.Module, images: torch.Tensor, names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The maps [B, gh, gw] of attention-streaming methods and the logits [B, classes], from one capture forward
    of the whole batch (the maps are the consumers' results, on the images' device)."""
    methods = [get_method(name) for name in names]
    layout = token_layout(model)
    consumers = {method.name: method.consumer(model, layout) for method in methods}
    logits = capture_attention(model, images, list(consumers.values()))
    assert logits is not None
    return {name: consumer.result() for name, consumer in consumers.items()}, logits


# ---------------------------------------------------------------- the registered methods


class LastLayerAttention:
    """Consumer for vitviz.capture: the last layer's attention, mean over heads, read out over the patch grid.

    Class-token models: row 0 over patch columns; others: the mean of the patch rows over patch columns.
    Several forwards concatenate over images.
    """

    def __init__(self, layout: TokenLayout, last_layer: int) -> None:
        self.layout = layout
        self.last_layer = last_layer
        self._maps: list[torch.Tensor] = []

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        if layer_index != self.last_layer:
            return
        prefix = self.layout.num_prefix_tokens
        if self.layout.has_class_token:
            rows = attn[:, :, 0, :].to(torch.float64).mean(dim=1)  # (B, N)
            self._maps.append(patch_grid(rows, self.layout))
        else:
            patches = attn[:, :, prefix:, prefix:].to(torch.float64).mean(dim=1).mean(dim=1)  # (B, n)
            self._maps.append(patches.reshape(attn.shape[0], *self.layout.grid))

    def result(self) -> torch.Tensor:
        """[B, gh, gw] float64 for every image consumed so far."""
        if not self._maps:
            raise ValueError("no attention of the last layer was consumed")
        return torch.cat(self._maps)


@register_method(
    "rollout",
    label="Rollout",
    kind=ATTENTION,
    description="Attention rollout (Abnar & Zuidema 2020): every layer's attention, mean over heads, multiplied.",
    needs_attention=True,
    streams_attention=True,
)
def _rollout(model: nn.Module, layout: TokenLayout) -> AttentionConsumer:
    return RolloutAccumulator(layout)


@register_method(
    "gradient-rollout",
    label="Gradient rollout",
    kind=GRADIENT,
    description="Chefer et al. 2021: attention weighted by its gradient for the target class.",
    needs_attention=True,
    needs_logits=True,
)
def _gradient_rollout(batch: MapBatch) -> torch.Tensor:
    grads = attention_gradients(batch.model, batch.images, batch.targets)
    return gradient_rollout(grads.attentions, grads.gradients, batch.layout)


@register_method(
    "attention-last",
    label="Last-layer attention",
    kind=ATTENTION,
    description="The last layer's attention of the class token (or the mean patch row), mean over heads.",
    needs_attention=True,
    streams_attention=True,
)
def _attention_last(model: nn.Module, layout: TokenLayout) -> AttentionConsumer:
    return LastLayerAttention(layout, len(attention_modules(model)) - 1)


def _block_sum(pixels: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """[B, H, W] -> [B, gh, gw]: the sum over each token's stride x stride block (pixels off the grid dropped)."""
    gh, gw = layout.grid
    sh, sw = layout.stride
    inside = pixels[:, : gh * sh, : gw * sw]
    return inside.reshape(pixels.shape[0], gh, sh, gw, sw).sum(dim=(2, 4))


def ig_schedule(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Integrated gradients' quadrature: ``steps`` nodes α in (IG_FLOOR, 1) and their weights (float64), for
    ∫_0^1 g(α) dα ≈ Σ_k w_k g(α_k): Gauss-Legendre in u = log α on [log IG_FLOOR, 0], weight w·α.

    A rule uniform in α fails on models whose stem normalises a bias-free convolution (the hybrid's GroupNorm
    after StdConv): f(α·x) is then nearly constant in α except within about 1e-3 of 0, where all of
    f(x) − f(0) happens, and even 2,000 uniform Gauss-Legendre nodes leave a median completeness error near 50%
    there; on the log scale every decade gets its share of nodes. The part below IG_FLOOR is left out (its share
    is at most IG_FLOOR times the largest gradient; the completeness error would show it).
    """
    if steps < 1:
        raise ValueError(f"integrated gradients needs at least one step, got {steps}")
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    low = math.log(IG_FLOOR)
    alphas = np.exp(low + (nodes + 1) / 2 * -low)
    return alphas, weights / 2 * -low * alphas


def integrated_gradients(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, steps: int, batch_size: int
) -> torch.Tensor:
    """Signed attributions [b, C, H, W] float64 of the target logits from the all-zero baseline:
    x · Σ_k w_k ∇f(α_k·x) over ig_schedule(steps), ``batch_size`` (image, node) pairs per forward and backward.
    The model's parameters get no gradients."""
    alphas, weights = ig_schedule(steps)
    device = images.device
    alpha = torch.from_numpy(alphas).to(device=device, dtype=images.dtype)
    weight = torch.from_numpy(weights).to(device=device)
    count = images.shape[0]
    image_of = torch.arange(count, device=device).repeat_interleave(steps)  # image-major (image, node) pairs
    node_of = torch.arange(steps, device=device).repeat(count)
    total = torch.zeros(images.shape, dtype=torch.float64, device=device)
    targets = targets.to(device)
    for start in range(0, count * steps, batch_size):
        which = image_of[start : start + batch_size]
        node = node_of[start : start + batch_size]
        inputs = (alpha[node].view(-1, 1, 1, 1) * images[which]).requires_grad_(True)
        logits = model(inputs).gather(1, targets[which, None])
        (gradients,) = torch.autograd.grad(logits.sum(), inputs)
        total.index_add_(0, which, gradients.to(torch.float64) * weight[node].view(-1, 1, 1, 1))
    return images.to(torch.float64) * total


def completeness_error(attributions: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """[b] float64: |sum(attributions) − gap| / |gap| per image, gap = f(x) − f(x0) of the target logit.

    Captum's convergence delta divided by the logit gap. A gap of exactly 0 gives 0 when the attributions also sum
    to 0, else infinity.
    """
    total = attributions.detach().to(torch.float64).flatten(1).sum(dim=1)
    gap = gap.to(torch.float64)
    error = (total - gap).abs()
    return torch.where(gap != 0, error / gap.abs().clamp_min(torch.finfo(torch.float64).tiny), error * math.inf)


def _target_logit_gap(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[b] float64 on the CPU: the target logit at each image minus at the all-zero baseline."""
    gaps = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            part = images[start : start + batch_size]
            chosen = targets[start : start + batch_size, None].to(part.device)
            at_image = model(part).gather(1, chosen)[:, 0]
            at_zero = model(torch.zeros_like(part)).gather(1, chosen)[:, 0]
            gaps.append((at_image.to(torch.float64) - at_zero.to(torch.float64)).cpu())
    return torch.cat(gaps)


@register_method(
    "integrated-gradients",
    label="Integrated gradients",
    kind=GRADIENT,
    description="Integrated gradients of the target logit from the all-zero normalised image, steps doubled from "
    "50 until the completeness error is at most 5% (slow: 50 to 800 forward and backward passes per image).",
    needs_logits=True,
)
def _integrated_gradients(batch: MapBatch) -> torch.Tensor:
    """Per image: ``ig_steps`` nodes of ig_schedule, doubled while the image's relative completeness error
    exceeds IG_TOLERANCE and the doubled count is at most ``ig_max_steps``; reports ``ig_steps`` and
    ``completeness_error`` per image in ``batch.diagnostics``."""
    steps = batch.options.ig_steps
    cap = max(int(getattr(batch.options, "ig_max_steps", steps)), steps)
    count = batch.images.shape[0]
    used = [steps] * count
    errors = torch.full((count,), math.inf, dtype=torch.float64)
    maps = torch.zeros(count, *batch.layout.grid, dtype=torch.float64)
    with torch.inference_mode(False), torch.enable_grad():
        inputs = batch.images.detach().clone()  # a normal tensor even if the caller's came from inference mode
        gap = _target_logit_gap(batch.model, inputs, batch.targets, batch.options.batch_size)
        pending = list(range(count))
        while True:
            attributions = integrated_gradients(
                batch.model, inputs[pending], batch.targets[pending], steps, batch.options.batch_size
            ).cpu()
            error = completeness_error(attributions, gap[pending])
            maps[pending] = _block_sum(attributions.abs().sum(dim=1), batch.layout)
            for position, index in enumerate(pending):
                used[index] = steps
                errors[index] = error[position]
            pending = [index for index in pending if not bool(errors[index] <= IG_TOLERANCE)]
            if not pending or steps * 2 > cap:
                break
            steps *= 2
    batch.diagnostics["ig_steps"] = used
    batch.diagnostics["completeness_error"] = errors.tolist()
    return maps


@register_method(
    "occlusion",
    label="Occlusion",
    kind=PERTURBATION,
    description="Captum's occlusion: the target logit's drop when each patch is set to 0 (slow: one forward per "
    "patch per image).",
    needs_logits=True,
    default=False,
)
def _occlusion(batch: MapBatch) -> torch.Tensor:
    from captum.attr import Occlusion

    channels = batch.images.shape[1]
    sh, sw = batch.layout.stride
    gh, gw = batch.layout.grid
    with torch.inference_mode(False), torch.no_grad():
        attributions = Occlusion(batch.model).attribute(
            batch.images.detach().clone(),
            sliding_window_shapes=(channels, sh, sw),
            strides=(channels, sh, sw),
            baselines=0.0,
            target=batch.targets.tolist(),
            perturbations_per_eval=batch.options.batch_size,
        )
    # Each window covers one token's block in every channel, so all its pixels hold the same drop.
    return attributions[:, 0, : gh * sh : sh, : gw * sw : sw].to(torch.float64)


@register_method(
    "random",
    label="Random",
    kind=BASELINE,
    description="A uniform random map: the baseline every method should beat.",
)
def _random(batch: MapBatch) -> torch.Tensor:
    maps = [
        torch.rand(batch.layout.grid, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        for index in batch.indices
    ]
    return torch.stack(maps)


# Methods kept in modules of their own register themselves on import (they import this module's names above).
# Methods declared in modules of their own register themselves when imported; they are loaded by name, so that
# they import this module and not the reverse.
METHOD_MODULES = ("vitviz.methods_gradcam", "vitviz.methods_lrp")
for _module in METHOD_MODULES:
    importlib.import_module(_module)
