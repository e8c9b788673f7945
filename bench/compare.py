"""Bench figures: what `python -m vitviz compare A B --dataset shapes` costs in time and memory.

time             `vitviz.comparison.compare_models(A, B, ...)` over N images of the shapes training split (what
                 `python -m vitviz compare A B --dataset shapes --split train --limit N` runs between loading the
                 models and writing the JSON), against the two models' plain forwards over the same images: for
                 each model, its batches read from the same data-set stream (`slice_batches`, the batch size
                 compare uses) and forwarded under `torch.inference_mode()`. Both sides read each model's images
                 once. Target: at most 1.15. compare runs one pass (`analysis_pass`): per batch one forward of
                 each model feeds linear CKA, distance and rollout; gradient rollout adds its own forward and
                 backward of each model per batch, which no plain forward pays, so the target cannot be met with
                 it; the figure says by how much it is missed.
time, no         the same pass with gradient rollout left out (CKA, distance and rollout from one forward of each
gradient         model per batch), against the same baseline: what the rest of compare costs.
rollout
parts            (detail of the time figure) seconds of each part, each run once after the timed rounds: reading
                 the images, plain forwards, a plain forward + backward of the predicted logit (the least gradient
                 rollout needs), the comparisons alone (`pair_analyses`: a plain forward of each model), each
                 model's data-set analyses with and without gradient rollout.
memory           peak resident memory of `python -m vitviz compare A B --dataset shapes --split train --limit N
                 --json OUT` for the large N over the small N, each a fresh process that resets the kernel's
                 high-water mark before calling `vitviz.cli.main` (`bench.faithfulness.probe`). Target: at most 1.05.

Models: the bundled shapes-default (A) and shapes-hybrid (B) checkpoints for the full and quick plans; the tiny
plan's checkpoint as both for "tiny". Images: full 1,024 timed and 1,024 vs 64 for memory; quick 256 timed and
1,024 vs 64; tiny 8 timed and 16 vs 4.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import LOWER, Figure, Plan, paired_timing
from bench.faithfulness import BUNDLED_DEFAULT, BUNDLED_HYBRID, limit_memory_figure

logger = logging.getLogger(__name__)

TIME_TARGET = 1.15
TIME_IMAGES = {"full": 1024, "quick": 256, "tiny": 8}
MEMORY_IMAGES = {"full": (64, 1024), "quick": (64, 1024), "tiny": (4, 16)}  # (baseline, measured) --limit
DATASET = ("--dataset", "shapes", "--split", "train")


def sources(plan: Plan) -> tuple[str, str]:
    if plan.label in ("full", "quick"):
        return BUNDLED_DEFAULT, BUNDLED_HYBRID
    return plan.capture_sources[0], plan.capture_sources[0]  # tiny: the plan's checkpoint against itself


def _stem(source: str) -> str:
    return source.removeprefix("timm:") if source.startswith("timm:") else Path(source).stem


class Passes:
    """compare's passes and their baselines over one data-set slice, for two loaded models."""

    def __init__(self, source_a: str, source_b: str, images: int) -> None:
        from vitviz import analyses as registry
        from vitviz.comparison import slice_batches
        from vitviz.data.stream import DatasetSlice
        from vitviz.models import load_model

        self.a, self.b = load_model(source_a), load_model(source_b)
        self.options = registry.AnalysisOptions()  # compare's defaults (the CLI's options)
        data = DatasetSlice.parse(DATASET[1], split=DATASET[3], limit=images)
        self.open_batches, self.names, self.classes = slice_batches(data, [self.a, self.b], self.options.batch_size)

    def _images(self, loaded: Any) -> Any:
        from vitviz.pipeline import _batch_parts

        for batch in self.open_batches(loaded):
            yield _batch_parts(batch)[0]

    def read(self, loaded: Any) -> None:
        for _ in self._images(loaded):
            pass

    def plain(self) -> None:
        """The baseline: each model's plain forward over every image, read from the stream."""
        with torch.inference_mode():
            for loaded in (self.a, self.b):
                for images in self._images(loaded):
                    loaded.model(images)

    def forward_backward(self, loaded: Any) -> None:
        """A forward and the gradient of each image's predicted logit with respect to the input."""
        for images in self._images(loaded):
            x = images.clone().requires_grad_(True)
            logits = loaded.model(x)
            torch.autograd.grad(logits.max(dim=-1).values.sum(), x)

    def compare(self) -> None:
        from vitviz.comparison import compare_models

        compare_models(
            self.a, self.b, self.open_batches, self.options, image_names=self.names, dataset_classes=self.classes
        )

    def pair_pass(self) -> None:
        """The comparisons alone, on plain forwards (`pair_analyses`)."""
        from vitviz import analyses as registry
        from vitviz.pipeline import pair_analyses

        batches = zip(self._images(self.a), self._images(self.b), strict=True)
        pair_analyses(self.a, self.b, batches, registry.pair_names(), self.options)

    def model_pass(self, loaded: Any, analyses: tuple[str, ...]) -> None:
        from vitviz.pipeline import dataset_analyses

        dataset_analyses(loaded, self.open_batches(loaded), list(analyses), self.options)

    def without_gradient(self) -> None:
        """compare's pass with gradient rollout left out."""
        from vitviz.comparison import analysis_pass

        analysis_pass(self.a, self.b, self.open_batches, self.options, ("distance", "rollout"))


