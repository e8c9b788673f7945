"""What the studio can show: model sources, run folders and sample images, discovered on disk.

No streamlit here: pages and widgets call these functions and draw the results. A model is named by a
short key that travels in the URL (`?model=bundled:shapes-default`); keys are only ever resolved against
what discovery found (or a timm name, or an upload by its content hash), so a URL can never point the
app at an arbitrary file.

Keys:
    bundled:<stem>              assets/checkpoints/<stem>.safetensors
    run:<run-id>                the run's best, else last, else newest epoch checkpoint
    run:<run-id>/epoch-NNN      runs/<run-id>/checkpoints/epoch-NNN.safetensors
    timm:<name>                 timm architecture, random initialisation (seeded)
    timm-pretrained:<name>      timm's pretrained weights (needs the network)
    upload:<sha256 prefix>      a checkpoint uploaded in the app, kept in the cache folder
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitviz.cli import IMAGE_SUFFIXES
from vitviz.errors import VitvizError
from vitviz.fileio import atomic_write_bytes
from vitviz.models import run_checkpoint

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS_DIR = REPO_ROOT / "assets"
CHECKPOINTS_DIR = ASSETS_DIR / "checkpoints"
SAMPLES_DIR = ASSETS_DIR / "samples"
DEFAULT_CHECKPOINT = CHECKPOINTS_DIR / "shapes-default.safetensors"
RUNS_DIR_ENV = "VITVIZ_RUNS_DIR"
CACHE_DIR_ENV = "VITVIZ_CACHE_DIR"
LOGS_FOLDER = ".logs"  # under the runs folder: stdout/stderr of runs started from the app

BUNDLED, RUN, TIMM, TIMM_PRETRAINED, UPLOAD = "bundled", "run", "timm", "timm-pretrained", "upload"
_TIMM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_EPOCH_FILE = re.compile(r"^(epoch-\d+)\.safetensors$")
_UPLOAD_ID = re.compile(r"^[0-9a-f]{16}$")
_MASK_SUFFIXES = ("-mask", "_mask")


def runs_dir() -> Path:
    """The folder that holds run folders: $VITVIZ_RUNS_DIR, default ./runs (read on every call)."""
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs").expanduser().resolve()


def cache_dir() -> Path:
    """The app's own cache folder (analysis results, uploaded checkpoints): $VITVIZ_CACHE_DIR or ./.vitviz-cache."""
    return Path(os.environ.get(CACHE_DIR_ENV) or ".vitviz-cache").expanduser().resolve()


def uploads_dir() -> Path:
    return cache_dir() / "uploads"


@dataclass(frozen=True)
class ModelEntry:
    """One model the pickers offer."""

    key: str  # stable id, used in the URL query
    label: str  # what the picker shows
    kind: str  # BUNDLED, RUN, TIMM, TIMM_PRETRAINED or UPLOAD
    path: Path | None = None  # the checkpoint file (None for timm)
    timm_name: str | None = None
    run_dir: Path | None = None  # the run folder a run checkpoint belongs to

    @property
    def source(self) -> str:
        """What `vitviz.models.load_model` takes for this entry."""
        if self.timm_name is not None:
            return f"timm:{self.timm_name}"
        return str(self.path)

    @property
    def pretrained(self) -> bool:
        return self.kind == TIMM_PRETRAINED

    @property
    def is_project_checkpoint(self) -> bool:
        return self.path is not None


