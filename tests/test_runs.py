"""The run folder as one format: ids, the id generator, a folder written by training read back through
`vitviz.runs` as the app shows it, and folders that are half-written or garbled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training import presets
from training.engine import RunOptions, run
from training.runfolder import RunFolder, default_run_id
from vitviz import runs
from vitviz.errors import VitvizError
from vitviz.models import file_sha256, load_model
from vitviz.ui import catalog

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOOD_IDS = ["a", "7", "tiny-20240101-120000", "tiny-20240101-120000-2", "A.b_c-9", "x" * 128, "run.v2"]
BAD_IDS = [
    "",
    "-rf",
    "--resume",
    ".hidden",
    ".",
    "..",
    "../escape",
    "a/../../b",
    "a/b",
    "a\\b",
    "/etc",
    "/tmp/run",
    "a\x00b",
    "\x00",
    "a\n",
    "a\nb",
    " a",
    "a b",
    "run~",
    "é",
    "x" * 129,
]


# --- ids -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", GOOD_IDS)
def test_the_id_pattern_accepts_plain_names(run_id: str, tmp_path: Path) -> None:
    assert runs.valid_run_id(run_id)
    assert runs.check_run_id(run_id) == run_id
    assert runs.run_path(tmp_path, run_id) == tmp_path / run_id


@pytest.mark.parametrize("run_id", BAD_IDS, ids=[repr(b) for b in BAD_IDS])
def test_the_id_pattern_refuses_escapes_absolute_paths_nul_and_options(run_id: str, tmp_path: Path) -> None:
    assert not runs.valid_run_id(run_id)
    assert runs.RUN_ID_PATTERN.match(run_id) is None  # anchored at both ends, so .match is as safe as fullmatch
    with pytest.raises(VitvizError, match="run id"):
        runs.check_run_id(run_id)
    with pytest.raises(VitvizError, match="run id"):
        runs.run_path(tmp_path / "runs", run_id)
    with pytest.raises(VitvizError, match="run id"):
        RunFolder.create(tmp_path / "runs", run_id)
    assert not (tmp_path / "runs").exists()  # refused before anything is created


@pytest.mark.parametrize("value", [None, 7, b"abc", ["a"]])
def test_only_strings_are_run_ids(value: object) -> None:
    assert not runs.valid_run_id(value)


def test_the_generator_never_collides_with_an_existing_folder(tmp_path: Path) -> None:
    now = time.mktime((2024, 5, 6, 7, 8, 9, 0, 0, -1))
    first = runs.new_run_id("tiny", tmp_path, now=now)
    assert first == "tiny-20240506-070809"
    seen = {first}
    (tmp_path / first).mkdir()
    second = runs.new_run_id("tiny", tmp_path, now=now)
    assert second == f"{first}-2"
    (tmp_path / second).write_text("a file takes the name too")
    third = runs.new_run_id("tiny", tmp_path, now=now)
    assert third == f"{first}-3"
    (tmp_path / third).symlink_to(tmp_path / "nowhere")  # a dangling link still occupies the name
    for _ in range(5):
        seen.add(fresh := runs.new_run_id("tiny", tmp_path, now=now))
        assert not os.path.lexists(tmp_path / fresh)
        (tmp_path / fresh).mkdir()
    assert len(seen) == 6 and f"{first}-3" not in seen
    # The training backend's generator is this one.
    assert default_run_id("tiny", tmp_path) == runs.new_run_id("tiny", tmp_path)


@pytest.mark.parametrize("preset", ["", "-", "../../etc", "my preset/v2", "é" * 10, "p" * 300, ".x"])
def test_generated_ids_are_valid_for_any_preset_name(preset: str, tmp_path: Path) -> None:
    run_id = runs.new_run_id(preset, tmp_path)
    assert runs.valid_run_id(run_id)
    (tmp_path / run_id).mkdir()
    for _ in range(3):  # with the collision counter too
        again = runs.new_run_id(preset, tmp_path)
        assert runs.valid_run_id(again) and again != run_id
        (tmp_path / again).mkdir()


# --- a folder written by training ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny (4 steps an epoch, 2 epochs) stopped by --max-steps after 6 steps: one finished epoch."""
    runs_dir = tmp_path_factory.mktemp("runs")
    result = run(presets.tiny(), RunOptions(runs_dir=runs_dir, run_id="tiny-r1", device="cpu", max_steps=6))
    assert result.status == "stopped" and result.step == 6
    return runs_dir / "tiny-r1"