ALL = ("distance", "rollout", "gradient-rollout")


def _once(fn: Callable[[], object], clock: Callable[[], float]) -> float:
    gc.collect()
    start = clock()
    fn()
    return round(clock() - start, 4)


def parts(passes: Passes, clock_name: str) -> dict[str, float]:
    """Seconds of each part of compare and of the baselines, each run once."""
    import time

    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    a, b = passes.a, passes.b
    return {
        "read_a_s": _once(lambda: passes.read(a), clock),
        "read_b_s": _once(lambda: passes.read(b), clock),
        "plain_both_s": _once(passes.plain, clock),
        "forward_backward_a_s": _once(lambda: passes.forward_backward(a), clock),
        "forward_backward_b_s": _once(lambda: passes.forward_backward(b), clock),
        "pair_pass_s": _once(passes.pair_pass, clock),
        "model_pass_a_s": _once(lambda: passes.model_pass(a, ALL), clock),
        "model_pass_b_s": _once(lambda: passes.model_pass(b, ALL), clock),
        "model_pass_a_no_gradient_s": _once(lambda: passes.model_pass(a, ALL[:2]), clock),
        "model_pass_b_no_gradient_s": _once(lambda: passes.model_pass(b, ALL[:2]), clock),
        "model_pass_a_gradient_only_s": _once(lambda: passes.model_pass(a, ALL[2:]), clock),
        "model_pass_b_gradient_only_s": _once(lambda: passes.model_pass(b, ALL[2:]), clock),
    }


def time_figures(plan: Plan) -> list[Figure]:
    """compare against the plain forwards, with and without gradient rollout; the parts in the first's detail."""
    source_a, source_b = sources(plan)
    images = TIME_IMAGES.get(plan.label, TIME_IMAGES["tiny"])
    passes = Passes(source_a, source_b, images)
    warmup, repeats = min(plan.warmup, 1), max(3, plan.repeats // 2)
    label = f"{_stem(source_a)} vs {_stem(source_b)}, {images} images"
    logger.info("compare: time, %s", label)
    timing = paired_timing(passes.plain, passes.compare, warmup=warmup, repeats=repeats, clock=plan.clock)
    logger.info("compare: time without gradient rollout, %s", label)
    rest = paired_timing(passes.plain, passes.without_gradient, warmup=warmup, repeats=repeats, clock=plan.clock)
    logger.info("compare: parts, %s", label)
    measured_parts = parts(passes, plan.clock)
    baseline = (
        f"the two models' plain forwards over the same images read from the same stream, batches of "
        f"{passes.options.batch_size}: {timing.baseline_s:.2f} s {timing.clock} time"
    )
    common = {"images": images, "batch_size": passes.options.batch_size, "sources": [source_a, source_b]}
    return [
        Figure(
            name=f"compare time {label}: compare_models vs plain forwards",
            value=timing.ratio,
            target=TIME_TARGET,
            better=LOWER,
            unit="ratio",
            baseline=baseline,
            detail={**timing.detail(), **common, "parts": measured_parts},
        ),
        Figure(
            name=f"compare time {label}: without gradient rollout (CKA, distance and rollout in one pass)",
            value=rest.ratio,
            target=None,
            better=LOWER,
            unit="ratio",
            baseline=f"the same plain forwards: {rest.baseline_s:.2f} s {rest.clock} time",
            detail={**rest.detail(), **common},
        ),
    ]


def memory_figure(plan: Plan, scratch: Path) -> Figure:
    """Peak memory of the CLI's compare over the large --limit against the small one."""
    source_a, source_b = sources(plan)
    limits = MEMORY_IMAGES.get(plan.label, MEMORY_IMAGES["tiny"])
    command = f"python -m vitviz compare {source_a} {source_b} {' '.join(DATASET)} --limit {limits[1]} --json OUT"
    family = f"compare memory {_stem(source_a)} vs {_stem(source_b)}"
    return limit_memory_figure(family, ["compare", source_a, source_b, *DATASET], limits, scratch, {"command": command})


def compare_figures(plan: Plan, scratch: Path) -> list[Figure]:
    """The time figures, then the memory figure."""
    return [*time_figures(plan), memory_figure(plan, scratch)]