def discover_models(checkpoints: Path | None = None, runs: Path | None = None) -> list[ModelEntry]:
    """Bundled checkpoints (the default first, then by name), then every run's checkpoints, newest run first."""
    checkpoints = CHECKPOINTS_DIR if checkpoints is None else checkpoints
    runs = runs_dir() if runs is None else runs
    entries: list[ModelEntry] = []
    bundled = sorted(p for p in _safetensors_in(checkpoints))
    bundled.sort(key=lambda p: p.name != DEFAULT_CHECKPOINT.name)  # stable: default first, rest by name
    for path in bundled:
        entries.append(
            ModelEntry(key=f"{BUNDLED}:{path.stem}", label=f"{path.stem} (bundled)", kind=BUNDLED, path=path)
        )
    for run in list_run_folders(runs):
        try:
            main = run_checkpoint(run)
        except VitvizError:
            continue  # no checkpoint yet: a run that has just started
        if not _real_child(main, run):
            continue  # a link out of the run folder: never offered
        entries.append(
            ModelEntry(key=f"{RUN}:{run.name}", label=f"run {run.name} · {main.stem}", kind=RUN, path=main, run_dir=run)
        )
        for path in sorted(_safetensors_in(run / "checkpoints")):
            match = _EPOCH_FILE.match(path.name)
            if match:
                entries.append(
                    ModelEntry(
                        key=f"{RUN}:{run.name}/{match.group(1)}",
                        label=f"run {run.name} · {match.group(1)}",
                        kind=RUN,
                        path=path,
                        run_dir=run,
                    )
                )
    return entries


def default_model_key(entries: list[ModelEntry]) -> str | None:
    """The bundled default checkpoint when it exists, else the first entry."""
    for entry in entries:
        if entry.path is not None and entry.path.resolve() == DEFAULT_CHECKPOINT.resolve():
            return entry.key
    return entries[0].key if entries else None


def timm_entry(name: str, *, pretrained: bool = False) -> ModelEntry:
    """A timm architecture by name; only the spelling is checked here (loading checks the rest)."""
    name = name.strip()
    if not _TIMM_NAME.match(name):
        raise VitvizError(
            f"{name!r} is not a timm model name (letters, digits, '_', '.', '-'), e.g. vit_tiny_patch16_224"
        )
    kind = TIMM_PRETRAINED if pretrained else TIMM
    what = "pretrained" if pretrained else "random init"
    return ModelEntry(key=f"{kind}:{name}", label=f"timm {name} ({what})", kind=kind, timm_name=name)


def upload_entry(upload_id: str, original_name: str = "") -> ModelEntry | None:
    """An uploaded checkpoint kept in the cache folder, or None when it is not (or no longer) there."""
    if not _UPLOAD_ID.match(upload_id):
        return None
    path = uploads_dir() / f"{upload_id}.safetensors"
    if not path.is_file():
        return None
    shown = original_name or f"{upload_id[:8]}….safetensors"
    return ModelEntry(key=f"{UPLOAD}:{upload_id}", label=f"upload {shown}", kind=UPLOAD, path=path)


def resolve_key(key: str, entries: list[ModelEntry]) -> ModelEntry | None:
    """The entry a key names: one of `entries`, a timm name, or an upload; None when it names nothing."""
    for entry in entries:
        if entry.key == key:
            return entry
    kind, _, rest = key.partition(":")
    if kind in (TIMM, TIMM_PRETRAINED):
        try:
            return timm_entry(rest, pretrained=kind == TIMM_PRETRAINED)
        except VitvizError:
            return None
    if kind == UPLOAD:
        return upload_entry(rest)
    return None


def store_upload(data: bytes, digest: str) -> Path:
    """Keep an uploaded checkpoint's bytes in the cache folder under its content hash (atomic write)."""
    folder = uploads_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest[:16]}.safetensors"
    if not path.is_file():
        atomic_write_bytes(path, data)
    return path


def _real_child(path: Path, folder: Path) -> bool:
    """Whether `path` really lies inside `folder`: no symbolic link, nothing that resolves elsewhere."""
    return not path.is_symlink() and path.resolve().is_relative_to(folder.resolve())


def _safetensors_in(folder: Path) -> list[Path]:
    if folder.is_symlink() or not folder.is_dir():
        return []
    return [
        p for p in folder.glob("*.safetensors") if p.is_file() and not p.name.startswith(".") and _real_child(p, folder)
    ]


# --- run folders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """What the app shows about one run folder."""

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
        return min(1.0, self.step / self.total_steps)


