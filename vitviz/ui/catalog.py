"""What the studio can show: model sources, run folders and sample images, discovered on disk.

No streamlit here: pages and widgets call these functions and draw the results. A model is named by a
short key that travels in the URL (`?model=bundled:shapes-default`); keys are only ever resolved against
what discovery found (or a timm name, an upload by its content hash, or a Hugging Face Hub id), so a URL can
never point the app at an arbitrary file: an `hf:` key is loaded as a Hub id only, never as a folder on the
server (`load_model(..., hf_local_folders=False)`), and a Hub id from a URL is downloaded only after the user
clicks for it.

Keys:
    bundled:<stem>              assets/checkpoints/<stem>.safetensors
    run:<run-id>                the run's best, else last, else newest epoch checkpoint
    run:<run-id>/epoch-NNN      runs/<run-id>/checkpoints/epoch-NNN.safetensors
    timm:<name>                 timm architecture, random initialisation (seeded)
    timm-pretrained:<name>      timm's pretrained weights (needs the network)
    upload:<sha256 prefix>      a checkpoint uploaded in the app, kept in the cache folder
    hf:<owner>/<name>           a Hugging Face Hub repository (downloaded; never a local folder)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitviz import runs as run_folders
from vitviz.errors import VitvizError
from vitviz.fileio import atomic_write_bytes
from vitviz.imagefiles import images_in

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS_DIR = REPO_ROOT / "assets"
CHECKPOINTS_DIR = ASSETS_DIR / "checkpoints"
SAMPLES_DIR = ASSETS_DIR / "samples"
DEFAULT_CHECKPOINT = CHECKPOINTS_DIR / "shapes-default.safetensors"
RUNS_DIR_ENV = "VITVIZ_RUNS_DIR"
CACHE_DIR_ENV = "VITVIZ_CACHE_DIR"
LOGS_FOLDER = ".logs"  # under the runs folder: stdout/stderr of runs started from the app

BUNDLED, RUN, TIMM, TIMM_PRETRAINED, UPLOAD = "bundled", "run", "timm", "timm-pretrained", "upload"
HF = "hf"
# A Hugging Face Hub id, owner/name: links and the add-model box never name a local folder.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_TIMM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_UPLOAD_ID = re.compile(r"^[0-9a-f]{16}$")


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
    kind: str  # BUNDLED, RUN, TIMM, TIMM_PRETRAINED, HF or UPLOAD
    path: Path | None = None  # the checkpoint file (None for timm)
    timm_name: str | None = None
    run_dir: Path | None = None  # the run folder a run checkpoint belongs to
    hub_id: str | None = None  # a Hugging Face Hub repository, owner/name

    @property
    def source(self) -> str:
        """What `vitviz.models.load_model` takes for this entry."""
        if self.timm_name is not None:
            return f"timm:{self.timm_name}"
        if self.hub_id is not None:
            return f"hf:{self.hub_id}"
        return str(self.path)

    @property
    def pretrained(self) -> bool:
        return self.kind == TIMM_PRETRAINED

    @property
    def is_project_checkpoint(self) -> bool:
        return self.path is not None


def discover_models(
    checkpoints: Path | None = None, runs: Path | None = None, *, epochs: bool = True
) -> list[ModelEntry]:
    """Bundled checkpoints (the default first, then by name), then every run's checkpoints, newest run first.

    With `epochs=False` a run contributes only its main checkpoint (best, else last, else newest epoch); the
    model picker uses that, and /train lists each run's epoch checkpoints under the run (`run_epoch_entries`).
    """
    checkpoints = CHECKPOINTS_DIR if checkpoints is None else checkpoints
    runs = runs_dir() if runs is None else runs
    entries: list[ModelEntry] = []
    bundled = sorted(p for p in _safetensors_in(checkpoints))
    bundled.sort(key=lambda p: p.name != DEFAULT_CHECKPOINT.name)  # stable: default first, rest by name
    entries += [bundled_entry(path) for path in bundled]
    for run in run_folders.list_run_folders(runs):
        main = run_folders.find_checkpoint(run)
        if main is None:
            continue  # no checkpoint yet: a run that has just started
        if not _real_child(main, run):
            continue  # a link out of the run folder: never offered
        entries.append(
            ModelEntry(key=f"{RUN}:{run.name}", label=f"run {run.name} · {main.stem}", kind=RUN, path=main, run_dir=run)
        )
        if epochs:
            entries += run_epoch_entries(run)
    return entries


def bundled_entry(path: Path) -> ModelEntry:
    """The picker's entry of a bundled checkpoint."""
    return ModelEntry(key=f"{BUNDLED}:{path.stem}", label=f"{path.stem} (bundled)", kind=BUNDLED, path=path)


def run_epoch_entries(run: Path) -> list[ModelEntry]:
    """A run's checkpoints/epoch-NNN files as model entries, oldest epoch first (links out are never offered)."""
    checkpoints = run_folders.RunLayout(run).checkpoints_dir
    if not _real_child(checkpoints, run):
        return []
    return [
        ModelEntry(
            key=f"{RUN}:{run.name}/{path.stem}", label=f"run {run.name} · {path.stem}", kind=RUN, path=path, run_dir=run
        )
        for _epoch, path in run_folders.epoch_checkpoints(run)
        if _real_child(path, checkpoints)
    ]


def default_model_key(entries: list[ModelEntry]) -> str | None:
    """The bundled default checkpoint when it exists, else the first entry."""
    for entry in entries:
        if entry.path is not None and entry.path.resolve() == DEFAULT_CHECKPOINT.resolve():
            return entry.key
    return entries[0].key if entries else None


