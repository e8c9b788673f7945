"""Training that is killed, runs out of disk, loses write permission or meets NaN keeps every finished checkpoint.

Runs use the tiny preset (64 procedural shapes at 32 px, 4 steps per epoch) for 3 epochs, with a resume state
after every step and a checkpoint after every epoch, in children of the fork server. An uninterrupted run is
the reference: training on CPU is deterministic, so every checkpoint a faulty run leaves, and every run resumed
after a fault, must be bitwise equal to the reference's.

Kills (SIGKILL, nothing can clean up) come in two kinds, planned from a fixed seed: at a random moment of the
run, and at chosen points inside the writers (half of a checkpoint's bytes written; before fsync; before and
after the rename; between a resume state's tensors and its JSON; while old states are deleted). One run is
killed again and again, resumed after each kill; after every kill a copy of the folder is resumed to the end.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from tests.reliability.conftest import Sandbox

EPOCHS, STEPS_PER_EPOCH = 3, 4  # tiny: 64 images, batch 16
SETTINGS = ["--set", f"epochs={EPOCHS}", "--set", "resume_every=1", "--set", "checkpoint_every=1"]
SEED = 20240611
KILLS_WANTED = 24
MAX_LAUNCHES = 60

# Points inside the writers where a kill lands: (where, part of the path it must contain).
WRITE_POINTS = [
    ("mid-write", "/checkpoints/epoch-"),
    ("mid-write", "last.safetensors"),
    ("mid-write", "best.safetensors"),
    ("before-fsync", "epoch-"),
    ("before-rename", "/checkpoints/epoch-"),
    ("after-rename", "last.safetensors"),
    ("before-rename", "/state/step-"),
    ("after-rename", "/state/step-"),
    ("before-unlink", "/state/step-"),
    ("before-rename", "status.json"),
    ("before-fsync", "/state/"),
    ("before-rename", "best.safetensors"),
]


def train_argv(runs: Path, run_id: str, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--runs-dir", str(runs), "--run-id", run_id, "--no-progress",
            "--device", "cpu", *SETTINGS, *extra]  # fmt: skip


def resume_argv(run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--resume", str(run_dir), "--no-progress", "--device", "cpu", *extra]


def visible_checkpoints(run_dir: Path) -> dict[str, Path]:
    """The checkpoints a user (or the app) sees in a run folder, by path relative to it."""
    found = [
        run_dir / "best.safetensors",
        run_dir / "last.safetensors",
        *sorted(run_dir.glob("checkpoints/*.safetensors")),
    ]
    return {str(p.relative_to(run_dir)): p for p in found if p.is_file() and not p.name.startswith(".")}


def temporary_files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*.tmp"))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metric_lines(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without wall-clock fields."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "seconds")} for line in lines]


def latest_state_step(run_dir: Path) -> int | None:
    """The newest resume state whose JSON and tensors are both complete (read here, not by training/)."""
    steps = []
    for path in (run_dir / "state").glob("step-*.json"):
        try:
            info = json.loads(path.read_text())
            safetensors.torch.load_file(str(run_dir / "state" / info["tensors"]))
        except Exception:
            continue
        steps.append(int(info["step"]))
    return max(steps) if steps else None


def error_line(result: dict[str, Any]) -> str:
    """The one line that tells the user why training stopped (progress lines before it are fine)."""
    stderr = result["stderr"]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and stderr.rstrip().endswith(lines[0]), stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def reference(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    runs = tmp_path_factory.mktemp("reference")
    child = sandbox.run("train", argv=train_argv(runs, "ref"))
    assert child.ok and child.result["code"] == 0, (child.stderr, child.result)
    run_dir = runs / "ref"
    return {
        "dir": run_dir,
        "seconds": child.seconds,
        "checkpoints": {rel: weights(p) for rel, p in visible_checkpoints(run_dir).items()},
        "metrics": metric_lines(run_dir),
    }


def check_resumes_to_the_reference(sandbox: Sandbox, run_dir: Path, reference: dict[str, Any]) -> dict[str, Any]:
    """Resume a run folder to the end; report whether it finished bitwise equal to the reference."""
    child = sandbox.run("train", argv=resume_argv(run_dir))
    result = child.result or {"code": None, "stderr": child.stderr}
    report = {"code": result["code"], "stderr": result["stderr"][-1500:], "tmp": temporary_files(run_dir)}
    if result["code"] == 0:
        present = visible_checkpoints(run_dir)
        report["same_checkpoints"] = present.keys() == reference["checkpoints"].keys() and all(
            same_weights(weights(p), reference["checkpoints"][rel]) for rel, p in present.items()
        )
        report["same_metrics"] = metric_lines(run_dir) == reference["metrics"]
        report["status"] = json.loads((run_dir / "status.json").read_text())["status"]
    return report


def inspect_after_kill(run_dir: Path, reference: dict[str, Any], seen: set[str]) -> dict[str, Any]:
    """What a user finds in a run folder right after a kill."""
    from vitviz.errors import VitvizError
    from vitviz.models import load_model

    present = visible_checkpoints(run_dir)
    reference_weights = list(reference["checkpoints"].values())
    foreign = []  # checkpoints under a real name that are not exactly one the reference run wrote
    for rel, path in present.items():
        try:
            load_model(str(path))
            found = weights(path)
        except (VitvizError, Exception) as exc:
            foreign.append(f"{rel}: {exc}")
            continue
        if rel.startswith("checkpoints/"):
            ok = same_weights(found, reference["checkpoints"][rel])
        else:
            ok = any(same_weights(found, w) for w in reference_weights)
        if not ok:
            foreign.append(f"{rel}: weights differ from the reference run's")
    latest = None
    if present:
        try:
            latest = load_model(str(run_dir)).source
        except VitvizError as exc:
            latest = f"FAILED: {exc}"
    step = latest_state_step(run_dir)
    finished_epochs = (step or 0) // STEPS_PER_EPOCH
    promised = {f"checkpoints/epoch-{e:03d}.safetensors" for e in range(1, finished_epochs + 1)}
    return {
        "present": sorted(present),
        "lost": sorted((seen | promised) - set(present)),
        "bad": foreign,
        "latest_loads": latest is None or not latest.startswith("FAILED"),
        "state_step": step,
        "has_config": (run_dir / "config.json").is_file(),
        "tmp": temporary_files(run_dir),
    }


@pytest.fixture(scope="module")
def kill_chain(sandbox: Sandbox, reference: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Kill runs again and again (random moments and inside writes, alternately, from a fixed seed)."""
    rng = random.Random(SEED)
    runs = tmp_path_factory.mktemp("killed")
    scratch = tmp_path_factory.mktemp("resumed")
    records: list[dict] = []
    run_number, run_dir, seen = 0, None, set()
    for launch in range(MAX_LAUNCHES):
        if sum(r["killed"] for r in records) >= KILLS_WANTED:
            break
        if run_dir is None or not (run_dir / "config.json").is_file():
            run_number += 1
            run_dir, seen = runs / f"run-{run_number}", set()
            argv = train_argv(runs, run_dir.name)
        else:
            argv = resume_argv(run_dir)
        if launch % 2 == 0:
            delay = rng.uniform(0.05, 1.0) * reference["seconds"]
            how, faults, kill_after = f"random moment {delay:.2f} s", [], delay
        else:
            where, match = rng.choice(WRITE_POINTS)
            nth = rng.randint(1, 3)
            how, faults, kill_after = (
                f"{where} of write #{nth} matching {match}",
                [{"kind": "kill", "where": where, "match": match, "nth": nth}],
                None,
            )
        _pid, out = sandbox.start("train", argv=argv, faults=faults, kill_after=kill_after)
        child = sandbox.finish(out)
        killed = child.signal == signal.SIGKILL
        record = {"launch": argv[1], "how": how, "killed": killed, "exit": child.exit_code}
        if killed:
            record.update(inspect_after_kill(run_dir, reference, seen))
            seen |= set(record["present"])
            copy = scratch / f"kill-{len(records):02d}" / run_dir.name
            shutil.copytree(run_dir, copy)
            record["resume"] = check_resumes_to_the_reference(sandbox, copy, reference)
        else:
            record["result"] = child.result
            run_dir = None  # finished (or failed): the next launch starts a new run
        records.append(record)
    return records