def list_run_folders(runs: Path | None = None) -> list[Path]:
    """Run folders (sub-folders with a valid run id) under the runs folder, most recently changed first."""
    runs = runs_dir() if runs is None else runs
    if not runs.is_dir():
        return []
    folders = [p for p in runs.iterdir() if p.is_dir() and _RUN_ID.match(p.name) and _real_child(p, runs)]
    return sorted(folders, key=lambda p: (-_mtime(p), p.name))


def read_status(run: Path) -> dict[str, Any] | None:
    """status.json of a run, or None when it is missing or half-written."""
    try:
        data = json.loads((run / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_config(run: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """Every complete record of a run's metrics.jsonl (a line being written right now is skipped)."""
    return read_jsonl(run / "metrics.jsonl")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, skipping lines that do not parse (e.g. one still being written)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def run_info(run: Path) -> RunInfo:
    """Summarise a run folder from status.json and config.json."""
    status = read_status(run) or {}
    progress = status.get("progress") if isinstance(status.get("progress"), dict) else {}
    metrics = status.get("metrics") if isinstance(status.get("metrics"), dict) else {}
    state = str(status.get("status") or ("starting" if (run / "config.json").exists() else "unknown"))
    reason = status.get("reason")
    if state == "failed" and status.get("resumable"):
        state = "stopped"
    pid = status.get("pid") if isinstance(status.get("pid"), int) else None
    if state == "running" and pid is not None and not _pid_alive(pid):
        state, reason = "interrupted", "the training process is gone; resume it with python -m training train --resume"
    config = read_config(run) or {}
    return RunInfo(
        run_id=run.name,
        path=run,
        status=state,
        reason=None if reason is None else str(reason),
        step=_int_or_none(progress.get("step")),
        total_steps=_int_or_none(progress.get("total_steps")),
        epoch=_int_or_none(progress.get("epoch")),
        epochs=_int_or_none(progress.get("epochs")),
        metrics=dict(metrics),
        updated=status.get("updated") if isinstance(status.get("updated"), (int, float)) else _mtime(run),
        preset=config.get("preset") if isinstance(config.get("preset"), str) else None,
        pid=pid,
    )


def run_dir_for(entry: ModelEntry, training: dict[str, Any], runs: Path | None = None) -> Path | None:
    """The run folder a model came from: its own folder, or the run named in its training summary."""
    if entry.run_dir is not None:
        return entry.run_dir
    run_id = training.get("run_id")
    if isinstance(run_id, str) and _RUN_ID.match(run_id):
        candidate = (runs_dir() if runs is None else runs) / run_id
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def metrics_beside(entry: ModelEntry) -> Path | None:
    """A training log shipped beside a bundled checkpoint: <stem>.metrics.jsonl."""
    if entry.path is None:
        return None
    candidate = entry.path.with_name(entry.path.stem + ".metrics.jsonl")
    return candidate if candidate.is_file() else None


def new_run_id(preset: str) -> str:
    """A fresh run id in the training backend's style: <preset>-<date>-<time>."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", preset) or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def valid_run_id(run_id: str) -> bool:
    return bool(_RUN_ID.match(run_id))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- sample images -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSet:
    """A folder of sample images shipped in assets/samples (one set per sub-folder)."""

    name: str
    files: tuple[Path, ...]


def discover_sample_sets(samples: Path | None = None) -> list[SampleSet]:
    """Image sets under assets/samples: each sub-folder is a set; loose files form the set "samples".

    Files whose name ends in -mask or _mask (object masks) are not images to analyse and are skipped.
    """
    samples = SAMPLES_DIR if samples is None else samples
    if not samples.is_dir():
        return []
    sets = []
    loose = _images_in(samples)
    if loose:
        sets.append(SampleSet(name="samples", files=tuple(loose)))
    for folder in sorted(
        p for p in samples.iterdir() if p.is_dir() and not p.name.startswith(".") and _real_child(p, samples)
    ):
        files = _images_in(folder)
        if files:
            sets.append(SampleSet(name=folder.name, files=tuple(files)))
    return sets


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and _real_child(p, folder)
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.startswith(".")
        and not p.stem.lower().endswith(_MASK_SUFFIXES)
    )
