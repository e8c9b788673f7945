"""The run folder: the one definition of what a training run leaves on disk and how it is read back.

The training backend writes run folders (`training.runfolder.RunFolder`, through the names here); the app
and the command line only read them. Nothing here imports torch or the training backend.

```
<runs>/<run-id>/
  config.json                          the resolved training config (see "config.json" below)
  metrics.jsonl                        one JSON object per line: "kind": "step" per logged step, "epoch" per epoch
  summary.csv                          one row per epoch, columns SUMMARY_COLUMNS
  status.json                          see "status.json" below
  checkpoints/epoch-NNN.safetensors    every epoch checkpoint kept (NNN: the epoch, at least 3 digits)
  best.safetensors                     best eval accuracy so far
  last.safetensors                     the newest weights
  state/step-NNNNNNNN.safetensors      resume state: tensors ...
  state/step-NNNNNNNN.json             ... and JSON for everything else (written second; it names the tensors)
```

A run id is 1 to 128 characters: letters, digits, '.', '_' and '-', starting with a letter or a digit
(so no path separator, no '..' escape, no hidden name, no option-like leading '-').

config.json is `training.config.TrainConfig.to_dict()` of the resolved config: {"preset", "objective",
"epochs", "batch_size", "seed", ..., "model": the ViTConfig fields, "data": {"dataset", ...}, "optim",
"schedule", "masked", "finetune"}. Readers here use only "preset"; the backend reads all of it to resume.

status.json is replaced atomically on every logged step and when the run ends (`status_document`):
    status      "running" | "finished" | "failed"
    reason      null, or one line saying why the run ended early
    pid         the training process (rank 0)
    run_id      the folder's name
    updated     unix time of this write
    progress    {"step", "total_steps", "epoch", "epochs", "fraction"}
    last        the latest step record of metrics.jsonl (while running)
    metrics     final metrics (when it ends): train_loss, train_accuracy, eval_loss, eval_accuracy, ...
    resumable   true when the run was stopped on purpose (--max-steps, SIGTERM/SIGINT); --resume continues it
A run killed with SIGKILL stays "running" with a pid that no longer exists; `run_info` reports it as
"interrupted".

Every reader tolerates a folder that is being written or was left half-written: a missing or garbled
file reads as "nothing there" (None, an empty list), a torn last line of a log is skipped.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitviz.errors import VitvizError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.csv"
STATUS_FILE = "status.json"
CHECKPOINTS_FOLDER = "checkpoints"
STATE_FOLDER = "state"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"

RUN_ID_MAX_LENGTH = 128
RUN_ID_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # anchored: safe with .match too
EPOCH_CHECKPOINT_PATTERN = re.compile(r"\Aepoch-(\d+)\.safetensors\Z")
STATE_PATTERN = re.compile(r"\Astep-(\d{8,})\.json\Z")
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

# Values of status.json's "status", as the training process writes them.
RUNNING, FINISHED, FAILED = "running", "finished", "failed"
STATUSES = (RUNNING, FINISHED, FAILED)
# States `run_info` derives beyond those: a failed run that can be resumed, a folder with a config but no
# status yet, a "running" run whose process is gone, and a folder with neither.
STOPPED, STARTING, INTERRUPTED, UNKNOWN = "stopped", "starting", "interrupted", "unknown"

INTERRUPTED_REASON = "the training process is gone; resume it with python -m training train --resume"


# --- run ids -------------------------------------------------------------------------------------


def valid_run_id(run_id: object) -> bool:
    """Whether `run_id` can name a run folder (a string matching RUN_ID_PATTERN exactly)."""
    return isinstance(run_id, str) and RUN_ID_PATTERN.fullmatch(run_id) is not None


def check_run_id(run_id: str) -> str:
    """`run_id` itself, or VitvizError with one line saying what a run id may be."""
    if not valid_run_id(run_id):
        raise VitvizError(
            f"run id {run_id!r} must be letters, digits, '.', '_' or '-' (at most {RUN_ID_MAX_LENGTH}), "
            "starting with a letter or digit"
        )
    return run_id


def run_path(runs_dir: str | Path, run_id: str) -> Path:
    """<runs_dir>/<run_id> for a valid id; VitvizError for anything else (so an id never escapes runs_dir)."""
    return Path(runs_dir) / check_run_id(run_id)


def new_run_id(preset: str, runs_dir: str | Path, *, now: float | None = None) -> str:
    """A fresh run id `<preset>-<date>-<time>`, with `-2`, `-3`, ... when that folder exists already.

    Characters a run id cannot hold become '-', and the preset part is shortened so the id stays valid.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", preset).lstrip("._-") or "run"
    base = f"{stem[: RUN_ID_MAX_LENGTH - len(stamp) - 8]}-{stamp}"  # room for "-" + a counter of 6 digits
    candidate, counter = base, 1
    while os.path.lexists(Path(runs_dir) / candidate):
        counter += 1
        candidate = f"{base}-{counter}"
    return candidate