def _kills(records: list[dict]) -> list[dict]:
    return [r for r in records if r["killed"]]


def test_at_least_20_kills_at_random_moments_and_inside_writes(kill_chain: list[dict], tally: dict) -> None:
    kills = _kills(kill_chain)
    counts = tally["training: kill -9"]
    counts["kills"] = len(kills)
    counts["kills inside writes"] = sum("write #" in r["how"] for r in kills)
    counts["launches that finished before their kill"] = sum(not r["killed"] for r in kill_chain)
    assert len(kills) >= 20
    assert counts["kills inside writes"] >= 8 and len(kills) - counts["kills inside writes"] >= 8
    assert all(r["exit"] == 0 and r["result"]["code"] == 0 for r in kill_chain if not r["killed"]), kill_chain


def test_no_finished_checkpoint_is_ever_lost_or_damaged(kill_chain: list[dict], tally: dict) -> None:
    kills = _kills(kill_chain)
    tally["training: kill -9"]["checkpoints lost"] = sum(len(r["lost"]) for r in kills)
    tally["training: kill -9"]["damaged checkpoints under a real name"] = sum(len(r["bad"]) for r in kills)
    assert [(r["how"], r["lost"]) for r in kills if r["lost"]] == []
    assert [(r["how"], r["bad"]) for r in kills if r["bad"]] == []
    assert all(r["latest_loads"] for r in kills)


