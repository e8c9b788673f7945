"""Writing a run folder: every file of `vitviz.runs`'s layout, written so that a kill never leaves it torn.

The layout, the run id rule, the status.json and config.json schemas and the readers live in
`vitviz.runs` (the app reads run folders through it); this module is the only writer, and the names it
used to define are re-exported from there.

JSON files and resume state are written to a temporary file, fsynced and renamed, so a process killed at
any moment leaves either the old or the new version. The progress that status.json shows between two status
changes (rewritten every `log_every` steps) is renamed into place without the fsyncs, which cost more than a
small model's step: readers still never see a torn file, and only a crash of the machine can lose it. A resume state counts only once its .json is
written (the .json is written after the tensors and names them), and on resume the logs are cut back to
the length they had when that state was saved, so replayed steps are not logged twice.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from vitviz.errors import VitvizError
from vitviz.fileio import atomic_write_bytes, atomic_write_json
from vitviz.runs import (
    RUN_ID_PATTERN,
    SUMMARY_COLUMNS,
    RunLayout,
    RunStatus,
    check_run_id,
    load_config,
    read_status,
    status_document,
)
from vitviz.runs import STATE_PATTERN as STATE_NAME
from vitviz.runs import new_run_id as default_run_id

__all__ = [
    "RUN_ID_PATTERN",
    "STATE_NAME",
    "SUMMARY_COLUMNS",
    "RunFolder",
    "StoredState",
    "default_run_id",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredState:
    """A saved training state: tensors (model, optimiser, RNG) and JSON-able scalars."""

    step: int
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


class RunFolder(RunLayout):
    """The writers of one run folder (its paths come from `vitviz.runs.RunLayout`); only the main process writes."""

    @classmethod
    def create(cls, runs_dir: str | Path, run_id: str) -> RunFolder:
        """Make a fresh run folder; an existing non-empty one is refused (use --resume to continue it)."""
        folder = cls(Path(runs_dir) / check_run_id(run_id))
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

    # --- config, logs, status -----------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_json(self.config_path, config)

    def read_config(self) -> dict[str, Any]:
        """config.json; VitvizError when it is missing or garbled (a run cannot resume without it)."""
        return load_config(self.path)

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

    def write_status(self, status: str, *, reason: str | None = None, durable: bool = True, **fields: Any) -> None:
        """Replace status.json with `vitviz.runs.status_document(status, reason, **fields)`; `durable=False` for the
        progress updates between the status changes (no fsync: see `vitviz.fileio.atomic_path`)."""
        document = status_document(status, run_id=self.run_id, reason=reason, **fields)
        atomic_write_json(self.status_path, document, durable=durable)

    def read_status(self) -> RunStatus | None:
        """status.json as `vitviz.runs.RunStatus`, or None when it is missing or half-written."""
        return read_status(self.path)

    # --- resume state -------------------------------------------------------------------------------

    def save_state(self, step: int, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
        """Save a resume state for `step`, then delete the older ones."""
        tensor_path, info_path = self.state_tensors_path(step), self.state_info_path(step)
        atomic_write_bytes(tensor_path, safetensors.torch.save(dict(tensors)))
        atomic_write_json(info_path, {"step": step, "tensors": tensor_path.name, **info})
        for old in self.state_dir.iterdir():
            if old.stem != info_path.stem and old.suffix in (".json", ".safetensors"):
                old.unlink(missing_ok=True)

    def latest_state(self) -> StoredState | None:
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
            return StoredState(step=int(info.pop("step")), tensors=tensors, info=info)
        return None
