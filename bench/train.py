"""Figure 4, train: images/s of `python -m training train` vs a minimal hand-written loop.

Measured: `python -m training train --preset P --set log_every=1 --max-steps W+N` in a fresh process, with
the data in memory (`data.in_memory`, as the shapes presets train); its images/s is the median of the
per-step `images_per_s` it writes to metrics.jsonl, over the N steps after W warm-up steps (each step's
figure covers getting the batch from memory and the step).
Baseline: `python -m bench.train loop RUN_DIR ...`, also a fresh process: the run's resolved config
(config.json) rebuilt with the same factory (same timm model), the same batch size, precision (bf16
autocast or fp32), optimiser settings, label smoothing and gradient clipping, on batches already in memory:
forward, loss, backward, clip, step, nothing else. Rounds alternate the two.

bf16 against fp32: the same comparison with `--set precision=bf16`, plus the engine's bf16 images/s divided
by its fp32 images/s, where the CPU has bf16 instructions (or the GPU supports bf16).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import HIGHER, Figure, Plan, paired_timing

logger = logging.getLogger(__name__)

TARGET = 0.95
_ROOT = Path(__file__).resolve().parent.parent
_POOL_BATCHES = 4  # distinct in-memory batches the loop cycles through


def _python(args: list[str]) -> str:
    done = subprocess.run([sys.executable, *args], cwd=_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(args[:3])} failed with status {done.returncode}: {tail}")
    return done.stdout


def engine_run(preset: str, settings: tuple[str, ...], runs_dir: Path, run_id: str, steps: int, device: str) -> Path:
    """Run the training CLI for `steps` steps with a metrics line per step; returns the run folder."""
    args = ["-m", "training", "train", "--preset", preset, "--runs-dir", str(runs_dir), "--run-id", run_id]
    args += ["--device", device]
    for setting in (*settings, "log_every=1"):
        args += ["--set", setting]
    _python([*args, "--max-steps", str(steps), "--no-progress"])
    return runs_dir / run_id


def engine_images_per_s(run_dir: Path, warmup_steps: int) -> float:
    """Median per-step images/s the engine logged, after the warm-up steps."""
    rates = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "step" and record["step"] > warmup_steps and record.get("images_per_s"):
            rates.append(float(record["images_per_s"]))
    if not rates:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no step records after step {warmup_steps}")
    return statistics.median(rates)


def loop_images_per_s(run_dir: Path, warmup_steps: int, steps: int, device: str) -> float:
    """Images/s of the hand-written loop on the run's config, measured in a fresh process."""
    args = ["-m", "bench.train", "loop", str(run_dir), "--warmup", str(warmup_steps), "--steps", str(steps)]
    out = _python([*args, "--device", device])
    return float(json.loads(out.strip().splitlines()[-1])["images_per_s"])


def hand_written_step(config: dict[str, Any], device: str = "cpu") -> tuple[Callable[[int], None], int]:
    """A minimal training step for the run's config: (step(i), batch size). Forward, loss, backward, clip and
    optimiser step on batches already in memory, nothing else."""
    from vitviz.models import ViTConfig, build_model

    model_cfg = ViTConfig.from_dict(config["model"])
    batch_size = int(config["batch_size"])
    torch.manual_seed(int(config.get("seed", 0)))
    model = build_model(model_cfg).to(device).train()
    optim = config["optim"]
    if optim["name"] == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=optim["lr"], momentum=optim["momentum"], weight_decay=optim["weight_decay"]
        )
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"],
            weight_decay=optim["weight_decay"],
        )  # fmt: skip
    bf16 = config.get("precision") == "bf16"
    images = torch.randn(_POOL_BATCHES, batch_size, model_cfg.in_chans, *model_cfg.img_size, device=device)
    labels = torch.randint(0, model_cfg.num_classes, (_POOL_BATCHES, batch_size), device=device)
    smoothing = float(config.get("label_smoothing", 0.0))
    clip = config.get("grad_clip")

    def step(index: int) -> None:
        batch = index % _POOL_BATCHES
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext():
            logits = model(images[batch])
        loss = F.cross_entropy(logits.float(), labels[batch], label_smoothing=smoothing)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step, batch_size


