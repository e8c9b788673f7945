"""Bench figures: fine-tuning a timm ViT through the project's fine-tuning path, against a hand-written loop.

step (full, lora)   One training step of `python -m training finetune --from timm:vit_small_patch16_224 --strategy
                    S --dataset shapes ...` (random init, no network): the run is set up exactly as the CLI sets it
                    up (its argument parser, `_config_for`, `_Run.start`: the base model, the new head, the
                    strategy, `Trainer`, the run folder), and each timed call runs one step of the run's own loop
                    (`_Run._train_until`: the batch from memory, `Trainer.train_step` with its seeding, schedule,
                    gradient norm and non-finite guard, the metrics sums and, with `log_every=1`, a metrics.jsonl
                    line and status.json every step). Baseline: a hand-written loop on a deep copy of the same module
                    made before the first step (for LoRA the same peft-wrapped model), over the same in-memory
                    batches: forward, cross-entropy, backward, AdamW step, zero_grad, nothing else. Both use AdamW
                    with the run's lr, betas, eps and weight decay, fp32, no gradient clipping (`grad_clip=none`:
                    the hand loop does not clip; the project still computes the gradient norm for its guard).
                    Rounds alternate the two in this process. Target: project images/s >= 0.95 of the hand loop's.
                    Resume-state saves (every `resume_every` steps, model and optimiser to disk) are set out of the
                    timed steps (`resume_every=100000`): they are periodic I/O, not per-step work.
memory (lora/full)  Peak training memory of the same run with `--strategy lora` over `--strategy full`, same model
                    and batch: each in a fresh process (`python -m bench.finetune memory STRATEGY PLAN`) that sets the
                    run up, prepares its data, resets the kernel's high-water mark (as bench/memory.py does) and runs
                    MEMORY_STEPS steps (AdamW makes its state in the first; the later ones run with it). The value is
                    the ratio of the working memory (peak minus the resident size at the reset: gradients, optimiser
                    state, activations) of the median of MEMORY_PROBES processes per strategy (alternating);
                    the whole-process peaks are in the detail. Target: <= 0.6.
memory, gradient    The same ratio with `--grad-checkpointing` on both runs (each block's activations recomputed
checkpointing       in the backward pass instead of kept: what a user short of memory turns on). Target: <= 0.6.

Sizes by plan: "full" ViT-S/16 at 224 px (196 patches) batch 32; "quick" ViT-S/16 at 112 px (49 patches) batch 32;
"tiny" ViT-S/16 cut to 1 block at 32 px batch 8 (seconds: keeps the code working).
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import HIGHER, LOWER, Figure, Plan, paired_timing, probe_in_child, working_mib

logger = logging.getLogger(__name__)

SOURCE = "timm:vit_small_patch16_224"
STRATEGIES = ("full", "lora")
STEP_TARGET = 0.95
MEMORY_TARGET = 0.6
MEMORY_STEPS = 3
MEMORY_PROBES = 3  # fresh processes per strategy, the median kept: one probe's working memory varies by +-15%
# Set for every measurement: AdamW (the finetune preset's SGD is not what the hand loop runs) at an lr that does
# not blow a randomly initialised ViT up (a skipped non-finite step would do less work), fp32, no clipping, the
# data in memory, a metrics line every step, no resume-state writes among the timed steps.
SETTINGS = (
    "optim.name=adamw",
    "optim.lr=0.0001",
    "grad_clip=none",
    "precision=fp32",
    "data.in_memory=true",
    "data.num_eval_samples=16",
    "log_every=1",
    "resume_every=100000",
)


@dataclass(frozen=True)
class Size:
    img: int  # square input size in pixels (--img-size)
    depth: int | None  # --model-kwargs depth=N (None: the model's own 12)
    batch: int

    def label(self) -> str:
        depth = "" if self.depth is None else f" depth {self.depth}"
        return f"{SOURCE.removeprefix('timm:')}{depth} {self.img}px batch {self.batch}"


SIZES = {"full": Size(224, None, 32), "quick": Size(112, None, 32), "tiny": Size(32, 1, 8)}


def size_of(plan_label: str) -> Size:
    return SIZES.get(plan_label, SIZES["tiny"])


def finetune_argv(strategy: str, size: Size, steps: int, *, checkpointing: bool = False) -> list[str]:
    """The `python -m training finetune` arguments of a run with room for `steps` steps in its first epoch."""
    argv = ["finetune", "--from", SOURCE, "--strategy", strategy, "--dataset", "shapes"]
    if checkpointing:
        argv.append("--grad-checkpointing")
    argv += ["--img-size", str(size.img), str(size.img)]
    if size.depth is not None:
        argv += ["--model-kwargs", f"depth={size.depth}"]
    samples = size.batch * (steps + 2)  # one epoch longer than the steps: no evaluation or checkpoint among them
    for setting in (*SETTINGS, f"batch_size={size.batch}", f"data.num_train_samples={samples}"):
        argv += ["--set", setting]
    return argv


def command_line(argv: list[str]) -> str:
    return "python -m training " + " ".join(argv)


def project_run(argv: list[str], runs_dir: Path, device: str) -> Any:
    """The run `python -m training <argv>` would execute, set up by the CLI's own code, data prepared."""
    from training import distributed
    from training.__main__ import _config_for, build_parser
    from training.engine import RunOptions, _Run

    args = build_parser().parse_args(argv)
    cfg = _config_for(args)
    ctx = distributed.setup(device)
    run = _Run.start(cfg, RunOptions(runs_dir=runs_dir, run_id="bench", device=device), ctx)
    run.feed.prepare()
    return run


