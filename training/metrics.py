"""A run's metrics: running sums over steps, the step and epoch records, and their lines in the run folder.

Every rank keeps its own sums and takes part in the reductions; only the main process writes
metrics.jsonl and summary.csv (through `RunFolder`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from training import distributed
from training.distributed import DistContext
from training.runfolder import RunFolder


@dataclass(frozen=True)
class StepOutcome:
    """What one optimiser step did, summed over this rank's images."""

    loss_sum: float  # sum over predictions of the loss (mean loss * count)
    correct: int
    count: int  # predictions: images (classify) or corrupted patches (masked)
    skipped: bool  # loss or gradient not finite: the update was not applied
    lr: float


class Sums:
    """Running sums of loss, correct and count (and images, skipped steps) over a window of steps."""

    # Summed over the ranks when reduced; "skipped" and "steps" are the same on every rank (the guard's decision
    # is all-reduced), so they are not.
    PER_RANK = ("loss_sum", "correct", "count", "images")

    def __init__(self, values: Mapping[str, float] | None = None) -> None:
        self.values = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "images": 0.0, "skipped": 0.0, "steps": 0.0}
        if values:
            self.values.update(values)

    def add(self, outcome: StepOutcome, images: int) -> None:
        if not outcome.skipped:
            self.values["loss_sum"] += outcome.loss_sum
            self.values["correct"] += outcome.correct
            self.values["count"] += outcome.count
        self.values["images"] += images
        self.values["skipped"] += int(outcome.skipped)
        self.values["steps"] += 1

    def reduced(self, ctx: DistContext) -> dict[str, float | None]:
        """Mean loss and accuracy over all ranks (None before any counted prediction), images, skipped steps."""
        (out,) = world_values([self], ctx)
        count = out["count"]
        return {
            "loss": out["loss_sum"] / count if count else None,
            "accuracy": out["correct"] / count if count else None,
            "images": out["images"],
            "skipped": self.values["skipped"],
        }


def world_values(sums: list[Sums], ctx: DistContext) -> list[dict[str, float]]:
    """The values of each of `sums` with the per-rank ones added up over all ranks, in one all-reduce (every rank
    calls this)."""
    keys = Sums.PER_RANK
    local = torch.tensor([[s.values[k] for k in keys] for s in sums], dtype=torch.float64, device=ctx.device)
    totals = distributed.all_reduce_sum(local, ctx).tolist()
    return [{**s.values, **dict(zip(keys, row))} for s, row in zip(sums, totals, strict=True)]


