"""python -m bench: measure the speed and memory figures and write them as JSON.

python -m bench                       # the full run recorded in docs/benchmarks.md (10-20 min on 2 cores)
python -m bench --quick               # CI-sized: smaller models and batches, same code paths
python -m bench --tiny --json out.json  # seconds: a tiny model, to keep the benchmark code working
python -m bench --only capture,memory # some families only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import CLOCKS, Figure, Plan, machine_info, scratch_folder, write_tiny_checkpoint
from vitviz.allocator import tune_malloc

logger = logging.getLogger("bench")

FAMILIES = (
    "capture", "families", "extract", "memory", "distance", "tokens", "faithfulness", "train", "finetune", "compare",
    "cli", "app",
)  # fmt: skip


FULL = Plan(
    label="full",
    capture_sources=("timm:vit_small_patch16_224", "timm:vit_base_patch16_224"),
    capture_batches=(1, 8),
    memory_source="timm:vit_large_patch16_384",
    memory_batch=1,
    distance_source="timm:vit_small_patch16_224",
    distance_images=128,
    distance_batch=16,
    train_preset="shapes-default",
    # The preset's data in memory (as the preset trains), but only as many images as the timed steps use,
    # so a bench run does not spend half a minute rendering 144,000 images first.
    train_settings=("data.num_train_samples=4096",),
    train_steps=20,
    train_bf16=True,
    app_source="timm:vit_small_patch16_224",
    app_uploads=5,
    studio_repeats=3,
    warmup=2,
    repeats=7,
)

QUICK = Plan(
    label="quick",
    capture_sources=("timm:vit_tiny_patch16_224",),
    capture_batches=(1, 4),
    memory_source="timm:vit_small_patch16_384",
    memory_batch=1,
    distance_source="timm:vit_tiny_patch16_224",
    distance_images=32,
    distance_batch=16,
    train_preset="shapes-default",
    train_settings=("batch_size=32", "data.num_train_samples=2048"),
    train_steps=8,
    train_bf16=False,
    app_source="timm:vit_tiny_patch16_224",
    app_uploads=2,
    studio_repeats=3,
    warmup=1,
    repeats=5,
)


def tiny_plan(checkpoint: Path) -> Plan:
    """Seconds-long: every figure on a tiny project checkpoint (for tests)."""
    source = str(checkpoint)
    return replace(
        QUICK,
        label="tiny",
        capture_sources=(source,),
        capture_batches=(1, 2),
        memory_source=source,
        distance_source=source,
        distance_images=8,
        distance_batch=4,
        train_preset="tiny",
        train_settings=("data.in_memory=true",),
        train_steps=3,
        app_source=source,
        app_uploads=1,
        studio_repeats=1,
        repeats=3,
        round_s=0.01,
    )


def measure(plan: Plan, families: Sequence[str], scratch: Path) -> list[Figure]:
    """Every figure of the chosen families, in the order of FAMILIES."""
    figures: list[Figure] = []
    if "capture" in families:
        from bench.capture import capture_figure

        for source in plan.capture_sources:
            for batch in plan.capture_batches:
                figures.append(
                    capture_figure(
                        source, batch, warmup=plan.warmup, repeats=plan.repeats, clock=plan.clock, round_s=plan.round_s
                    )
                )
                _log(figures[-1])
    # Each of these modules sizes its own figures from plan.label ("full", "quick" or "tiny").
    if "families" in families:
        from bench.families import family_figures

        _extend(figures, family_figures(plan, scratch))
    if "extract" in families:
        from bench.extract import extract_figures

        _extend(figures, extract_figures(plan))
    if "cli" in families:
        from bench.cli import cli_figures

        _extend(figures, cli_figures(plan))
    if "memory" in families:
        from bench.memory import memory_figures

        _extend(figures, memory_figures(plan.memory_source, plan.memory_batch))
    if "distance" in families:
        from bench.distance import distance_figure

        figures.append(
            distance_figure(
                plan.distance_source,
                plan.distance_images,
                plan.distance_batch,
                warmup=min(plan.warmup, 1),
                repeats=max(3, plan.repeats // 2),
                clock=plan.clock,
            )
        )
        _log(figures[-1])
    if "tokens" in families:
        from bench.tokens import token_figures

        _extend(figures, token_figures(plan, scratch))
    if "faithfulness" in families:
        from bench.faithfulness import faithfulness_figures

        _extend(figures, faithfulness_figures(plan, scratch))
    if "train" in families:
        from bench.train import train_figures

        _extend(figures, train_figures(plan, scratch))
    if "finetune" in families:
        from bench.finetune import finetune_figures

        _extend(figures, finetune_figures(plan, scratch))
    if "compare" in families:
        from bench.compare import compare_figures

        _extend(figures, compare_figures(plan, scratch))
    if "app" in families:
        from bench.app import app_figures, studio_figures

        _extend(figures, app_figures(plan, scratch))
        _extend(figures, studio_figures(plan, scratch))  # the studio on the bundled default, whatever the plan's model
    return figures


def _extend(figures: list[Figure], produced: Iterable[Figure]) -> None:
    """Append each figure a family produces as it comes, logging it."""
    for figure in produced:
        figures.append(figure)
        _log(figure)


def _log(figure: Figure) -> None:
    verdict = {True: "met", False: "MISSED", None: "info"}[figure.met]
    target = "" if figure.target is None else f" (target {'<=' if figure.better == 'lower' else '>='} {figure.target})"
    logger.info("%-70s %8.3f %s%s %s", figure.name, figure.value, figure.unit, target, verdict)


def table(figures: Sequence[Figure]) -> str:
    """A Markdown table of the figures, as docs/benchmarks.md shows them."""
    lines = ["| figure | value | target | result | baseline |", "| --- | --- | --- | --- | --- |"]
    for f in figures:
        target = "—" if f.target is None else f"{'≤' if f.better == 'lower' else '≥'} {f.target:g}"
        verdict = {True: "met", False: "**missed**", None: "info"}[f.met]
        value = f"{f.value:.3f}" if f.unit == "ratio" else f"{f.value:.3f} {f.unit}"
        lines.append(f"| {f.name} | {value} | {target} | {verdict} | {f.baseline} |")
    return "\n".join(lines)


def _families(text: str | None) -> list[str]:
    if text is None:
        return list(FAMILIES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or not names:
        named = ", ".join(unknown) if unknown else repr(text)
        raise SystemExit(f"bench: unknown figure family {named}; choose from {','.join(FAMILIES)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-sized run: small models and batches")
    size.add_argument("--tiny", action="store_true", help="a tiny model, seconds: keeps the code working")
    parser.add_argument("--only", help=f"comma-separated families from {','.join(FAMILIES)} (default: all)")
    parser.add_argument("--json", type=Path, help="write the figures here ('-' for stdout)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch here and in every child process")
    parser.add_argument(
        "--clock", choices=CLOCKS, default="wall",
        help="wall (default) or cpu: CPU time of the process, steadier on a shared machine with --threads 1",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    families = _families(args.only)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("bench: --threads must be at least 1")
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the probes, training runs and app inherit it

    # As python -m vitviz and the app do: the same allocator for the baselines and the measured runs here and
    # in the memory probes (which call it too); VITVIZ_MALLOC=default measures with glibc's own thresholds.
    malloc_set = tune_malloc()
    machine = machine_info()
    machine["malloc"] = "glibc thresholds fixed by vitviz.allocator" if malloc_set else "allocator defaults"
    started = time.perf_counter()
    with scratch_folder() as folder:
        scratch = Path(folder)
        plan = tiny_plan(write_tiny_checkpoint(scratch)) if args.tiny else QUICK if args.quick else FULL
        plan = replace(plan, clock=args.clock)
        figures = measure(plan, families, scratch)
    machine["plan"] = plan.label
    machine["clock"] = plan.clock
    machine["torch_threads"] = torch.get_num_threads()
    with contextlib.suppress(OSError):
        machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["command"] = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    machine["wall_s"] = round(time.perf_counter() - started, 1)
    document = {"machine": machine, "figures": [figure.to_json() for figure in figures]}
    print(table(figures), file=sys.stderr)
    if args.json is not None:
        text = json.dumps(document, indent=2)
        if str(args.json) == "-":
            print(text)
        else:
            args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