def project_step(run: Any) -> Callable[[], None]:
    """One step of the run's own loop per call."""
    from tqdm import tqdm

    from training.engine import _StopRequest

    bar, stop = tqdm(disable=True), _StopRequest()  # never entered: no signal handlers, no stop

    def step() -> None:
        run._train_until(run.position.step + 1, stop, bar)
        if run.ctx.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def hand_written_step(
    module: torch.nn.Module, optim: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> Callable[[], None]:
    """A minimal AdamW step on a deep copy of `module` (taken now), cycling through `batches` (on its device)."""
    model = copy.deepcopy(module).train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
    )  # fmt: skip
    counter = itertools.count()
    cuda = next(model.parameters()).device.type == "cuda"

    def step() -> None:
        images, labels = batches[next(counter) % len(batches)]
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    return step


def step_figure(strategy: str, plan: Plan, scratch: Path) -> Figure:
    """The project's fine-tuning step against the hand-written loop, interleaved in this process."""
    from training.finetune import trainable_parameters

    size = size_of(plan.label)
    warmup, repeats = max(1, plan.warmup), plan.repeats
    device = "cuda" if torch.cuda.is_available() else "cpu"
    argv = finetune_argv(strategy, size, warmup + repeats)
    logger.info("finetune: %s step, %s", strategy, size.label())
    run = project_run(argv, scratch / f"finetune-{strategy}", device)
    pool = [(x.to(run.ctx.device), y.to(run.ctx.device)) for x, y in run.feed.train(0, 0, 4)]  # the run's batches
    hand = hand_written_step(run.trainer.module, run.cfg.optim, pool)  # copied before the project's first step
    project = project_step(run)
    timing = paired_timing(hand, project, warmup=warmup, repeats=repeats, clock=plan.clock)
    if run.guard.skipped_total:
        raise RuntimeError(f"the project's run skipped {run.guard.skipped_total} non-finite steps while timed")
    trainable = trainable_parameters(run.trainer.module)
    del run, hand, project, pool
    gc.collect()
    return Figure(
        name=f"finetune {size.label()} {strategy}: project step vs hand-written AdamW step",
        value=1.0 / timing.ratio,  # measured / baseline is a time ratio; as images/s it inverts
        target=STEP_TARGET,
        better=HIGHER,
        unit="ratio",
        baseline=(
            f"hand-written AdamW loop on a copy of the same {'peft-wrapped ' if strategy == 'lora' else ''}model, "
            f"same batches: {size.batch / timing.baseline_s:.2f} images/s {timing.clock} time"
        ),
        detail={
            **timing.detail(),
            "project_images_per_s": round(size.batch / timing.measured_s, 3),
            "hand_images_per_s": round(size.batch / timing.baseline_s, 3),
            "strategy": strategy,
            "trainable_parameters": trainable,
            "device": device,
            "command": command_line(argv),
        },
    )