def test_every_killed_run_resumes_to_the_uninterrupted_result(kill_chain: list[dict], tally: dict) -> None:
    kills = _kills(kill_chain)
    resumed = [r for r in kills if r["has_config"]]
    tally["training: kill -9"]["resumes that finished bitwise equal"] = sum(
        r["resume"]["code"] == 0 and r["resume"]["same_checkpoints"] and r["resume"]["same_metrics"] for r in resumed
    )
    for record in resumed:
        resume = record["resume"]
        assert resume["code"] == 0, (record["how"], resume["stderr"])
        assert resume["status"] == "finished" and resume["same_checkpoints"] and resume["same_metrics"], record
    for record in kills:
        if not record["has_config"]:  # killed before the run folder was set up: nothing to resume, nothing lost
            assert record["present"] == [] and record["resume"]["code"] == 2, record
            assert "Traceback" not in record["resume"]["stderr"]


def test_resume_clears_the_temporary_files_a_kill_leaves(kill_chain: list[dict], tally: dict) -> None:
    """A kill inside a write leaves a hidden temporary file; the resumed run must not keep it forever."""
    kills = [r for r in _kills(kill_chain) if r["has_config"]]
    tally["training: kill -9"]["kills that left a temporary file"] = sum(bool(r["tmp"]) for r in kills)
    tally["training: kill -9"]["temporary files left after resuming"] = sum(len(r["resume"]["tmp"]) for r in kills)
    assert any(r["tmp"] for r in kills), "no kill landed between creating and renaming a temporary file"
    assert [(r["how"], r["resume"]["tmp"]) for r in kills if r["resume"]["tmp"]] == []


# --- a full disk, a folder that refuses writes --------------------------------------------------------------------


def left_intact(run_dir: Path, reference: dict[str, Any], before: dict[str, bytes] | None = None) -> list[str]:
    """Problems with what a failed run left: temporary files, or a checkpoint under a real name that is neither
    one the reference run wrote nor (with `before`) the file that was there before the failure."""
    problems = [f"temporary file {name}" for name in temporary_files(run_dir)]
    for rel, path in visible_checkpoints(run_dir).items():
        if before is not None and rel in before:
            same = path.read_bytes() == before[rel]
        elif rel.startswith("checkpoints/"):
            same = same_weights(weights(path), reference["checkpoints"][rel])
        else:
            same = any(same_weights(weights(path), w) for w in reference["checkpoints"].values())
        if not same:
            problems.append(f"{rel} is not a checkpoint the clean run wrote")
    if before is not None:
        problems += [f"{rel} was lost" for rel in before if rel not in visible_checkpoints(run_dir)]
    return problems