# --- layout --------------------------------------------------------------------------------------


class RunLayout:
    """Where every file of one run folder lives; paths only, nothing is read or created."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def status_path(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_FOLDER

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_FOLDER

    @property
    def best_path(self) -> Path:
        return self.path / BEST_FILE

    @property
    def last_path(self) -> Path:
        return self.path / LAST_FILE

    def epoch_checkpoint_path(self, epoch: int) -> Path:
        return self.checkpoints_dir / f"epoch-{epoch:03d}.safetensors"

    def state_tensors_path(self, step: int) -> Path:
        return self.state_dir / f"step-{step:08d}.safetensors"

    def state_info_path(self, step: int) -> Path:
        return self.state_dir / f"step-{step:08d}.json"


def list_run_folders(runs_dir: str | Path) -> list[Path]:
    """Run folders under `runs_dir` (real sub-folders, no links, named by a valid run id), newest change first."""
    runs_dir = Path(runs_dir)
    try:
        children = list(runs_dir.iterdir())
    except OSError:
        return []
    folders = [p for p in children if valid_run_id(p.name) and not p.is_symlink() and p.is_dir()]
    return sorted(folders, key=lambda p: (-_mtime(p), p.name))


# --- checkpoints ---------------------------------------------------------------------------------


def epoch_checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every checkpoints/epoch-NNN.safetensors file, oldest epoch first."""
    folder = RunLayout(run).checkpoints_dir
    try:
        children = list(folder.iterdir())
    except OSError:
        return []
    found = []
    for path in children:
        match = EPOCH_CHECKPOINT_PATTERN.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_checkpoint(run: str | Path) -> Path | None:
    """The checkpoint a run folder stands for: best, else last, else the newest epoch; None when none exists."""
    layout = RunLayout(run)
    for path in (layout.best_path, layout.last_path):
        if path.is_file():
            return path
    epochs = epoch_checkpoints(run)
    return epochs[-1][1] if epochs else None


def run_checkpoint(run: str | Path) -> Path:
    """`find_checkpoint`, or VitvizError when the run has no checkpoint yet."""
    path = find_checkpoint(run)
    if path is None:
        raise VitvizError(
            f"run folder {run} has no checkpoint yet ({BEST_FILE}, {LAST_FILE} or "
            f"{CHECKPOINTS_FOLDER}/epoch-NNN.safetensors)"
        )
    return path


# --- config.json ---------------------------------------------------------------------------------


def load_config(run: str | Path) -> dict[str, Any]:
    """config.json as a dict; VitvizError when it is missing, garbled or not a JSON object (for resuming)."""
    path = RunLayout(run).config_path
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise VitvizError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise VitvizError(f"{path} does not hold a JSON object")
    return data


def read_config(run: str | Path) -> dict[str, Any] | None:
    """config.json as a dict, or None when it is missing, garbled or not a JSON object."""
    return _read_json_object(RunLayout(run).config_path)


# --- status.json ---------------------------------------------------------------------------------