class SkipCounts(Protocol):
    """What the records need of the guard against non-finite steps (`training.guard.StepGuard`)."""

    skipped_total: int


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class MetricsLog:
    """Sums since the last step record and over the epoch, the best score, the latest records, and the
    records written to metrics.jsonl and summary.csv; a component of the resume state, whose state includes
    how long those two files were (a resumed run cuts them back to it, so replayed steps are logged once).

    Each rank sums its own images. The resume state holds the sums of all ranks added up (`prepare_state`, which
    every rank runs before the main process saves): on resume the main process starts from them and the other
    ranks from zero, so the records after a resume are those of the run that never stopped, whatever the number
    of processes before and after.
    """

    def __init__(self, ctx: DistContext, folder: RunFolder | None, steps_per_epoch: int, guard: SkipCounts) -> None:
        self.ctx = ctx
        self.writer = folder if ctx.is_main else None  # only the main process writes
        self.steps_per_epoch = steps_per_epoch
        self.guard = guard  # its count of skipped steps goes into the records
        self.epoch_sums = Sums()
        self.window = Sums()
        self.best: float | None = None
        self.last_eval: dict[str, Any] = {}
        self.last_train: dict[str, Any] = {}
        self._window_start = self._epoch_start = time.perf_counter()
        self._world_sums: tuple[dict[str, float], dict[str, float]] | None = None  # set by prepare_state

    def prepare_state(self) -> None:
        """Add the ranks' sums up for the resume state (every rank calls this right before the state is saved)."""
        epoch, window = world_values([self.epoch_sums, self.window], self.ctx)
        self._world_sums = (epoch, window)

    def state_dict(self) -> dict[str, Any]:
        """The sums of all ranks (see `prepare_state`), the best score, the latest evaluation and epoch record
        ({} before the first), and the byte length of the logs (main process)."""
        if self._world_sums is not None:
            epoch, window = self._world_sums
        elif not self.ctx.is_distributed:
            epoch, window = dict(self.epoch_sums.values), dict(self.window.values)
        else:
            raise RuntimeError("MetricsLog.prepare_state() must run on every rank before its state is saved")
        return {
            "epoch_sums": dict(epoch),
            "window_sums": dict(window),
            "best": self.best,
            "last_eval": dict(self.last_eval),
            "last_train": dict(self.last_train),
            "log_sizes": self.writer.log_sizes() if self.writer is not None else {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a resume state's values: the main process from the saved sums (every rank's, added up)
        and the other ranks from zero; the main process cuts the logs back to their saved length."""
        epoch, window = dict(state["epoch_sums"]), dict(state["window_sums"])
        if not self.ctx.is_main:
            for values in (epoch, window):
                values.update(dict.fromkeys(Sums.PER_RANK, 0.0))
        self.epoch_sums = Sums(epoch)
        self.window = Sums(window)
        self._world_sums = None
        self.best = state["best"]
        self.last_eval = dict(state["last_eval"])
        self.last_train = dict(state["last_train"])
        if self.writer is not None:
            self.writer.truncate_logs(state["log_sizes"])

    def start_clocks(self) -> None:
        """Start timing the first window and epoch (wall-clock fields only)."""
        self._window_start = self._epoch_start = time.perf_counter()

    def add(self, outcome: StepOutcome, images: int) -> None:
        """Count one step of this rank (`images` of its images) into the window and the epoch."""
        self._world_sums = None  # a state saved from here on needs the ranks' sums again
        self.epoch_sums.add(outcome, images)
        self.window.add(outcome, images)

    def step_record(self, step: int, lr: float) -> dict[str, Any]:
        """Close the window: its record (reduced over all ranks, so every rank calls this), logged by rank 0."""
        reduced = self.window.reduced(self.ctx)
        elapsed = time.perf_counter() - self._window_start
        self.window = Sums()
        self._world_sums = None
        record = {
            "kind": "step",
            "step": step,
            "epoch": step / self.steps_per_epoch,
            "loss": finite_or_none(reduced["loss"]),
            "accuracy": reduced["accuracy"],
            "lr": lr,
            "images_per_s": reduced["images"] / elapsed if elapsed > 0 else None,  # type: ignore[operator]
            "skipped_steps": self.guard.skipped_total,
        }
        if self.writer is not None:
            self.writer.append_metrics(record)
        self._window_start = time.perf_counter()
        return record

    def epoch_record(
        self, step: int, lr: float, evaluation: Mapping[str, Any] | None, has_eval_split: bool
    ) -> tuple[dict[str, Any], bool]:
        """Close the epoch (every rank calls this): its record, logged by rank 0, and whether its score
        (eval accuracy, or train accuracy without an eval split) is the best so far."""
        epoch = step // self.steps_per_epoch  # 1-based count of completed epochs
        train = self.epoch_sums.reduced(self.ctx)
        self.epoch_sums = Sums()
        self._world_sums = None
        if evaluation is not None:
            self.last_eval = {"epoch": epoch, **evaluation}
        evaluated = evaluation or {}
        record = {
            "kind": "epoch",
            "epoch": epoch,
            "step": step,
            "train_loss": finite_or_none(train["loss"]),
            "train_accuracy": train["accuracy"],
            "eval_loss": evaluated.get("loss"),
            "eval_accuracy": evaluated.get("accuracy"),
            "lr": lr,
            "skipped_steps": self.guard.skipped_total,
            "seconds": round(time.perf_counter() - self._epoch_start, 3),  # wall time of the epoch (this process)
        }
        self._epoch_start = time.perf_counter()
        self.last_train = record
        score = evaluated.get("accuracy") if has_eval_split else train["accuracy"]
        improved = score is not None and (self.best is None or score > self.best)
        if improved:
            self.best = score
        if self.writer is not None:
            self.writer.append_metrics(record)
            self.writer.append_summary(record)
        return record, improved

    def final_metrics(self) -> dict[str, float | None]:
        """The run's headline numbers (status.json, checkpoint metadata, RunResult)."""
        return {
            "train_loss": self.last_train.get("train_loss"),
            "train_accuracy": self.last_train.get("train_accuracy"),
            "eval_loss": self.last_eval.get("loss"),
            "eval_accuracy": self.last_eval.get("accuracy"),
            "best_accuracy": self.best,
            "skipped_steps": self.guard.skipped_total,
        }
