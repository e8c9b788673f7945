"""Bench figures for the token analyses ("What tokens carry" in docs/design.md): their memory and their time.

Memory (target <= 1.25): the peak resident memory of `vitviz.pipeline.image_analyses` with the analyses
"tokens" and "features" (what `python -m vitviz analyze --analyses tokens,features` runs), against a plain
forward of the same model, each in a fresh process as `bench.memory` probes it (VmHWM reset after the model is
loaded and the input built). The features' second pass runs nothing at one batch (docs/design.md), so the peak
is the streamed forward's: every layer's attention handed to the prefix-attention consumer one layer at a time,
the block outputs' norms, and the final features' D x D moments.

Time (target <= 1.10): forward + "tokens" (every block's token norms and outliers, attention to the prefix
tokens) against a plain timm forward with fused attention, same batch, in alternating rounds in one process
(`bench.common.paired_timing`, as `bench.capture` does); the figure is the median ratio over the rounds.

Sizes by plan: "full" ViT-L/16 at 384 px batch 1 (memory) and ViT-S/16 at 224 px batch 8 (time), random
weights; "quick" ViT-S/16 at 384 px batch 1 and ViT-Ti/16 batch 4; "tiny" the plan's tiny checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from bench.common import LOWER, Figure, Plan, paired_timing, probe_in_child, random_images
from bench.memory import _current_kib, _peak_kib, _reset_peak
from vitviz.allocator import tune_malloc

logger = logging.getLogger(__name__)

MEMORY_TARGET = 1.25
TIME_TARGET = 1.10
MEMORY_ANALYSES = ("tokens", "features")
TIME_ANALYSES = ("tokens",)
WAYS = ("plain", "tokens-features")


def _sizes(plan: Plan) -> tuple[tuple[str, int], tuple[str, int]]:
    """(memory source, batch) and (time source, batch) for the plan."""
    if plan.label == "full":
        return ("timm:vit_large_patch16_384", 1), ("timm:vit_small_patch16_224", 8)
    if plan.label == "quick":
        return ("timm:vit_small_patch16_384", 1), ("timm:vit_tiny_patch16_224", 4)
    return (plan.memory_source, 1), (plan.memory_source, 2)


def probe(way: str, source: str, batch: int) -> dict[str, Any]:
    """Peak memory of one way, measured in this process (call it in a fresh one)."""
    from vitviz.models import load_model
    from vitviz.pipeline import AnalysisOptions, image_analyses

    loaded = load_model(source)
    images = random_images(batch, loaded.meta)
    gc.collect()
    method = _reset_peak()
    loaded_kib = _current_kib()
    if way == "plain":
        with torch.inference_mode():
            loaded.model(images)
    elif way == "tokens-features":
        results = image_analyses(loaded, images, MEMORY_ANALYSES, AnalysisOptions(batch_size=batch))
        assert results.tokens is not None and results.features is not None
    else:
        raise ValueError(f"unknown way {way!r}; choose from {', '.join(WAYS)}")
    return {"way": way, "peak_kib": _peak_kib(method), "loaded_kib": loaded_kib, "method": method}


def run_probe(way: str, source: str, batch: int) -> dict[str, Any]:
    """Run `probe` in a fresh interpreter and return what it reports."""
    return probe_in_child("bench.tokens", [way, source, str(batch)], f"tokens memory probe {way}")


def _arch(source: str) -> str:
    return source.removeprefix("timm:") if source.startswith("timm:") else Path(source).stem


def memory_figure(source: str, batch: int) -> Figure:
    """Peak of forward + tokens + features over the peak of a plain forward, each in a fresh process."""
    logger.info("tokens memory: %s batch %d", source, batch)
    probes = {way: run_probe(way, source, batch) for way in WAYS}
    plain, measured = probes["plain"], probes["tokens-features"]
    working = {
        f"{way}_working_mib": round((p["peak_kib"] - p["loaded_kib"]) / 1024, 1)
        for way, p in probes.items()
        if p["loaded_kib"] is not None
    }
    return Figure(
        name=f"tokens memory {_arch(source)} batch {batch}: tokens + features",
        value=measured["peak_kib"] / plain["peak_kib"],
        target=MEMORY_TARGET,
        better=LOWER,
        unit="ratio",
        baseline=f"peak of plain inference (fused attention), same process set-up: {plain['peak_kib'] / 1024:.0f} MiB",
        detail={
            "peak_mib": round(measured["peak_kib"] / 1024, 1),
            "plain_peak_mib": round(plain["peak_kib"] / 1024, 1),
            "loaded_mib": round((measured["loaded_kib"] or 0) / 1024, 1),
            **working,
            "method": measured["method"],
            "analyses": list(MEMORY_ANALYSES),
            "source": source,
        },
    )


def time_figure(source: str, batch: int, plan: Plan) -> Figure:
    """Forward + tokens over a plain fused forward, alternating rounds in this process."""
    from bench.capture import fused_attention_on
    from vitviz.models import load_model
    from vitviz.pipeline import AnalysisOptions, image_analyses

    loaded = load_model(source)
    images = random_images(batch, loaded.meta)
    options = AnalysisOptions(batch_size=batch)

    def plain() -> None:
        with torch.inference_mode():
            loaded.model(images)

    def analysed() -> None:
        results = image_analyses(loaded, images, TIME_ANALYSES, options)
        assert results.tokens is not None

    logger.info("tokens time: %s batch %d", source, batch)
    timing = paired_timing(
        plain, analysed, warmup=plan.warmup, repeats=plan.repeats, clock=plan.clock, min_round_s=plan.round_s
    )
    size = "x".join(str(s) for s in loaded.meta.input_size)
    return Figure(
        name=f"tokens time {_arch(source)} {size} batch {batch}: tokens",
        value=timing.ratio,
        target=TIME_TARGET,
        better=LOWER,
        unit="ratio",
        baseline=(
            f"plain timm forward, fused attention, same batch: {timing.baseline_s * 1000:.1f} ms {timing.clock} time"
        ),
        detail={
            **timing.detail(),
            "fused_attention": fused_attention_on(loaded),
            "analyses": list(TIME_ANALYSES),
            "source": source,
        },
    )


def token_figures(plan: Plan, scratch: Path) -> list[Figure]:
    """The figures for plan.label ("full", "quick" or "tiny")."""
    (memory_source, memory_batch), (time_source, time_batch) = _sizes(plan)
    return [memory_figure(memory_source, memory_batch), time_figure(time_source, time_batch, plan)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one peak-memory probe of the token analyses (run by python -m bench)")
    parser.add_argument("way", choices=WAYS)
    parser.add_argument("source")
    parser.add_argument("batch", type=int)
    args = parser.parse_args(argv)
    tune_malloc()  # as python -m bench (and python -m vitviz) run, for every way alike
    print(json.dumps(probe(args.way, args.source, args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