def timm_entry(name: str, *, pretrained: bool = False) -> ModelEntry:
    """A timm architecture by name; only the spelling is checked here (loading checks the rest)."""
    name = name.strip()
    for prefix in (f"{TIMM_PRETRAINED}:", f"{TIMM}:"):  # the key form, as in the URL and the README
        if name.startswith(prefix):
            name, pretrained = name[len(prefix) :].strip(), pretrained or prefix == f"{TIMM_PRETRAINED}:"
            break
    if not _TIMM_NAME.match(name):
        raise VitvizError(
            f"{name!r} is not a timm model name (letters, digits, '_', '.', '-'), e.g. vit_tiny_patch16_224"
        )
    kind = TIMM_PRETRAINED if pretrained else TIMM
    what = "pretrained" if pretrained else "random init"
    return ModelEntry(key=f"{kind}:{name}", label=f"timm {name} ({what})", kind=kind, timm_name=name)


def hf_entry(hub_id: str) -> ModelEntry:
    """A Hugging Face Hub model by its id (owner/name); only the spelling is checked here (loading does the rest)."""
    hub_id = hub_id.strip().removeprefix(f"{HF}:").strip()
    if not _HUB_ID.match(hub_id) or ".." in hub_id:
        raise VitvizError(f"{hub_id!r} is not a Hugging Face model id (owner/name), e.g. google/vit-base-patch16-224")
    return ModelEntry(key=f"{HF}:{hub_id}", label=f"Hugging Face {hub_id}", kind=HF, hub_id=hub_id)


def named_entry(text: str, *, pretrained: bool = False) -> ModelEntry:
    """What the add-model box means by `text`: `hf:owner/name`, or a timm name (bare, `timm:` or `timm-pretrained:`)."""
    if text.strip().startswith(f"{HF}:"):
        return hf_entry(text)
    return timm_entry(text, pretrained=pretrained)


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
    if kind == RUN and "/" in rest:  # an epoch checkpoint: not in the picker's list, but under its run
        return next((entry for entry in discover_models() if entry.key == key), None)
    if kind in (TIMM, TIMM_PRETRAINED):
        try:
            return timm_entry(rest, pretrained=kind == TIMM_PRETRAINED)
        except VitvizError:
            return None
    if kind == HF:
        try:
            return hf_entry(rest)
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


# --- run folders (read through vitviz.runs) ------------------------------------------------------


def run_dir_for(entry: ModelEntry, training: dict[str, Any], runs: Path | None = None) -> Path | None:
    """The run folder a model came from: its own folder, or the run named in its training summary."""
    if entry.run_dir is not None:
        return entry.run_dir
    run_id = training.get("run_id")
    if run_folders.valid_run_id(run_id):
        candidate = run_folders.RunLayout((runs_dir() if runs is None else runs) / run_id)
        if candidate.metrics_path.is_file():
            return candidate.path
    return None


def base_entry(entry: ModelEntry, entries: list[ModelEntry]) -> ModelEntry | None:
    """The model a fine-tuned checkpoint started from, as a picker entry, from its lineage (`base_source` in the
    training summary); None when the checkpoint is no fine-tune or its base is not available to the studio
    (a checkpoint or run that is gone, a Hugging Face folder on disk)."""
    if entry.path is None:
        return None
    from vitviz.models.checkpoint import read_checkpoint_meta  # torch: only once a checkpoint is asked about

    try:
        source = read_checkpoint_meta(entry.path).training.get("base_source")
    except VitvizError:
        return None
    if not isinstance(source, str) or not source.strip():
        return None
    try:
        if source.startswith(f"{TIMM}:"):
            return timm_entry(source, pretrained=_finetuned_pretrained(entry.run_dir))
        if source.startswith(f"{HF}:"):
            return hf_entry(source)
    except VitvizError:
        return None
    path = Path(source).expanduser()
    path = (path if path.is_absolute() else REPO_ROOT / path).resolve()  # the backend runs in the repository
    if path.is_dir():  # a run folder: its main checkpoint
        return next((e for e in entries if e.kind == RUN and e.run_dir is not None and e.run_dir.resolve() == path
                     and "/" not in e.key), None)  # fmt: skip
    return next((e for e in entries if e.path is not None and e.path.resolve() == path), None)


def _finetuned_pretrained(run: Path | None) -> bool:
    """Whether the fine-tune in `run` started from timm's pretrained weights (its resolved config says)."""
    if run is None:
        return False
    finetune = (run_folders.read_config(run) or {}).get("finetune")
    return isinstance(finetune, dict) and finetune.get("pretrained") is True


def metrics_beside(entry: ModelEntry) -> Path | None:
    """A training log shipped beside a bundled checkpoint: <stem>.metrics.jsonl."""
    if entry.path is None:
        return None
    candidate = entry.path.with_name(entry.path.stem + ".metrics.jsonl")
    return candidate if candidate.is_file() else None


# --- sample images -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSet:
    """A folder of sample images shipped in assets/samples (one set per sub-folder)."""

    name: str
    files: tuple[Path, ...]


def discover_sample_sets(samples: Path | None = None) -> list[SampleSet]:
    """Image sets under assets/samples: each sub-folder is a set; loose files form the set "samples".

    A set's files are its folder's image files (`vitviz.imagefiles`, the rule the CLI's --images follows),
    less any that is a symbolic link or resolves outside the folder: a sample name never reaches another file.
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
    return [p for p in images_in(folder) if _real_child(p, folder)]
