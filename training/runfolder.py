"""The run folder: what a run leaves on disk, and how every file in it is written safely.

```
runs/<run-id>/
  config.json                    resolved TrainConfig
  metrics.jsonl                  one JSON object per logged step ("kind": "step") and per epoch ("kind": "epoch")
  summary.csv                    one row per epoch
  status.json                    see below
  checkpoints/epoch-NNN.safetensors
  best.safetensors  last.safetensors
  state/step-NNNNNNNN.safetensors + .json   resume state: tensors, and JSON for everything else
```

status.json, for the app to follow a run: {"status": "running" | "finished" | "failed", "reason": null or one
line, "pid", "run_id", "updated" (unix time), "progress": {"step", "total_steps", "epoch", "epochs",
"fraction"}, "last": the latest step record (while running), "metrics": final metrics (when it ends),
"resumable": true when the run was stopped on purpose (--max-steps, SIGTERM/SIGINT) and --resume continues
it}. A run killed with SIGKILL stays "running" with a pid that no longer exists.

JSON files and resume state are written to a temporary file, fsynced and renamed, so a process killed at
any moment leaves either the old or the new version. A resume state counts only once its .json is
written (the .json is written after the tensors and names them), and on resume the logs are cut back to
the length they had when that state was saved, so replayed steps are not logged twice.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from vitviz.errors import VitvizError
from vitviz.fileio import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STATE_NAME = re.compile(r"^step-(\d{8,})\.json$")
SUMMARY_COLUMNS = (
    "epoch",
    "step",
    "train_loss",
    "train_accuracy",
    "eval_loss",
    "eval_accuracy",
    "lr",
    "skipped_steps",
    "seconds",
)


@dataclass(frozen=True)
class ResumeState:
    """A saved training state: tensors (model, optimiser, RNG) and JSON-able scalars."""

    step: int
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


class RunFolder:
    """Paths and writers for one run folder; only the main process writes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, runs_dir: str | Path, run_id: str) -> RunFolder:
        """Make a fresh run folder; an existing non-empty one is refused (use --resume to continue it)."""
        if not RUN_ID_PATTERN.match(run_id):
            raise VitvizError(f"run id {run_id!r} must be letters, digits, '.', '_' or '-' (at most 128)")
        folder = cls(Path(runs_dir) / run_id)
        if folder.path.exists() and any(folder.path.iterdir()):
            raise VitvizError(f"run folder {folder.path} already exists; pick another --run-id or --resume it")
        try:
            folder.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            folder.state_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise VitvizError(f"cannot create run folder {folder.path}: {exc.strerror or exc}") from None
        return folder

    @classmethod
    def existing(cls, path: str | Path) -> RunFolder:
        """An existing run folder (for --resume); a folder without config.json is refused."""
        folder = cls(path)
        if not folder.config_path.is_file():
            raise VitvizError(f"{folder.path} is not a run folder (no config.json)")
        folder.checkpoints_dir.mkdir(exist_ok=True)
        folder.state_dir.mkdir(exist_ok=True)
        folder.remove_temporary_files()
        return folder

    def remove_temporary_files(self) -> list[Path]:
        """Delete the hidden temporary files that a process killed inside an atomic write left behind.

        Only the resumed run writes here, so any `.NAME.XXXX.tmp` (vitviz.fileio's pattern) is an orphan.
        """
        removed = []
        for folder in (self.path, self.checkpoints_dir, self.state_dir):
            for orphan in folder.glob(".*.tmp"):
                if orphan.is_file() and not orphan.is_symlink():
                    orphan.unlink(missing_ok=True)
                    removed.append(orphan)
        if removed:
            logger.info("removed %d temporary file(s) left by an interrupted write", len(removed))
        return removed

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.csv"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    @property
    def best_path(self) -> Path:
        return self.path / "best.safetensors"

    @property
    def last_path(self) -> Path:
        return self.path / "last.safetensors"

    def epoch_checkpoint_path(self, epoch: int) -> Path:
        return self.checkpoints_dir / f"epoch-{epoch:03d}.safetensors"

    # --- config, logs, status -----------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_json(self.config_path, config)

    def read_config(self) -> dict[str, Any]:
        try:
            data = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise VitvizError(f"cannot read {self.config_path}: {exc}") from None
        if not isinstance(data, dict):
            raise VitvizError(f"{self.config_path} does not hold a JSON object")
        return data

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")

    def append_summary(self, row: Mapping[str, Any]) -> None:
        new_file = not self.summary_path.exists() or self.summary_path.stat().st_size == 0
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS})
        with open(self.summary_path, "a", encoding="utf-8", newline="") as handle:
            handle.write(buffer.getvalue())

    def log_sizes(self) -> dict[str, int]:
        """Current byte length of the append-only logs, recorded in each resume state."""
        return {
            "metrics": self.metrics_path.stat().st_size if self.metrics_path.exists() else 0,
            "summary": self.summary_path.stat().st_size if self.summary_path.exists() else 0,
        }

    def truncate_logs(self, sizes: Mapping[str, int]) -> None:
        """Cut the logs back to `sizes` so that steps replayed after a resume are logged once."""
        for path, key in ((self.metrics_path, "metrics"), (self.summary_path, "summary")):
            size = int(sizes.get(key, 0))
            if path.exists() and path.stat().st_size > size:
                with open(path, "r+b") as handle:
                    handle.truncate(size)

    def write_status(self, status: str, *, reason: str | None = None, **fields: Any) -> None:
        """Replace status.json: {"status", "reason", "pid", "run_id", "updated", ...fields}."""
        doc = {
            "status": status,
            "reason": reason,
            "pid": os.getpid(),
            "run_id": self.run_id,
            "updated": time.time(),
            **fields,
        }
        atomic_write_json(self.status_path, doc)

    def read_status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    # --- resume state -------------------------------------------------------------------------------

    def save_state(self, step: int, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
        """Save a resume state for `step`, then delete the older ones."""
        stem = f"step-{step:08d}"
        tensor_path = self.state_dir / f"{stem}.safetensors"
        atomic_write_bytes(tensor_path, safetensors.torch.save(dict(tensors)))
        atomic_write_json(self.state_dir / f"{stem}.json", {"step": step, "tensors": tensor_path.name, **info})
        for old in self.state_dir.iterdir():
            if old.stem != stem and old.suffix in (".json", ".safetensors"):
                old.unlink(missing_ok=True)

    def latest_state(self) -> ResumeState | None:
        """The newest complete resume state, or None when the run never saved one."""
        candidates = sorted(
            (int(m.group(1)), p) for p in self.state_dir.glob("step-*.json") if (m := STATE_NAME.match(p.name))
        )
        for _step, json_path in reversed(candidates):
            try:
                info = json.loads(json_path.read_text(encoding="utf-8"))
                tensors = safetensors.torch.load_file(str(self.state_dir / info["tensors"]))
            except Exception:
                continue  # a state whose files are damaged does not count; try the one before
            info.pop("tensors")
            return ResumeState(step=int(info.pop("step")), tensors=tensors, info=info)
        return None
