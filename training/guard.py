"""The guard against non-finite steps: counts them and stops a run that keeps producing them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from training.metrics import StepOutcome

logger = logging.getLogger(__name__)


class TrainingFailed(Exception):
    """A run that had to stop (e.g. the loss stayed non-finite); the message is one line for the user."""


class StepGuard:
    """Skipped (non-finite) steps in a row and in all; a component of the resume state."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.consecutive_bad = 0
        self.skipped_total = 0

    def record(self, outcome: StepOutcome, step: int) -> None:
        """Count step `step` (1-based); warn about a skipped one, and stop the run after max_bad_steps in a row."""
        if not outcome.skipped:
            self.consecutive_bad = 0
            return
        self.consecutive_bad += 1
        self.skipped_total += 1
        in_a_row = self.consecutive_bad
        logger.warning("step %d: loss or gradient not finite; update skipped (%d in a row)", step, in_a_row)
        if in_a_row >= self.max_bad_steps:
            raise TrainingFailed(
                f"loss or gradient was not finite for {in_a_row} steps in a row (last at step {step}); "
                "lower optim.lr, set grad_clip, or check the data"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive_bad": self.consecutive_bad, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.consecutive_bad = int(state["consecutive_bad"])
        self.skipped_total = int(state["skipped_total"])