def _can_mount_tmpfs(folder: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if done.returncode == 0:
        subprocess.run(["umount", str(folder)], check=True)
    return done.returncode == 0


def _make_read_only(folder: Path) -> str | None:
    """Make `folder` and its sub-folders refuse new entries for real: chmod a-w for ordinary users; as root
    (whom chmod does not stop) the immutable attribute. Returns how, or None when neither works here."""
    folders = [folder, *[p for p in folder.rglob("*") if p.is_dir()]]
    if os.geteuid() != 0:
        for f in folders:
            f.chmod(0o555)
        return "chmod a-w"
    if shutil.which("chattr") is None:
        return None
    for f in folders:
        subprocess.run(["chattr", "+i", str(f)], capture_output=True)
    probe = folder / ".probe"
    try:
        probe.touch()
    except PermissionError:
        return "chattr +i"
    probe.unlink()
    _make_writable(folder)
    return None


def _make_writable(folder: Path) -> None:
    for f in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        if os.geteuid() == 0 and shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(f)], capture_output=True)
        f.chmod(0o755)


WRITE_FAULTS = {
    # ENOSPC injected into every writer from the k-th file write on (runs anywhere).
    **{
        f"enospc-injected-after-{k}-writes": ("injected", [{"kind": "full-disk", "after_writes": k}])
        for k in (2, 9, 20, 33, 47)
    },
    # The runs folder on a tmpfs of this size, which fills up during the run (needs root with CAP_SYS_ADMIN).
    **{f"enospc-tmpfs-{kib}k": ("tmpfs", kib) for kib in (256, 640, 1024)},
    # EACCES from the k-th new file on: the folder refuses to create, rename or delete entries (runs anywhere).
    **{
        f"eacces-injected-after-{k}-files": ("injected", [{"kind": "read-only", "after_creates": k}])
        for k in (0, 5, 20, 40)
    },
    # A run stopped after 6 steps, its folder made read-only for real (chmod, or chattr +i as root), resumed.
    "read-only-folder-on-resume": ("read-only", None),
}


def _run_write_fault(kind: str, setting: Any, sandbox: Sandbox, reference: dict[str, Any], folder: Path) -> dict:
    runs = folder / "runs"
    runs.mkdir()
    run_dir, before, how = runs / "run", None, kind
    if kind == "injected":
        child = sandbox.run("train", argv=train_argv(runs, "run"), faults=setting)
    elif kind == "tmpfs":
        if not _can_mount_tmpfs(runs):
            return {"skip": "mounting a tmpfs needs root with CAP_SYS_ADMIN; the injected ENOSPC cases cover it"}
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={setting}k", "tmpfs", str(runs)], check=True)
        try:
            child = sandbox.run("train", argv=train_argv(runs, "run"))
            problems = left_intact(run_dir, reference)
            subprocess.run(["mount", "-o", "remount,size=64m", str(runs)], check=True)  # the user frees space
            resume = check_resumes_to_the_reference(sandbox, run_dir, reference)
        finally:
            subprocess.run(["umount", "-l", str(runs)], check=False)
        return {"how": how, "child": child, "problems": problems, "resume": resume}
    else:
        first = sandbox.run("train", argv=train_argv(runs, "run", "--max-steps", "6"))
        assert first.ok and first.result["code"] == 0, first.result
        before = {rel: p.read_bytes() for rel, p in visible_checkpoints(run_dir).items()}
        how = _make_read_only(run_dir)
        if how is None:
            return {
                "skip": "cannot make a folder read-only here (root without chattr); the injected EACCES cases cover it"
            }
        try:
            child = sandbox.run("train", argv=resume_argv(run_dir))
            problems = left_intact(run_dir, reference, before)
        finally:
            _make_writable(run_dir)
        return {"how": how, "child": child, "problems": problems,
                "resume": check_resumes_to_the_reference(sandbox, run_dir, reference)}  # fmt: skip
    problems = left_intact(run_dir, reference)
    resume = check_resumes_to_the_reference(sandbox, run_dir, reference) if (run_dir / "config.json").exists() else None
    return {
        "how": how,
        "child": child,
        "problems": problems,
        "resume": resume,
        "checkpoints": visible_checkpoints(run_dir),
    }


@pytest.fixture(scope="module")
def write_faults(
    sandbox: Sandbox, reference: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict]:
    results = {}
    for name, (kind, setting) in WRITE_FAULTS.items():
        results[name] = _run_write_fault(kind, setting, sandbox, reference, tmp_path_factory.mktemp(name))
    return results


def _fault(write_faults: dict[str, dict], name: str) -> dict:
    outcome = write_faults[name]
    if "skip" in outcome:
        pytest.skip(outcome["skip"])
    assert outcome["child"].exit_code == 0, outcome["child"].stderr[-3000:]
    return outcome


