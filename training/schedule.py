"""Where a run is and what follows from it: the data position (the step, and the epoch and batch it falls
in) and the learning-rate schedule of the steps.

Both are components of the resume state (`training.resume`): each saves and restores itself with
`state_dict` / `load_state_dict`, and each refuses a state that this run could not continue exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from vitviz.errors import VitvizError


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at (0-based) optimiser step `step`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


class Schedule:
    """The learning-rate multiplier as a pure function of the step; its state is what it was computed from."""

    def __init__(self, *, total_steps: int, warmup_steps: int, decay: str, min_ratio: float) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.min_ratio = min_ratio

    def factor(self, step: int) -> float:
        return lr_factor(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            decay=self.decay,
            min_ratio=self.min_ratio,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to load: the schedule follows from the config. A state saved under another schedule is
        refused, since the run would not continue as it started."""
        saved = (int(state["total_steps"]), int(state["warmup_steps"]))
        if saved != (self.total_steps, self.warmup_steps):
            raise VitvizError(
                f"cannot resume exactly: the schedule now has {self.total_steps} steps ({self.warmup_steps} "
                f"of warm-up), but the run started with {saved[0]} ({saved[1]})"
            )


class DataPosition:
    """Optimiser steps done, and the epoch and the batch within it that they come to.

    The sample order of an epoch is a function of (seed, epoch) and step s of an epoch takes its batch s,
    so the step and the epoch length are the whole state of the data order.
    """

    def __init__(self, *, steps_per_epoch: int, epochs: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.step = 0

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def epoch(self) -> int:
        """Completed epochs (0-based index of the current one)."""
        return self.step // self.steps_per_epoch

    @property
    def batch(self) -> int:
        """Batches of the current epoch already taken."""
        return self.step % self.steps_per_epoch

    def advance(self) -> int:
        """Count one optimiser step done; returns the new step."""
        self.step += 1
        return self.step

    def progress(self) -> dict[str, Any]:
        """The "progress" object of status.json."""
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "epochs": self.epochs,
            "fraction": self.step / self.total_steps if self.total_steps else 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at the saved step; refused when the training split now gives epochs of another length."""
        saved = int(state["steps_per_epoch"])
        if saved != self.steps_per_epoch:
            raise VitvizError(
                f"cannot resume exactly: the training split now gives {self.steps_per_epoch} steps per epoch, "
                f"but the run started with {saved} (did the dataset files change?)"
            )
        self.step = int(state["step"])