def test_a_stopped_training_run_reads_back_as_the_app_shows_it(trained: Path) -> None:
    raw = json.loads((trained / "status.json").read_text())
    status = runs.read_status(trained)
    assert status is not None
    assert (status.status, status.step, status.total_steps, status.epoch, status.epochs) == ("failed", 6, 8, 1, 2)
    assert status.resumable and status.pid == os.getpid() and status.run_id == "tiny-r1"
    assert status.reason == raw["reason"] and "--resume" in status.reason
    assert status.metrics == raw["metrics"] and status.updated == raw["updated"]
    assert RunFolder(trained).read_status() == status

    info = runs.run_info(trained)
    assert info.status == runs.STOPPED and info.preset == "tiny" and info.run_id == "tiny-r1"
    assert info.fraction == pytest.approx(6 / 8)
    assert info.metrics["eval_accuracy"] == raw["metrics"]["eval_accuracy"]

    config = runs.read_config(trained)
    assert config == json.loads((trained / "config.json").read_text()) == runs.load_config(trained)
    assert config["preset"] == "tiny" and config["epochs"] == 2

    records = runs.read_metrics(trained)
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]
    summary = runs.read_summary(trained)
    assert len(summary) == 1 and tuple(summary[0]) == runs.SUMMARY_COLUMNS
    assert summary[0]["epoch"] == 1 and summary[0]["step"] == 4
    epoch_record = next(r for r in records if r["kind"] == "epoch")
    assert summary[0]["eval_accuracy"] == pytest.approx(epoch_record["eval_accuracy"])


def test_the_checkpoint_choice_is_the_same_for_the_app_the_cli_and_vitviz_runs(trained: Path) -> None:
    layout = runs.RunLayout(trained)
    assert runs.epoch_checkpoints(trained) == [(1, layout.epoch_checkpoint_path(1))]
    assert runs.find_checkpoint(trained) == runs.run_checkpoint(trained) == layout.best_path
    entries = catalog.discover_models(checkpoints=trained / "none", runs=trained.parent)
    assert [(e.key, e.path) for e in entries] == [
        ("run:tiny-r1", layout.best_path),
        ("run:tiny-r1/epoch-001", layout.epoch_checkpoint_path(1)),
    ]
    loaded = load_model(str(trained))
    assert loaded.content_hash == file_sha256(layout.best_path)
    assert loaded.meta.training["run_id"] == "tiny-r1"
    assert runs.list_run_folders(trained.parent) == [trained]


def test_a_resumed_run_finishes_and_reads_back_finished(trained: Path, tmp_path: Path) -> None:
    copy = tmp_path / trained.name
    subprocess.run(["cp", "-a", str(trained), str(copy)], check=True)
    result = run(None, RunOptions(resume=copy, device="cpu"))
    assert result.status == "finished" and result.step == 8
    info = runs.run_info(copy)
    assert (info.status, info.step, info.epoch, info.reason, info.fraction) == ("finished", 8, 2, None, 1.0)
    assert [r["step"] for r in runs.read_metrics(copy) if r["kind"] == "step"] == list(range(1, 9))
    assert [row["epoch"] for row in runs.read_summary(copy)] == [1, 2]
    assert [e for e, _ in runs.epoch_checkpoints(copy)] == [1, 2]
    assert runs.find_checkpoint(copy) == runs.RunLayout(copy).best_path


# --- partial and garbled folders ---------------------------------------------------------------------