def probe(strategy: str, plan_label: str, checkpointing: bool = False) -> dict[str, Any]:
    """Peak memory of MEMORY_STEPS steps of the run (call it in a fresh process)."""
    from bench.memory import _current_kib, _peak_kib, _reset_peak

    size = size_of(plan_label)
    argv = finetune_argv(strategy, size, MEMORY_STEPS, checkpointing=checkpointing)
    with tempfile.TemporaryDirectory(prefix="vitviz-bench-") as folder:
        run = project_run(argv, Path(folder), "cpu")
        step = project_step(run)
        gc.collect()
        method = _reset_peak()
        start_kib = _current_kib()
        for _ in range(MEMORY_STEPS):
            step()
        peak_kib = _peak_kib(method)
    return {"strategy": strategy, "peak_kib": peak_kib, "start_kib": start_kib, "method": method}


def memory_figure(plan: Plan, *, checkpointing: bool = False) -> Figure:
    """LoRA's peak training memory over full fine-tuning's, each in a fresh process (both with gradient
    checkpointing when `checkpointing`)."""
    size = size_of(plan.label)
    extra = ["--grad-checkpointing"] if checkpointing else []
    runs: dict[str, list[dict[str, Any]]] = {strategy: [] for strategy in STRATEGIES}
    for index in range(1 if plan.label == "tiny" else MEMORY_PROBES):
        for strategy in STRATEGIES if index % 2 == 0 else STRATEGIES[::-1]:
            logger.info("finetune: %s memory%s, %s", strategy, ", checkpointing" if checkpointing else "", size.label())
            runs[strategy].append(
                probe_in_child("bench.finetune", ["memory", strategy, plan.label, *extra], f"{strategy} probe")
            )

    def working_of(measured: dict[str, Any]) -> float:
        above = working_mib(measured)  # None without VmRSS: the whole-process peak is all there is
        return measured["peak_kib"] / 1024 if above is None else above

    def median_probe(strategy: str) -> dict[str, Any]:
        ordered = sorted(runs[strategy], key=working_of)
        return ordered[len(ordered) // 2]

    probes = {strategy: median_probe(strategy) for strategy in STRATEGIES}
    lora, full = working_of(probes["lora"]), working_of(probes["full"])
    return Figure(
        name=f"finetune memory {size.label()}: lora vs full, peak training memory"
        + (", both with gradient checkpointing" if checkpointing else ""),
        value=lora / full,
        target=MEMORY_TARGET,
        better=LOWER,
        unit="ratio",
        baseline=f"full fine-tuning's working memory over {MEMORY_STEPS} steps, a fresh process: {full:.0f} MiB",
        detail={
            "lora_working_mib": round(lora, 1),
            "lora_runs_mib": [round(working_of(m), 1) for m in runs["lora"]],
            "full_runs_mib": [round(working_of(m), 1) for m in runs["full"]],
            "full_working_mib": round(full, 1),
            "lora_peak_mib": round(probes["lora"]["peak_kib"] / 1024, 1),
            "full_peak_mib": round(probes["full"]["peak_kib"] / 1024, 1),
            "whole_process_ratio": round(probes["lora"]["peak_kib"] / probes["full"]["peak_kib"], 4),
            "steps": MEMORY_STEPS,
            "method": probes["lora"]["method"],
            "command": command_line(finetune_argv("lora", size, MEMORY_STEPS, checkpointing=checkpointing)),
        },
    )


def finetune_figures(plan: Plan, scratch: Path) -> list[Figure]:
    """The step figure of each strategy, then LoRA's memory against full fine-tuning's, without and with
    gradient checkpointing."""
    return [
        *(step_figure(strategy, plan, scratch) for strategy in STRATEGIES),
        memory_figure(plan),
        memory_figure(plan, checkpointing=True),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one fine-tuning memory probe (run by python -m bench)")
    parser.add_argument("command", choices=["memory"])
    parser.add_argument("strategy", choices=STRATEGIES)
    parser.add_argument("plan", help="the plan label that sizes the run: full, quick or tiny")
    parser.add_argument("--grad-checkpointing", action="store_true", help="both runs recompute block activations")
    args = parser.parse_args(argv)
    from vitviz.allocator import tune_malloc

    tune_malloc()  # as python -m bench runs, for both strategies alike
    print(json.dumps(probe(args.strategy, args.plan, args.grad_checkpointing)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