def _category(name: str) -> str:
    return "training: full disk" if name.startswith("enospc") else "training: permission error"


@pytest.mark.parametrize("name", list(WRITE_FAULTS))
def test_write_fault_keeps_every_checkpoint_and_leaves_no_temporary_file(name: str, write_faults, tally: dict) -> None:
    outcome = _fault(write_faults, name)
    counts = tally[_category(name)]
    counts["cases"] += 1
    counts["checkpoints lost or damaged, temporary files left"] += len(outcome["problems"])
    assert outcome["child"].result["code"] != 0, "the run did not fail: the fault never reached a writer"
    assert outcome["problems"] == []


@pytest.mark.parametrize("name", list(WRITE_FAULTS))
def test_write_fault_run_resumes_to_the_uninterrupted_result_once_writable(name: str, write_faults) -> None:
    outcome = _fault(write_faults, name)
    resume = outcome["resume"]
    if resume is None:  # failed before config.json existed: nothing to resume, and nothing was lost
        assert outcome["checkpoints"] == {}
        return
    assert resume["code"] == 0 and resume["status"] == "finished", resume
    assert resume["same_checkpoints"] and resume["same_metrics"], resume


@pytest.mark.parametrize("name", list(WRITE_FAULTS))
def test_write_fault_reaches_the_user_as_one_line(name: str, write_faults, tally: dict) -> None:
    outcome = _fault(write_faults, name)
    stderr = outcome["child"].result["stderr"]
    tally[_category(name)]["tracebacks"] += "Traceback" in stderr
    # A refused write reads EACCES "Permission denied" (chmod, injected) or EPERM "Operation not permitted" (chattr +i).
    expected = (
        ("No space left on device",) if name.startswith("enospc") else ("Permission denied", "Operation not permitted")
    )
    line = error_line(outcome["child"].result)
    assert any(text in line for text in expected), line


def test_runs_folder_that_cannot_be_created_gives_one_line(sandbox: Sandbox, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the runs folder should be\n")
    child = sandbox.run("train", argv=train_argv(blocker, "x"))
    assert child.ok and child.result["code"] == 2
    assert "cannot create run folder" in error_line(child.result)


# --- NaN ------------------------------------------------------------------------------------------------------------


def test_one_nan_batch_is_skipped_by_the_guard_and_the_run_finishes(
    sandbox: Sandbox, tmp_path: Path, tally: dict
) -> None:
    child = sandbox.run("train", argv=train_argv(tmp_path, "nan"), faults=[{"kind": "nan", "steps": [5]}])
    assert child.ok and child.result["code"] == 0, child.result
    run_dir = tmp_path / "nan"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "finished" and status["metrics"]["skipped_steps"] == 1
    assert "step 6: loss or gradient not finite; update skipped" in child.result["stderr"]
    for path in visible_checkpoints(run_dir).values():
        assert all(bool(torch.isfinite(t).all()) for t in weights(path).values())
    tally["training: NaN guard"]["NaN batches injected"] += 1
    tally["training: NaN guard"]["caught"] += 1


def test_nan_that_persists_stops_the_run_with_one_line_and_finite_checkpoints(
    sandbox: Sandbox, reference: dict[str, Any], tmp_path: Path, tally: dict
) -> None:
    steps = [8, 9, 10]  # the first three steps of epoch 3 (0-based), with max_bad_steps=3
    argv = train_argv(tmp_path, "nan", "--set", "max_bad_steps=3")  # does not change what the clean steps compute
    child = sandbox.run("train", argv=argv, faults=[{"kind": "nan", "steps": steps}])
    assert child.exit_code == 0, child.stderr[-3000:]
    assert child.result["code"] == 1
    assert "not finite for 3 steps in a row" in error_line(child.result)
    run_dir = tmp_path / "nan"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "not finite" in status["reason"]
    assert left_intact(run_dir, reference) == []  # epochs 1 and 2, exactly as the clean run wrote them
    assert {"checkpoints/epoch-001.safetensors", "checkpoints/epoch-002.safetensors"} <= set(
        visible_checkpoints(run_dir)
    )
    tally["training: NaN guard"]["NaN batches injected"] += 3
    tally["training: NaN guard"]["caught"] += 3
