"""What an analysis declares: its name, options, inputs, streamed computation, JSON section and figures.

An analysis is one `Analysis` value, registered once by the module that defines it (vitviz/analyses/<name>.py);
the CLI's choices, options, JSON and figures, the support survey and the studio's pipeline all iterate the
registry (docs/design.md, "The analysis registry"). This module is light: it imports neither torch nor a
model, so declarations can be read (for `--help`, say) before anything heavy is loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitviz.errors import VitvizError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from vitviz.models import LoadedModel
    from vitviz.tokens import TokenLayout


@dataclass(frozen=True)
class NotApplicable:
    """An analysis that does not apply to this model, and why."""

    reason: str


@dataclass(frozen=True)
class Option:
    """One analysis option: a field of `AnalysisOptions` and the CLI flag `--name-with-dashes`."""

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    check: Callable[[Any], str | None] | None = None  # the problem with a value, in one line, or None
    choices: tuple[str, ...] = ()  # the values it takes, when they are a list (checked when `check` is None)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> None:
        check = self.check or (one_of(self.choices) if self.choices else None)
        problem = check(value) if check is not None else None
        if problem is not None:
            raise VitvizError(f"{self.flag} {problem}, got {value!r}")


@dataclass
class StreamContext:
    """What an image analysis's stream is built from: the model, its token layout, the options and the images."""

    loaded: LoadedModel
    layout: TokenLayout
    options: Any  # AnalysisOptions
    images: Any  # a [B, C, H, W] tensor or a sequence of [C, H, W] tensors, read one batch at a time

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @functools.cached_property
    def attention_depth(self) -> int:
        """Attention layers: the blocks, plus CaiT's class-attention blocks (only the streams that need it ask)."""
        from vitviz.capture import attention_depth

        return attention_depth(self.model)


class Stream:
    """One image analysis while the shared forward runs: what it feeds on, and how it finishes.

    The pipeline runs one forward per batch for every stream together: `attention` consumers receive each
    captured attention map, `blocks` consumers each block's output [B, N, D] (only when the blocks' outputs are
    the model's whole token sequence), `features` the final features. After the forward, `after_batch` sees the
    batch and its logits (None unless a stream set `needs_logits`); `result` gives the typed result at the end.
    """

    attention: Sequence[Any] = ()
    blocks: Sequence[Any] = ()
    features: Callable[[torch.Tensor], None] | None = None
    needs_logits: bool = False
    reports_predictions: bool = False  # it computes each image's softmax probabilities and top-5: `predictions`

    def after_batch(self, batch: torch.Tensor, logits: torch.Tensor | None, blocks_fit: bool) -> None:
        """Called after every batch's forward."""

    def result(self, blocks_unfit: str | None) -> Any:
        """The typed result; `blocks_unfit` says why the blocks' outputs were not the token sequence, if so."""
        raise NotImplementedError

    def predictions(self) -> tuple[np.ndarray, tuple[Any, ...]]:
        """With `reports_predictions`: the softmax probabilities [B, K] float32 and each image's top-5."""
        raise NotImplementedError


class PairStream:
    """One comparison of two models while both run forwards over the same images, batch by batch.

    For every batch, model A's forward hands each of its blocks' outputs (as the model computes them, [b, ...])
    to the `blocks_a` consumers (`consume(layer, x)`), then model B's forward does the same for `blocks_b`, then
    `after_batch(size)` is called with the batch's number of images; `result` gives the typed result at the end.
    """

    blocks_a: Sequence[Any] = ()
    blocks_b: Sequence[Any] = ()

    def after_batch(self, size: int) -> None:
        """Called after both models' forwards of a batch."""

    def result(self) -> Any:
        raise NotImplementedError


@dataclass
class PairContext:
    """What a comparison's stream is built from: both models and the options."""

    loaded_a: LoadedModel
    loaded_b: LoadedModel
    options: Any  # AnalysisOptions


