"""What every figure shares: the plan, the result record, paired timing in one process, the machine, bench models.

A figure is a ratio against a baseline measured in the same process (or, for the app, seconds on screen).
Timings interleave the baseline and the measured run, alternating which goes first, after warm-up runs of
both, and the figure is the median of the per-round ratios: contention from other processes then slows both
sides of a round alike instead of biasing one of them.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitviz.models import ModelMeta, ViTConfig, build_model, save_checkpoint

logger = logging.getLogger(__name__)

LOWER, HIGHER = "lower", "higher"


@dataclass(frozen=True)
class Figure:
    """One benchmark result, as written to the JSON."""

    name: str  # starts with the figure's family: capture, memory, distance, train or app
    value: float
    target: float | None  # None: reported for information, no target
    better: str  # "lower" or "higher"
    unit: str  # "ratio", "s", ...
    baseline: str  # what the value is measured against, with the baseline's absolute number
    detail: dict[str, Any] = field(default_factory=dict)  # absolute numbers, runs, method

    @property
    def met(self) -> bool | None:
        """Whether the target is met; None for figures without a target."""
        if self.target is None:
            return None
        return self.value <= self.target if self.better == LOWER else self.value >= self.target

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": round(self.value, 4),
            "target": self.target,
            "better": self.better,
            "unit": self.unit,
            "baseline": self.baseline,
            "met": self.met,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Plan:
    """What one benchmark run measures; the three plans differ in sizes only, never in code paths."""

    label: str
    capture_sources: tuple[str, ...]
    capture_batches: tuple[int, ...]
    memory_source: str
    memory_batch: int
    distance_source: str
    distance_images: int
    distance_batch: int
    train_preset: str  # a training preset, resized by train_settings
    train_settings: tuple[str, ...]  # --set overrides for python -m training train
    train_steps: int  # timed steps per run (after warm-up steps)
    train_bf16: bool  # also compare bf16 autocast with fp32
    app_source: str
    app_uploads: int  # timed uploads (and page switches) after a warm-up one
    studio_repeats: int  # fresh servers for the first visit, sessions and processes for each floor figure
    warmup: int  # untimed rounds before timing
    repeats: int  # timed rounds; the figure is their median
    round_s: float = 0.3  # capture: each round times enough consecutive calls to last this long (baseline)
    clock: str = "wall"  # "wall" or "cpu" (see bench.common.paired_timing)


# "wall": elapsed time; "cpu": CPU time of this process, all its threads.
_CLOCK_FUNCTIONS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCKS = tuple(_CLOCK_FUNCTIONS)


@dataclass(frozen=True)
class PairedTiming:
    """Seconds of a baseline and a measured run, interleaved in one process."""

    clock: str  # "wall": elapsed time; "cpu": CPU time of this process, all threads
    baseline_s: float  # median over rounds, seconds per call
    measured_s: float  # median over rounds, seconds per call
    ratio: float  # median over rounds of measured / baseline
    ratios: tuple[float, ...]  # every round, for the spread
    calls_per_round: int = 1  # consecutive calls of each side timed together in a round

    def detail(self) -> dict[str, Any]:
        return {
            "clock": self.clock,
            "calls_per_round": self.calls_per_round,
            "baseline_s": round(self.baseline_s, 5),
            "measured_s": round(self.measured_s, 5),
            "round_ratios": [round(r, 4) for r in self.ratios],
        }


def _timed(fn: Callable[[], object], clock: str, calls: int = 1) -> float:
    """Seconds per call of `calls` consecutive calls."""
    gc.collect()  # a collection triggered by the previous run must not land in this one
    now = _CLOCK_FUNCTIONS[clock]
    start = now()
    for _ in range(calls):
        fn()
    return (now() - start) / calls


def paired_timing(
    baseline: Callable[[], object],
    measured: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    clock: str = "wall",
    min_round_s: float = 0.0,
) -> PairedTiming:
    """Time `measured` against `baseline`: `warmup` untimed rounds, then `repeats` interleaved rounds.

    A round times each side over the same number of consecutive calls, enough for the baseline to take at least
    `min_round_s` (one call when 0): a call of a few tens of milliseconds varies by +-30% from one call to the
    next on a small virtual machine (timer ticks, page reclaim, the other core's work), so single calls would
    give a median of noisy ratios. Both sides get the same count, so neither gains warm caches the other lacks.

    The "cpu" clock counts the CPU time of this process, so time the scheduler gives other processes does not
    count; it suits a shared machine when the bench runs single-threaded (idle OpenMP threads spin and would
    count too).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    for _ in range(warmup):
        baseline()
        measured()
    calls = 1
    if min_round_s > 0:
        calls = max(1, math.ceil(min_round_s / max(_timed(baseline, clock), 1e-6)))
    baseline_times, measured_times = [], []
    for round_index in range(repeats):
        if round_index % 2 == 0:  # alternate the order so neither side always runs on a warmer cache
            baseline_times.append(_timed(baseline, clock, calls))
            measured_times.append(_timed(measured, clock, calls))
        else:
            measured_times.append(_timed(measured, clock, calls))
            baseline_times.append(_timed(baseline, clock, calls))
    ratios = tuple(m / b for m, b in zip(measured_times, baseline_times, strict=True))
    return PairedTiming(
        clock=clock,
        baseline_s=statistics.median(baseline_times),
        measured_s=statistics.median(measured_times),
        ratio=statistics.median(ratios),
        ratios=ratios,
        calls_per_round=calls,
    )


def machine_info() -> dict[str, Any]:
    """The hardware and software the figures were measured on."""
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_total_kb = int(
            next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1]
        )
        memory_gib = round(mem_total_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        memory_gib = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    cuda = torch.cuda.is_available()
    import timm

    return {
        "cpu": cpu_model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_bf16": bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)())
        and "avx512_bf16" in _cpu_flags(),
        "load_average_at_start": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
    }


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The model `--tiny` uses: every code path of the real figures in seconds (2 blocks of width 32 at 32 px).
TINY_CONFIG = ViTConfig(
    img_size=(32, 32), patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0
)


def write_tiny_checkpoint(folder: Path) -> Path:
    """A randomly initialised tiny project checkpoint, so `--tiny` loads its model like any user model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(TINY_CONFIG).eval()
    meta = ModelMeta(
        arch="vitviz",
        config=TINY_CONFIG,
        class_names=[f"class {i}" for i in range(TINY_CONFIG.num_classes)],
        input_size=TINY_CONFIG.img_size,
        in_chans=TINY_CONFIG.in_chans,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        training={"source": "bench --tiny"},
        resolution_history=[],
    )
    path = folder / "tiny.safetensors"
    save_checkpoint(path, model, meta)
    return path


def scratch_folder() -> tempfile.TemporaryDirectory[str]:
    """A temporary folder for run folders, checkpoints and the app's cache; removed at the end."""
    return tempfile.TemporaryDirectory(prefix="vitviz-bench-")


def random_images(count: int, meta: ModelMeta, seed: int = 0) -> torch.Tensor:
    """Preprocessed-looking inputs [count, C, H, W]; content does not change the work a ViT does."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, meta.in_chans, *meta.input_size, generator=generator)


def working_mib(probed: dict[str, Any]) -> float | None:
    """MiB a memory probe's peak lies above the resident size at its reset (`start_kib`; None where it had none)."""
    if probed.get("start_kib") is None:
        return None
    return round((probed["peak_kib"] - probed["start_kib"]) / 1024, 1)


def probe_in_child(module: str, args: Sequence[str], what: str) -> dict[str, Any]:
    """Run `python -m <module> <args>` in a fresh interpreter (so a memory probe's peak is its own) and return
    the JSON object its last line of output prints; a failed run raises with `what` and its last error line."""
    command = [sys.executable, "-m", module, *args]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed with status {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