def status_document(
    status: str, *, run_id: str, reason: str | None = None, pid: int | None = None, **fields: Any
) -> dict[str, Any]:
    """The status.json object a writer stores: {"status", "reason", "pid", "run_id", "updated", **fields}."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    return {
        "status": status,
        "reason": reason,
        "pid": os.getpid() if pid is None else pid,
        "run_id": run_id,
        "updated": time.time(),
        **fields,
    }


@dataclass(frozen=True)
class RunStatus:
    """status.json as written, with every field checked for its type (a wrong type reads as absent)."""

    status: str | None  # running, finished, failed; None when the file names none
    reason: str | None = None
    pid: int | None = None
    run_id: str | None = None
    updated: float | None = None
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    fraction: float | None = None
    last: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    resumable: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunStatus:
        progress = data.get("progress") if isinstance(data.get("progress"), dict) else {}
        reason = data.get("reason")
        return cls(
            status=data.get("status") if isinstance(data.get("status"), str) and data.get("status") else None,
            reason=None if reason is None else str(reason),
            pid=_int_or_none(data.get("pid")),
            run_id=data.get("run_id") if isinstance(data.get("run_id"), str) else None,
            updated=_number_or_none(data.get("updated")),
            step=_int_or_none(progress.get("step")),
            total_steps=_int_or_none(progress.get("total_steps")),
            epoch=_int_or_none(progress.get("epoch")),
            epochs=_int_or_none(progress.get("epochs")),
            fraction=_number_or_none(progress.get("fraction")),
            last=dict(data["last"]) if isinstance(data.get("last"), dict) else {},
            metrics=dict(data["metrics"]) if isinstance(data.get("metrics"), dict) else {},
            resumable=data.get("resumable") is True,
        )


def read_status(run: str | Path) -> RunStatus | None:
    """status.json of a run, or None when it is missing, half-written or not a JSON object."""
    data = _read_json_object(RunLayout(run).status_path)
    return None if data is None else RunStatus.from_dict(data)


@dataclass(frozen=True)
class RunInfo:
    """What the app shows about one run folder (from status.json and config.json)."""

    run_id: str
    path: Path
    status: str  # running, finished, failed, stopped, starting, interrupted or unknown
    reason: str | None
    step: int | None
    total_steps: int | None
    epoch: int | None
    epochs: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    updated: float | None = None
    preset: str | None = None
    pid: int | None = None

    @property
    def fraction(self) -> float:
        if self.step is None or not self.total_steps:
            return 0.0
        return min(1.0, max(0.0, self.step / self.total_steps))


def run_info(run: str | Path) -> RunInfo:
    """Summarise a run folder: a resumable failure is "stopped", a "running" run whose process is gone is
    "interrupted", a folder with a config but no status is "starting", one with neither is "unknown"."""
    run = Path(run)
    layout = RunLayout(run)
    status = read_status(run) or RunStatus(status=None)
    state = status.status or (STARTING if layout.config_path.exists() else UNKNOWN)
    reason = status.reason
    if state == FAILED and status.resumable:
        state = STOPPED
    if state == RUNNING and status.pid is not None and not _pid_alive(status.pid):
        state, reason = INTERRUPTED, INTERRUPTED_REASON
    config = read_config(run) or {}
    preset = config.get("preset")
    return RunInfo(
        run_id=run.name,
        path=run,
        status=state,
        reason=reason,
        step=status.step,
        total_steps=status.total_steps,
        epoch=status.epoch,
        epochs=status.epochs,
        metrics=dict(status.metrics),
        updated=status.updated if status.updated is not None else _mtime(run),
        preset=preset if isinstance(preset, str) else None,
        pid=status.pid,
    )


# --- logs ----------------------------------------------------------------------------------------


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a run's metrics.jsonl (a line being written right now is skipped)."""
    return read_jsonl(RunLayout(run).metrics_path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, skipping lines that do not parse (a torn or garbled line)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    records = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # includes bytes that are not UTF-8
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_summary(run: str | Path) -> list[dict[str, float | int | None]]:
    """summary.csv's rows as {column: number or None}; a row that is torn or has the wrong width is skipped."""
    try:
        text = RunLayout(run).summary_path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # the row being appended right now
    reader = csv.reader(io.StringIO("".join(lines)))
    header = next(reader, None)
    if not header:
        return []
    return [{k: _csv_number(v) for k, v in zip(header, row, strict=True)} for row in reader if len(row) == len(header)]


# --- helpers -------------------------------------------------------------------------------------


def _read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _csv_number(value: str) -> float | int | None:
    value = value.strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # 0 and negative numbers name process groups, not a process
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