def _status(run: Path, content: bytes | dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (run / "status.json").write_bytes(data)


def test_a_folder_without_files_is_unknown_and_with_a_config_starting(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    assert runs.read_status(run) is None and runs.read_config(run) is None
    assert runs.read_metrics(run) == [] and runs.read_summary(run) == []
    assert runs.find_checkpoint(run) is None and runs.epoch_checkpoints(run) == []
    with pytest.raises(VitvizError, match="no checkpoint yet"):
        runs.run_checkpoint(run)
    info = runs.run_info(run)
    assert (info.status, info.step, info.fraction, info.preset) == ("unknown", None, 0.0, None)
    (run / "config.json").write_text(json.dumps({"preset": "tiny"}))
    assert runs.run_info(run).status == "starting" and runs.run_info(run).preset == "tiny"
    assert runs.run_info(tmp_path / "missing").status == "unknown"


@pytest.mark.parametrize(
    "content",
    [b"", b'{"status": "runn', b"\xff\xfe\x00garbage", b"[1, 2]", b'"finished"', b"null", b"NaN"],
    ids=["empty", "torn", "binary", "list", "string", "null", "nan"],
)
def test_a_garbled_status_reads_as_none(content: bytes, tmp_path: Path) -> None:
    run = tmp_path / "r"
    _status(run, content)
    (run / "config.json").write_bytes(content)
    assert runs.read_status(run) is None
    assert runs.read_config(run) is None
    with pytest.raises(VitvizError, match="config.json"):
        runs.load_config(run)
    assert runs.run_info(run).status == "starting"  # a config.json is there, if unreadable


def test_status_fields_of_the_wrong_type_read_as_absent(tmp_path: Path) -> None:
    run = tmp_path / "r"
    _status(
        run,
        {
            "status": 5,
            "reason": None,
            "pid": "123",
            "updated": "yesterday",
            "progress": {"step": True, "total_steps": 8.0, "epoch": "1", "epochs": None, "fraction": "half"},
            "last": [1],
            "metrics": "none",
            "resumable": "yes",
        },
    )
    status = runs.read_status(run)
    assert status == runs.RunStatus(status=None)
    info = runs.run_info(run)
    assert info.status == "unknown" and info.fraction == 0.0 and info.metrics == {}
    assert info.updated == run.stat().st_mtime  # falls back to the folder's time
    _status(run, {"status": "running", "progress": "oops"})
    assert runs.run_info(run).status == "running" and runs.run_info(run).step is None


def test_running_with_a_dead_pid_is_interrupted_and_a_resumable_failure_stopped(tmp_path: Path) -> None:
    run = tmp_path / "r"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    _status(run, {"status": "running", "pid": dead, "progress": {"step": 3, "total_steps": 6}})
    info = runs.run_info(run)
    assert info.status == "interrupted" and "--resume" in (info.reason or "") and info.fraction == 0.5
    for pid in (0, -1, 2**80):  # never a process: never "alive", never a signal to a process group
        _status(run, {"status": "running", "pid": pid})
        assert runs.run_info(run).status == "interrupted"
    _status(run, {"status": "running", "pid": os.getpid()})
    assert runs.run_info(run).status == "running"
    _status(run, {"status": "failed", "reason": "stopped at step 3", "resumable": True})
    assert (runs.run_info(run).status, runs.run_info(run).reason) == ("stopped", "stopped at step 3")
    _status(run, {"status": "failed", "reason": "loss is nan", "resumable": False})
    assert runs.run_info(run).status == "failed"


def test_the_status_document_is_what_the_reader_reads(tmp_path: Path) -> None:
    progress = {"step": 2, "total_steps": 4, "epoch": 0, "epochs": 1, "fraction": 0.5}
    doc = runs.status_document("running", run_id="r", progress=progress, last={"step": 2, "loss": 1.5})
    assert set(doc) == {"status", "reason", "pid", "run_id", "updated", "progress", "last"}
    assert doc["pid"] == os.getpid() and doc["reason"] is None
    _status(tmp_path / "r", doc)
    status = runs.read_status(tmp_path / "r")
    assert status is not None and (status.status, status.step, status.fraction) == ("running", 2, 0.5)
    assert status.last == {"step": 2, "loss": 1.5}
    with pytest.raises(ValueError, match="status"):
        runs.status_document("done", run_id="r")
    folder = RunFolder.create(tmp_path, "w")
    folder.write_status("finished", progress=progress, metrics={"eval_accuracy": 0.75})
    written = runs.read_status(folder.path)
    assert written is not None and written.status == "finished" and written.run_id == "w"
    assert written.metrics == {"eval_accuracy": 0.75}


def test_metrics_with_a_torn_last_line_and_garbled_lines_keep_the_complete_records(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    lines = [
        json.dumps({"kind": "step", "step": 1}).encode(),
        b"\xff\xfe not utf-8",
        b"[1, 2, 3]",
        b"",
        json.dumps({"kind": "step", "step": 2}).encode(),
        b'{"kind": "step", "st',
    ]
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines))
    assert runs.read_metrics(run) == [{"kind": "step", "step": 1}, {"kind": "step", "step": 2}]


def test_summary_rows_that_are_torn_or_the_wrong_width_are_skipped(tmp_path: Path) -> None:
    run = tmp_path / "r"
    folder = RunFolder.create(tmp_path, "r")
    folder.append_summary({"epoch": 1, "step": 4, "train_loss": 2.5, "eval_accuracy": None, "lr": 1e-3})
    folder.append_summary({"epoch": 2, "step": 8, "train_loss": 2.0, "eval_accuracy": 0.5, "lr": 1e-3})
    with open(run / "summary.csv", "a") as handle:
        handle.write("1,2,3\n")  # too few cells
        handle.write("3,12,1.5,0.9,1.2")  # the row being appended: no newline yet
    rows = runs.read_summary(run)
    assert [(r["epoch"], r["step"], r["train_loss"], r["eval_accuracy"]) for r in rows] == [
        (1, 4, 2.5, None),
        (2, 8, 2.0, 0.5),
    ]
    assert rows[0]["lr"] == pytest.approx(1e-3)
    (run / "summary.csv").write_bytes(b"")
    assert runs.read_summary(run) == []


def test_checkpoint_choice_best_then_last_then_the_newest_epoch_by_number(tmp_path: Path) -> None:
    run = tmp_path / "r"
    layout = runs.RunLayout(run)
    layout.checkpoints_dir.mkdir(parents=True)
    for name in (
        "epoch-002.safetensors",
        "epoch-999.safetensors",
        "epoch-1000.safetensors",
        ".epoch-2000.safetensors.abc123.tmp",  # an atomic write in progress
        "epoch-3000.safetensors.partial",
        "epoch-x.safetensors",
        "epoch-.safetensors",
    ):
        (layout.checkpoints_dir / name).write_bytes(b"x")
    (layout.checkpoints_dir / "epoch-4000.safetensors").mkdir()  # not a file
    assert [e for e, _ in runs.epoch_checkpoints(run)] == [2, 999, 1000]
    assert runs.find_checkpoint(run) == layout.checkpoints_dir / "epoch-1000.safetensors"
    layout.best_path.mkdir()  # a folder called best.safetensors is no checkpoint
    layout.last_path.write_bytes(b"x")
    assert runs.find_checkpoint(run) == layout.last_path
    layout.best_path.rmdir()
    layout.best_path.write_bytes(b"x")
    assert runs.run_checkpoint(run) == layout.best_path
    assert layout.epoch_checkpoint_path(7).name == "epoch-007.safetensors"
    assert layout.state_info_path(12).name == "step-00000012.json"
    assert runs.STATE_PATTERN.match(layout.state_info_path(12).name)


def test_only_real_run_folders_are_listed_newest_first(tmp_path: Path) -> None:
    for name, age in (("old", 300), ("new", 0), ("mid", 100)):
        (tmp_path / name).mkdir()
        stamp = time.time() - age
        os.utime(tmp_path / name, (stamp, stamp))
    (tmp_path / ".logs").mkdir()
    (tmp_path / "-x").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "old", target_is_directory=True)
    assert [p.name for p in runs.list_run_folders(tmp_path)] == ["new", "mid", "old"]
    assert runs.list_run_folders(tmp_path / "missing") == []
    assert runs.list_run_folders(tmp_path / "file") == []