@dataclass(frozen=True)
class FigureContext:
    """What figures are drawn with: the model, and per image its display picture and a file-name stem; for a
    comparison of two models, `loaded` is model A and `other` model B."""

    loaded: LoadedModel
    other: LoadedModel | None = None
    pictures: Sequence[np.ndarray] = ()  # [H, W, 3] in [0, 1], image order
    stems: Sequence[str] = ()  # "000-photo": the figure's file is <kind>-<stem>.png
    names: Sequence[str] = ()  # "photo.png": how titles name the image
    colormap: str = "viridis"  # the colour map of maps and overlays (matplotlib's name), the studio's default

    @property
    def grid(self) -> tuple[int, int]:
        from vitviz.tokens import token_layout

        return tuple(token_layout(self.loaded.model).grid)


Figures = Iterator[tuple[str, Any]]  # (file stem, matplotlib figure)


@dataclass(frozen=True)
class Analysis:
    """One analysis, declared once.

    Exactly one of `compute` (an analysis of the weights: `compute(loaded, options)`), `stream` (an analysis
    of images: `stream(context) -> Stream`) and `pair` (a comparison of two models over the same images:
    `pair(context) -> PairStream`, run by `python -m vitviz compare`) is given.
    """

    name: str  # as --analyses spells it
    section: str  # its key in the JSON
    summary: str  # one line: what it shows
    order: int  # where it comes in the JSON, the CLI's list and the support table
    to_json: Callable[[Any, Sequence[str]], Any]  # (result, image names) -> the section (never NotApplicable)
    compute: Callable[[LoadedModel, Any], Any] | None = None
    stream: Callable[[StreamContext], Stream] | None = None
    pair: Callable[[PairContext], PairStream] | None = None
    default: bool = False  # run when --analyses is not given
    needs_attention: bool = False  # reads attention maps: not applicable where the capture cannot read them
    options: tuple[Option, ...] = ()
    empty: Any = None  # the result when it was not asked for
    not_applicable: Callable[[LoadedModel], str | None] | None = None  # a reason of its own, before any forward
    check_model: Callable[[LoadedModel, Any], None] | None = None  # refuse options that do not fit the model
    figures: Callable[[Any, FigureContext], Figures] | None = None
    over_dataset: bool = False  # streamed over a data set by `analyze --dataset` (a mean, no per-image maps)
    # A comparison's result read back from its `to_arrays()` (the studio's disk cache keeps comparisons so).
    from_arrays: Callable[[Any], Any] | None = None
    uses: tuple[str, ...] = field(default=())  # shared options it reads (target_class), for --help

    def __post_init__(self) -> None:
        if sum(kind is not None for kind in (self.compute, self.stream, self.pair)) != 1:
            raise TypeError(f"analysis {self.name!r}: give exactly one of compute, stream and pair")

    @property
    def on_images(self) -> bool:
        return self.stream is not None

    @property
    def on_pairs(self) -> bool:
        """A comparison of two models (`python -m vitviz compare`), not an analysis of one."""
        return self.pair is not None


def check_target_class(loaded: LoadedModel, options: Any) -> None:
    """Refuse a --target-class the model does not have."""
    num_classes = int(getattr(loaded.model, "num_classes", 0) or 0)
    target = options.target_class
    if target is not None and not 0 <= target < num_classes:
        raise VitvizError(f"--target-class {target} is out of range: the model has {num_classes} classes")


def images_batch(images: Any, start: int, stop: int) -> torch.Tensor:
    """Images start..stop-1 of a [B, C, H, W] tensor or of a sequence of [C, H, W] tensors, as one tensor."""
    import torch

    if isinstance(images, torch.Tensor):
        return images[start:stop]
    return torch.stack([images[index] for index in range(start, stop)])


def at_least(minimum: int) -> Callable[[Any], str | None]:
    """An option check: an integer of at least `minimum`."""
    wording = "must be 0 or more" if minimum == 0 else f"must be at least {minimum}"
    return lambda value: None if isinstance(value, int) and value >= minimum else wording


def one_of(choices: Sequence[str]) -> Callable[[Any], str | None]:
    """An option check: one of `choices`."""
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"
