"""Bench figures: what the faithfulness curves and integrated gradients cost (`vitviz.faithfulness`).

faithfulness curves     `deletion_insertion_curves` of one image: building the 2(S+1) masked inputs, their
                        forwards in batches of ``batch_size`` and the softmax, against plain forwards of the same
                        2(S+1) inputs (built once beforehand) in the same batches under `torch.inference_mode()`.
                        Target: at most 1.10, i.e. masking and reading out the curves cost at most a tenth of the
                        forwards they need. The map is random (content does not change the work), S = min(n, 50).
integrated gradients    `explanation_maps(..., "integrated-gradients")` (Captum, `ig_steps` = 50 interpolation
                        points per image, each a forward and a backward) against plain forwards of the same number
                        of inputs (ig_steps per image) in the same batches: what the backward passes and Captum add.
                        For information; the detail gives seconds per image.
data-set memory         peak resident memory of `python -m vitviz faithfulness MODEL --dataset shapes --split
                        train --limit N` (method rollout, S = 2, --json) and of `python -m vitviz analyze ...
                        --analyses distance,rollout`, each in a fresh child process (`python -m bench.faithfulness
                        COMMAND ARGS...`: imports the libraries, resets the kernel's high-water mark as
                        bench/memory.py does, calls `vitviz.cli.main`, reads VmHWM), for the large N against the
                        small N (full and quick: 1,024 vs 64 images; tiny: 16 vs 4). Target: at most 1.05, i.e. the
                        streamed run does not grow with the number of images. Both sides run the same code path and
                        differ only in --limit; the peak includes the interpreter and libraries (resident at the
                        reset), the model and the run; the detail gives the working memory above the reset.
                        (Without the reset, the peak of importing the libraries hides the run's: a child's
                        ru_maxrss was the same 947 MiB for 64 and 1,024 images.)

Timing: `bench.common.paired_timing`, alternating rounds, the figure is the median of the per-round ratios.
Sizes come from plan.label: "full" the bundled default and hybrid checkpoints (the models the studio ships),
"quick" the bundled default only, "tiny" the plan's tiny checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from bench.common import LOWER, Figure, Plan, paired_timing, probe_in_child, random_images, working_mib
from vitviz.faithfulness import (
    FaithfulnessOptions,
    default_steps,
    deletion_insertion_curves,
    explanation_maps,
    masked_inputs,
    step_counts,
)
from vitviz.models import LoadedModel, load_model
from vitviz.tokens import token_layout

logger = logging.getLogger(__name__)

CURVES_TARGET = 1.10
BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "checkpoints"
BUNDLED_DEFAULT = str(BUNDLED / "shapes-default.safetensors")
BUNDLED_HYBRID = str(BUNDLED / "shapes-hybrid.safetensors")  # the ResNetV2 stem: a dearer forward per token
IG_IMAGES = {"full": 4, "quick": 4, "tiny": 1}
MEMORY_TARGET = 1.05
MEMORY_IMAGES = {"full": (64, 1024), "quick": (64, 1024), "tiny": (4, 16)}  # (baseline, measured) --limit
MEMORY_RUNS = {
    "faithfulness": ("--methods", "rollout", "--steps", "2"),
    "analyze": ("--analyses", "distance,rollout"),
}


def _sources(plan: Plan) -> tuple[str, ...]:
    if plan.label == "full":
        return (BUNDLED_DEFAULT, BUNDLED_HYBRID)
    if plan.label == "quick":
        return (BUNDLED_DEFAULT,)
    return plan.capture_sources[:1]  # tiny: the plan's tiny checkpoint


def _label(source: str, loaded: LoadedModel) -> str:
    name = source.removeprefix("timm:") if source.startswith("timm:") else Path(source).stem
    return f"{name} {'x'.join(str(s) for s in loaded.meta.input_size)}"


def _plain_forwards(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int) -> None:
    with torch.inference_mode():
        for start in range(0, inputs.shape[0], batch_size):
            model(inputs[start : start + batch_size])


def curves_figure(source: str, plan: Plan) -> Figure:
    """One image's deletion and insertion curves vs plain forwards of the same 2(S+1) inputs, same batches."""
    loaded = load_model(source)
    model = loaded.model
    layout = token_layout(model)
    batch_size = FaithfulnessOptions().batch_size
    steps = default_steps(layout.num_patches)
    image = random_images(1, loaded.meta)[0]
    relevance = torch.rand(layout.grid, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    deletion, insertion = masked_inputs(image, relevance, step_counts(layout.num_patches, steps), layout.stride)
    inputs = torch.cat([deletion, insertion])  # the same inputs the curves build, made once for the baseline

    def plain() -> None:
        _plain_forwards(model, inputs, batch_size)

    def curves() -> None:
        deletion_insertion_curves(model, image, relevance, 0, steps, layout.stride, batch_size=batch_size)

    logger.info("faithfulness curves: %s, S = %d", source, steps)
    timing = paired_timing(
        plain, curves, warmup=plan.warmup, repeats=plan.repeats, clock=plan.clock, min_round_s=plan.round_s
    )
    count = inputs.shape[0]
    return Figure(
        name=f"faithfulness curves {_label(source, loaded)}: {count} masked inputs of one image",
        value=timing.ratio,
        target=CURVES_TARGET,
        better=LOWER,
        unit="ratio",
        baseline=(
            f"{count} plain forwards of the same inputs in batches of {batch_size}: "
            f"{timing.baseline_s * 1000:.1f} ms {timing.clock} time"
        ),
        detail={
            **timing.detail(),
            "steps": steps,
            "patches": layout.num_patches,
            "inputs": count,
            "batch_size": batch_size,
            "source": source,
        },
    )


def integrated_gradients_figure(source: str, plan: Plan) -> Figure:
    """Integrated-gradients maps of a few images vs plain forwards of as many inputs as it interpolates."""
    loaded = load_model(source)
    model = loaded.model
    options = FaithfulnessOptions()
    images = random_images(IG_IMAGES.get(plan.label, 2), loaded.meta)
    count = images.shape[0]
    targets = torch.zeros(count, dtype=torch.long)
    interpolated = images.repeat_interleave(options.ig_steps, dim=0)  # ig_steps inputs per image, as IG's

    def plain() -> None:
        _plain_forwards(model, interpolated, options.batch_size)

    def integrated() -> None:
        explanation_maps(
            model,
            images,
            "integrated-gradients",
            targets,
            batch_size=options.batch_size,
            ig_steps=options.ig_steps,
            ig_max_steps=options.ig_steps,  # one pass of ig_steps nodes, like for like with the plain forwards
        )

    logger.info("faithfulness integrated gradients: %s, %d images", source, count)
    timing = paired_timing(plain, integrated, warmup=min(plan.warmup, 1), repeats=plan.repeats, clock=plan.clock)
    return Figure(
        name=f"faithfulness integrated gradients {_label(source, loaded)}: cost per image",
        value=timing.ratio,
        target=None,
        better=LOWER,
        unit="ratio",
        baseline=(
            f"{options.ig_steps} plain forwards per image in batches of {options.batch_size}: "
            f"{timing.baseline_s / count * 1000:.1f} ms per image {timing.clock} time"
        ),
        detail={
            **timing.detail(),
            "seconds_per_image": round(timing.measured_s / count, 5),
            "images": count,
            "ig_steps": options.ig_steps,
            "batch_size": options.batch_size,
            "source": source,
        },
    )


def probe(argv: list[str]) -> dict[str, object]:
    """Peak memory of `python -m vitviz ARGV` run in this process (call it in a fresh one), libraries imported first."""
    import timm  # noqa: F401  (imported before the reset: both sides import the same libraries)

    import vitviz.cli
    import vitviz.data.stream
    import vitviz.faithfulness
    import vitviz.pipeline
    from bench.memory import _current_kib, _peak_kib, _reset_peak

    method = _reset_peak()
    start_kib = _current_kib()
    status = vitviz.cli.main(argv)
    if status != 0:
        raise SystemExit(status)
    return {"peak_kib": _peak_kib(method), "start_kib": start_kib, "method": method}


def run_probe(argv: list[str]) -> dict:
    """`probe(argv)` in a fresh interpreter."""
    return probe_in_child("bench.faithfulness", argv, argv[0])


def limit_memory_figure(
    family: str, argv: list[str], limits: tuple[int, int], scratch: Path, detail: dict[str, Any]
) -> Figure:
    """Peak memory of `python -m vitviz ARGV --limit N --json OUT` (a data-set run) for the large N of `limits`
    over the small one, each a fresh process (`probe`); the figure is named "<family>: <command> --dataset of ..."."""
    small, large = limits
    command = argv[0]

    def run(limit: int) -> dict:
        out = scratch / f"{command}-{limit}.json"
        logger.info("%s: %s --limit %d", family, command, limit)
        probed = run_probe([*argv, "--limit", str(limit), "--json", str(out)])
        out.unlink(missing_ok=True)
        return probed

    small_run, large_run = run(small), run(large)
    baseline, measured = small_run["peak_kib"], large_run["peak_kib"]

    return Figure(
        name=f"{family}: {command} --dataset of {large} vs {small} images",
        value=measured / baseline,
        target=MEMORY_TARGET,
        better=LOWER,
        unit="ratio",
        baseline=f"peak of the same run with --limit {small}, a fresh process: {baseline / 1024:.0f} MiB",
        detail={
            "peak_mib": round(measured / 1024, 1),
            "baseline_peak_mib": round(baseline / 1024, 1),
            "images": large,
            "baseline_images": small,
            "working_mib": working_mib(large_run),
            "baseline_working_mib": working_mib(small_run),
            "method": large_run["method"],
            **detail,
        },
    )


def dataset_memory_figure(command: str, source: str, plan: Plan, scratch: Path) -> Figure:
    """Peak memory of a data-set run of the large --limit against the same run of the small one."""
    name = source.removeprefix("timm:") if source.startswith("timm:") else Path(source).stem
    argv = [command, source, "--dataset", "shapes", "--split", "train", *MEMORY_RUNS[command]]
    limits = MEMORY_IMAGES.get(plan.label, MEMORY_IMAGES["tiny"])
    detail = {"arguments": " ".join(MEMORY_RUNS[command]), "source": source}
    return limit_memory_figure(f"faithfulness memory {name}", argv, limits, scratch, detail)


def faithfulness_figures(plan: Plan, scratch: Path) -> list[Figure]:
    """The figures for plan.label ("full", "quick" or "tiny")."""
    figures = [curves_figure(source, plan) for source in _sources(plan)]
    figures += [integrated_gradients_figure(source, plan) for source in _sources(plan)]
    figures += [dataset_memory_figure(command, _sources(plan)[0], plan, scratch) for command in MEMORY_RUNS]
    return figures


if __name__ == "__main__":
    # python -m bench.faithfulness COMMAND ARGS...: one memory probe of `python -m vitviz COMMAND ARGS...`.
    print(json.dumps(probe(sys.argv[1:])))
