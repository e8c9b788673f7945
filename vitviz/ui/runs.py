"""Start and stop training runs as subprocesses (`python -m training ...`); the app never trains itself.

No streamlit here. The processes this app started are remembered for the life of the server (one registry
for every session), so any session can stop them; runs started elsewhere are only followed, through their
run folder. A run's stdout and stderr go to <runs>/.logs/<run-id>.log, because the run folder itself is
created by the training process (which refuses an existing non-empty one).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vitviz.errors import VitvizError
from vitviz.runs import check_run_id
from vitviz.ui.catalog import LOGS_FOLDER, REPO_ROOT

logger = logging.getLogger(__name__)

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=.*$")
_PROCESSES: dict[str, subprocess.Popen] = {}
_STARTED_AT: dict[str, float] = {}  # run id -> unix time its newest process was started here
_LOCK = threading.Lock()


@dataclass(frozen=True)
class RunRequest:
    """What the /train form asks for; turned into a `python -m training` command line."""

    command: str  # "train" or "finetune"
    preset: str
    run_id: str
    runs_dir: Path
    overrides: tuple[str, ...] = ()  # KEY=VALUE, passed as --set
    source: str | None = None  # finetune: a checkpoint, run folder, timm:<name> or hf:<id> to start from
    img_size: tuple[int, int] | None = None  # finetune: new input size
    freeze_blocks: int | None = None
    max_steps: int | None = None
    dataset: str | None = None  # a data set name or folder:PATH (None: the preset's)
    strategy: str | None = None  # finetune: full, linear, freeze:K or lora (None: the preset's)
    lora_rank: int | None = None  # finetune with lora: the adapters' rank
    pretrained: bool = False  # finetune from timm: timm's pretrained weights


def parse_overrides(text: str) -> tuple[str, ...]:
    """One KEY=VALUE per line (blank lines and # comments ignored); a malformed line raises VitvizError."""
    overrides = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not _OVERRIDE.match(line):
            raise VitvizError(f"override line {number} is not KEY=VALUE (e.g. optim.lr=1e-3): {line[:80]}")
        overrides.append(line)
    return tuple(overrides)


def _finetune_args(request: RunRequest) -> list[str]:
    """The fine-tuning arguments of a request (none for training from scratch)."""
    if request.command != "finetune":
        return []
    if not request.source:
        raise VitvizError("fine-tuning needs a checkpoint to start from")
    args = ["--from", request.source]
    if request.img_size is not None:
        args += ["--img-size", str(request.img_size[0]), str(request.img_size[1])]
    if request.freeze_blocks:
        args += ["--freeze-blocks", str(request.freeze_blocks)]
    if request.pretrained:
        args += ["--pretrained"]
    if request.strategy:
        args += ["--strategy", request.strategy]
    if request.lora_rank is not None:
        if request.strategy != "lora":
            raise VitvizError("a LoRA rank goes with the lora strategy only")
        args += ["--lora-rank", str(request.lora_rank)]
    return args


def _dataset_args(request: RunRequest) -> list[str]:
    return ["--dataset", request.dataset] if request.dataset else []


def command_line(request: RunRequest) -> list[str]:
    """The argument list of the training process (no shell: every value is one argument)."""
    if request.command not in ("train", "finetune"):
        raise VitvizError(f"unknown training command {request.command!r}")
    check_run_id(request.run_id)
    args = [sys.executable, "-m", "training", request.command, "--preset", request.preset]
    args += _finetune_args(request) + _dataset_args(request)
    args += ["--runs-dir", str(request.runs_dir), "--run-id", request.run_id, "--no-progress"]
    if request.max_steps:
        args += ["--max-steps", str(request.max_steps)]
    for override in request.overrides:
        args += ["--set", override]
    return args


def check_command_line(request: RunRequest) -> list[str]:
    """`python -m training check` with the request's preset, source and overrides (what the run would resolve)."""
    args = [sys.executable, "-m", "training", "check", "--kind", request.command, "--preset", request.preset]
    args += _finetune_args(request) + _dataset_args(request)
    for override in request.overrides:
        args += ["--set", override]
    return args


def check_request(request: RunRequest, *, timeout_s: float = 120.0) -> None:
    """Resolve the run's config with the training backend's own parser; its error line as VitvizError.

    The backend is run as a process (the app never imports it), so the answer is exactly what
    `python -m training train|finetune` would say before training.
    """
    command_line(request)  # the app's own checks first (run id, command)
    try:
        done = subprocess.run(
            check_command_line(request),
            cwd=REPO_ROOT,
            env=_backend_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VitvizError(f"could not check the run's settings: {exc}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        message = lines[-1] if lines else f"the training backend refused the settings (exit {done.returncode})"
        raise VitvizError(message.removeprefix("error: "))


def _backend_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def log_path(runs_dir: Path, run_id: str) -> Path:
    return runs_dir / LOGS_FOLDER / f"{run_id}.log"


def start_run(request: RunRequest) -> subprocess.Popen:
    """Start the training process in its own session (it outlives the app); refuses a taken run id."""
    args = command_line(request)
    if (request.runs_dir / request.run_id).exists():
        raise VitvizError(f"a run called {request.run_id} already exists; choose another run id")
    return _spawn(args, request.runs_dir, request.run_id)


def resume_command_line(runs_dir: Path, run_id: str) -> list[str]:
    """`python -m training train --resume <runs>/<run-id>`: continue a stopped run from its saved state."""
    check_run_id(run_id)
    return [
        sys.executable, "-m", "training", "train", "--resume", str(runs_dir / run_id),
        "--runs-dir", str(runs_dir), "--no-progress",
    ]  # fmt: skip


def resume_run(runs_dir: Path, run_id: str) -> subprocess.Popen:
    """Continue a stopped, resumable run in a new training process (its log continues in the same file)."""
    args = resume_command_line(runs_dir, run_id)
    if not (runs_dir / run_id).is_dir():
        raise VitvizError(f"there is no run called {run_id} to resume")
    return _spawn(args, runs_dir, run_id)


def _spawn(args: list[str], runs_dir: Path, run_id: str) -> subprocess.Popen:
    log_file = log_path(runs_dir, run_id)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        if run_id in _PROCESSES and _PROCESSES[run_id].poll() is None:
            raise VitvizError(f"run {run_id} is already running")
        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                args,
                cwd=REPO_ROOT,
                env=_backend_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _PROCESSES.pop(run_id, None)  # re-inserted last: the newest run comes first in started_ids()
        _PROCESSES[run_id] = process
        _STARTED_AT[run_id] = time.time()
    logger.info("started run %s (pid %d): %s", run_id, process.pid, " ".join(args[1:]))
    return process


def started_here(run_id: str) -> subprocess.Popen | None:
    """The process of a run this app started, or None."""
    with _LOCK:
        return _PROCESSES.get(run_id)


def started_at(run_id: str) -> float | None:
    """When this app started the run's newest process (unix time), or None when it did not start one."""
    with _LOCK:
        return _STARTED_AT.get(run_id)


def alive_here(run_id: str) -> bool:
    """Whether a process this app started for the run is still running."""
    process = started_here(run_id)
    return process is not None and process.poll() is None


def started_ids() -> list[str]:
    """Ids of the runs this app started, newest first."""
    with _LOCK:
        return list(reversed(_PROCESSES))


def exit_code(run_id: str) -> int | None:
    """The exit status of a run this app started, or None while it runs (or when not started here)."""
    process = started_here(run_id)
    return None if process is None else process.poll()


def stop_run(run_id: str) -> bool:
    """Ask a run started here to stop (SIGTERM: it saves a resume state at the next step); False if not ours."""
    process = started_here(run_id)
    if process is None or process.poll() is not None:
        return False
    process.send_signal(signal.SIGTERM)
    logger.info("asked run %s (pid %d) to stop", run_id, process.pid)
    return True


def log_tail(runs_dir: Path, run_id: str, lines: int = 15) -> str:
    """The last lines of a run's log written by the app, or "" when there is none."""
    path = log_path(runs_dir, run_id)
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16_384))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


_PRESETS_LOCK = threading.Lock()  # one `python -m training presets` at a time: a second caller waits for it
_PRESETS: dict[str, dict[str, dict]] = {}  # "configs": the presets, once read
_PREFETCH: list[threading.Thread] = []


def _preset_configs() -> dict[str, dict]:
    """Every preset's config, read once per server (see `prefetch_presets`); a read that timed out (a very
    busy machine) is not kept, so the next page run tries again."""
    with _PRESETS_LOCK:
        if "configs" not in _PRESETS:
            configs = _read_preset_configs()
            if configs is None:
                return {}
            _PRESETS["configs"] = configs
        return _PRESETS["configs"]


def prefetch_presets() -> None:
    """Read the presets in a background thread, once per server, so /train does not wait for them.

    The subprocess imports the training backend (torch and timm: seconds of CPU); the app calls this after
    its first page is drawn, so by the time /train is opened the list is usually there already.
    """
    with _LOCK:
        if _PREFETCH:
            return
        thread = threading.Thread(target=_preset_configs, name="vitviz-presets", daemon=True)
        _PREFETCH.append(thread)
    thread.start()


def _read_preset_configs() -> dict[str, dict] | None:
    """Every preset's config, from `python -m training presets --json` (the app never imports the backend);
    {} when the backend cannot list them, None when it did not answer in time."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "training", "presets", "--json"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        data = json.loads(done.stdout) if done.returncode == 0 else None
    except subprocess.TimeoutExpired as exc:
        logger.warning("could not list the training presets: %s", exc)
        return None
    except (OSError, ValueError) as exc:
        logger.warning("could not list the training presets: %s", exc)
        return {}
    if not isinstance(data, dict):
        logger.warning("could not list the training presets: %s", done.stderr.strip()[-500:])
        return {}
    return data


def available_presets() -> list[str]:
    """Names of the training backend's presets (empty if the backend cannot be run)."""
    return list(_preset_configs())


def preset_config(name: str) -> dict | None:
    """The resolved config of a preset as JSON data, to show what an override changes."""
    return _preset_configs().get(name)
