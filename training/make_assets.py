"""Re-create every bundled checkpoint and sample image from the presets: ``python -m training.make_assets``.

Each bundled checkpoint is the last checkpoint of one run of a preset, trained by the project's own
``python -m training`` command line; the runs happen one after the other, each is evaluated on the held-out
test split, and the script prints every step's wall time and CPU time and a table of the results:

    python -m training.make_assets                                  # everything
    python -m training.make_assets --only shapes-default shapes-finetune-hires
    python -m training.make_assets --samples-only                   # just assets/samples and assets/masks

Runs are written to runs/assets/<name>/ (``--runs-dir``); an existing finished run is reused unless
``--retrain`` is given, so a second call only copies and evaluates. Each training process gets every
core as compute threads (``--threads``; the shapes presets prepare their images in memory first, with two
DataLoader workers), so the runs should have the machine to themselves: on a 2-core machine that other work
also uses, two OpenMP threads spin against the busy second core and a step gets several times slower (then
pass ``--threads 1``). docs/training.md records the measured times.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.mnist import BUNDLED_ROOT as BUNDLED_MNIST_ROOT
from vitviz.fileio import atomic_path

logger = logging.getLogger("training.make_assets")

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS_DIR = REPO_ROOT / "assets" / "checkpoints"
SAMPLES_DIR = REPO_ROOT / "assets" / "samples"
MASKS_DIR = REPO_ROOT / "assets" / "masks"

# Sample images: test-split image i of every class (labels cycle, so image i has class i), at the
# default model's input size, as assets/samples/<class>.png; its object mask is assets/masks/<class>.png,
# kept out of the samples folder so that no mask is ever taken for an image to analyse.
SAMPLE_IMG_SIZE = (64, 64)
SAMPLE_SEED = 0


# The 2,000 MNIST test digits that no MNIST run trains on (they train on test[:8000]), wherever the script runs.
MNIST_HELD_OUT = ("--dataset", "mnist", "--root", str(BUNDLED_MNIST_ROOT), "--split", "test[8000:]")


@dataclass(frozen=True)
class Bundle:
    """One bundled checkpoint: the run that makes it and how it is evaluated."""

    name: str  # file stem in assets/checkpoints and the run id
    command: tuple[str, ...]  # `python -m training` arguments before the run options
    finetunes: str | None = None  # the bundle whose last checkpoint this run fine-tunes
    base: str | None = None  # the bundled checkpoint (a stem in assets/checkpoints) this run fine-tunes
    snapshots: tuple[int, ...] = ()  # epochs also bundled as <name>-epoch-NNN.safetensors
    eval_args: tuple[str, ...] = ("--dataset", "shapes", "--split", "test")


def bundled_source(stem: str) -> str:
    """A bundled checkpoint as a fine-tune's `--from`: relative to the repository root, where every run starts,
    so that the lineage it records (base_source) names the same file on every machine and the studio finds it."""
    return f"assets/checkpoints/{stem}.safetensors"


BUNDLES: tuple[Bundle, ...] = (
    Bundle("shapes-default", ("train", "--preset", "shapes-default"), snapshots=(1, 2, 4)),
    Bundle("shapes-finetune-hires", ("finetune", "--preset", "shapes-finetune-hires"), finetunes="shapes-default"),
    Bundle("shapes-2d", ("train", "--preset", "shapes-2d")),
    Bundle("shapes-sincos", ("train", "--preset", "shapes-sincos")),
    Bundle("shapes-nopos", ("train", "--preset", "shapes-nopos")),
    Bundle("shapes-hybrid", ("train", "--preset", "shapes-hybrid")),
    Bundle("shapes-reg4", ("train", "--preset", "shapes-reg4")),
    Bundle("mnist-small", ("train", "--preset", "mnist-small"), eval_args=MNIST_HELD_OUT),
    # One task, three strategies: the bundled default fine-tuned onto MNIST digits (docs/training.md).
    *(
        Bundle(name, ("finetune", "--preset", name), base="shapes-default", eval_args=MNIST_HELD_OUT)
        for name in ("shapes-to-mnist-linear", "shapes-to-mnist-lora", "shapes-to-mnist-full")
    ),
)


@dataclass(frozen=True)
class StepTimes:
    wall_s: float
    cpu_s: float  # user + system time of the child processes


def _run(args: Sequence[str], threads: int) -> StepTimes:
    """Run `python -m training ARGS` from the repository root with `threads` compute threads; raise if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "training", *args]
    logger.info("$ %s", " ".join(command[1:]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise SystemExit(f"error: `{' '.join(command[1:])}` failed with status {completed.returncode}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return StepTimes(wall, cpu)


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    except (OSError, ValueError, KeyError):
        return False


def _copy(source: Path, target: Path) -> None:
    """Copy through a temporary file beside the target, then rename, so the app never sees half a file."""
    with atomic_path(target) as partial:
        shutil.copyfile(source, partial)


def make_bundle(bundle: Bundle, runs_dir: Path, *, retrain: bool, threads: int) -> dict[str, object]:
    """Train (or reuse) the bundle's run, copy its checkpoints into assets/ and evaluate it on the test split."""
    run_dir = runs_dir / bundle.name
    times = StepTimes(float("nan"), float("nan"))
    if retrain or not _finished(run_dir):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        args = list(bundle.command)
        if bundle.finetunes is not None:
            args += ["--from", str(runs_dir / bundle.finetunes / "last.safetensors")]
        elif bundle.base is not None:
            args += ["--from", bundled_source(bundle.base)]
        args += ["--runs-dir", str(runs_dir), "--run-id", bundle.name, "--no-progress"]
        times = _run(args, threads)
        logger.info("%s: trained in %.0f s wall, %.0f s CPU", bundle.name, times.wall_s, times.cpu_s)
    else:
        logger.info("%s: reusing the finished run in %s", bundle.name, run_dir)

    CHECKPOINTS_DIR.mkdir(parents=True, exist_ok=True)
    _copy(run_dir / "last.safetensors", CHECKPOINTS_DIR / f"{bundle.name}.safetensors")
    # The studio draws a bundled checkpoint's training curves from <stem>.metrics.jsonl beside it.
    _copy(run_dir / "metrics.jsonl", CHECKPOINTS_DIR / f"{bundle.name}.metrics.jsonl")
    wanted = {CHECKPOINTS_DIR / f"{bundle.name}-epoch-{epoch:03d}.safetensors" for epoch in bundle.snapshots}
    for stale in set(CHECKPOINTS_DIR.glob(f"{bundle.name}-epoch-*.safetensors")) - wanted:
        stale.unlink()  # snapshots of an earlier recipe, which this run's epochs replace
    for epoch in bundle.snapshots:
        snapshot = run_dir / "checkpoints" / f"epoch-{epoch:03d}.safetensors"
        _copy(snapshot, CHECKPOINTS_DIR / f"{bundle.name}-epoch-{epoch:03d}.safetensors")

    report = run_dir / "eval-test.json"
    _run(["evaluate", str(run_dir / "last.safetensors"), *bundle.eval_args, "--json", str(report)], threads)
    result = json.loads(report.read_text())
    game = result.get("pointing_game") or {}
    return {
        "name": bundle.name,
        "wall_s": times.wall_s,
        "cpu_s": times.cpu_s,
        "accuracy": result["accuracy"],
        "num_images": result["num_images"],
        "pointing": game.get("rollout"),
        "random": game.get("random"),
    }


def write_samples(folder: Path = SAMPLES_DIR, masks: Path = MASKS_DIR) -> list[Path]:
    """Write test-split image i (class i) of every shape class as folder/<class>.png, its mask as masks/<class>.png."""
    from training.data.shapes import SHAPE_CLASSES, ShapesDataset

    folder.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    test = ShapesDataset(split="test", img_size=SAMPLE_IMG_SIZE, seed=SAMPLE_SEED)
    written = []
    for index, name in enumerate(SHAPE_CLASSES):
        image, mask, scene = test.render(index)
        assert SHAPE_CLASSES[scene.label] == name
        Image.fromarray(image).save(folder / f"{name}.png", optimize=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"{name}.png", optimize=True)
        written.append(folder / f"{name}.png")
    return written


def _fmt(value: object, pattern: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="python -m training.make_assets", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[b.name for b in BUNDLES])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/assets"))
    parser.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="compute threads per run (default: every core)"
    )
    parser.add_argument("--samples-only", action="store_true", help="only write assets/samples and assets/masks")
    args = parser.parse_args(argv)

    samples = write_samples()
    logger.info("wrote %d sample images to %s", len(samples), SAMPLES_DIR)
    if args.samples_only:
        return 0
    runs_dir = args.runs_dir if args.runs_dir.is_absolute() else REPO_ROOT / args.runs_dir
    chosen = [b for b in BUNDLES if not args.only or b.name in args.only]
    rows = []
    for bundle in chosen:
        rows.append(make_bundle(bundle, runs_dir, retrain=args.retrain, threads=args.threads))
    print(f"{'checkpoint':<24} {'wall':>7} {'cpu':>7} {'accuracy':>9} {'pointing':>9} {'random':>7}")
    for row in rows:
        print(
            f"{row['name']:<24} {_fmt(row['wall_s'], '{:.0f} s'):>7} {_fmt(row['cpu_s'], '{:.0f} s'):>7} "
            f"{_fmt(row['accuracy'], '{:.3f}'):>9} {_fmt(row['pointing'], '{:.3f}'):>9} {_fmt(row['random'], '{:.3f}'):>7}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