def hand_written_loop(config: dict[str, Any], warmup_steps: int, steps: int, device: str = "cpu") -> float:
    """Median images/s per step of `hand_written_step` after the warm-up steps."""
    step, batch_size = hand_written_step(config, device)
    rates = []
    for index in range(warmup_steps + steps):
        start = time.perf_counter()
        step(index)
        if index >= warmup_steps:
            rates.append(batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def engine_step(config: dict[str, Any], device: str = "cpu") -> Callable[[int], None]:
    """`Trainer.train_step` of the engine for the run's config, on batches already in memory."""
    from training import distributed
    from training.config import TrainConfig
    from training.engine import Trainer
    from vitviz.models import build_model

    cfg = TrainConfig.from_dict(config)
    torch.manual_seed(cfg.seed)
    vit = build_model(cfg.model)
    ctx = distributed.setup(device)
    assert cfg.data.mean is not None and cfg.data.std is not None  # a resolved config has them
    trainer = Trainer(cfg, vit, ctx, mean=cfg.data.mean, std=cfg.data.std, total_steps=10**6, warmup_steps=0)
    images = torch.randn(_POOL_BATCHES, cfg.batch_size, cfg.model.in_chans, *cfg.model.img_size)
    labels = torch.randint(0, cfg.model.num_classes, (_POOL_BATCHES, cfg.batch_size))

    def step(index: int) -> None:
        trainer.train_step(images[index % _POOL_BATCHES], labels[index % _POOL_BATCHES], index)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def step_figure(run_dir: Path, plan: Plan, device: str) -> Figure:
    """Diagnostic: the engine's train_step alone vs the hand-written step, interleaved in this process."""
    config = json.loads((run_dir / "config.json").read_text())
    engine, batch_size = engine_step(config, device), int(config["batch_size"])
    loop, _ = hand_written_step(config, device)
    counter = iter(range(10**9))
    timing = paired_timing(
        lambda: loop(next(counter)), lambda: engine(next(counter)), warmup=max(1, plan.warmup), repeats=plan.repeats
    )
    # measured / baseline is a time ratio; as a speed (images/s) ratio it inverts
    return Figure(
        name=f"train step only (Trainer.train_step, in-memory batches) {config['precision']}",
        value=1.0 / timing.ratio,
        target=None,
        better=HIGHER,
        unit="ratio",
        baseline=f"the hand-written step in the same process: {batch_size / timing.baseline_s:.1f} images/s",
        detail={**timing.detail(), "note": "isolates the engine's step from its data pipeline"},
    )


def _bf16_available() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_figures(plan: Plan, scratch: Path) -> list[Figure]:
    """Engine vs hand-written loop in fp32 (and bf16 where supported), and bf16 vs fp32 of the engine."""
    warmup = max(1, plan.warmup)
    steps = plan.train_steps
    rounds = max(1, plan.repeats // 3)
    precisions = ["fp32"] + (["bf16"] if plan.train_bf16 and _bf16_available() else [])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    figures: list[Figure] = []
    engine_rates: dict[str, float] = {}
    step_figures: list[Figure] = []
    for precision in precisions:
        settings = (*plan.train_settings, f"precision={precision}")
        ratios, engine, loop = [], [], []
        for round_index in range(rounds):
            run_id = f"bench-{precision}-{round_index}"
            logger.info("train: %s %s round %d", plan.train_preset, precision, round_index + 1)
            run_dir = engine_run(plan.train_preset, settings, scratch / "runs", run_id, warmup + steps, device)
            engine.append(engine_images_per_s(run_dir, warmup))
            loop.append(loop_images_per_s(run_dir, warmup, steps, device))
            ratios.append(engine[-1] / loop[-1])
        engine_rates[precision] = statistics.median(engine)
        step_figures.append(step_figure(scratch / "runs" / f"bench-{precision}-0", plan, device))
        config = json.loads((scratch / "runs" / f"bench-{precision}-0" / "config.json").read_text())
        model = config["model"]
        shape = f"D{model['embed_dim']} L{model['depth']} {model['img_size'][0]}px"
        figures.append(
            Figure(
                name=f"train {plan.train_preset} ({shape}) batch {config['batch_size']} {precision}",
                value=statistics.median(ratios),
                target=TARGET,
                better=HIGHER,
                unit="ratio",
                baseline=(
                    f"hand-written loop, same model/batch/precision, in-memory batches: "
                    f"{statistics.median(loop):.1f} images/s"
                ),
                detail={
                    "engine_images_per_s": [round(v, 2) for v in engine],
                    "loop_images_per_s": [round(v, 2) for v in loop],
                    "round_ratios": [round(v, 4) for v in ratios],
                    "dataset": config["data"]["dataset"],
                    "device": device,
                    "steps": steps,
                    "warmup_steps": warmup,
                },
            )
        )
    figures.extend(step_figures)
    if "bf16" in engine_rates:
        figures.append(
            Figure(
                name=f"train {plan.train_preset} bf16 autocast vs fp32 (engine images/s, {device})",
                value=engine_rates["bf16"] / engine_rates["fp32"],
                target=None,
                better=HIGHER,
                unit="ratio",
                baseline=f"the engine in fp32: {engine_rates['fp32']:.1f} images/s",
                detail={"bf16_images_per_s": round(engine_rates["bf16"], 2)},
            )
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the hand-written training loop (run by python -m bench)")
    parser.add_argument("command", choices=["loop"])
    parser.add_argument("run_dir", type=Path, help="a run folder whose config.json the loop copies")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    config = json.loads((args.run_dir / "config.json").read_text())
    rate = hand_written_loop(config, args.warmup, args.steps, args.device)
    print(json.dumps({"images_per_s": rate}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
