"""Resuming: a run stopped after any step, or killed with SIGKILL, continues exactly where it was;
on CPU the resumed run ends with bitwise the same weights, metrics and checkpoints as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training import presets
from training.config import TrainConfig
from training.engine import RunOptions, Trainer, run
from vitviz.models import read_state_dict

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _options(tmp_path: Path, run_id: str, **changes: object) -> RunOptions:
    return RunOptions(runs_dir=tmp_path, run_id=run_id, device="cpu", **changes)


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = read_state_dict(a), read_state_dict(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def _deterministic_lines(path: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in records]


def _summary_without_time(path: Path) -> list[str]:
    return [line.rsplit(",", 1)[0] for line in path.read_text().splitlines()]


def _busy_config() -> TrainConfig:
    """tiny, with everything that draws random numbers: augmentation, dropout, stochastic depth, plus
    gradient accumulation and a warm-up/cosine schedule whose position must survive the restart."""
    base = presets.tiny()
    return replace(
        base,
        model=replace(base.model, drop_rate=0.1, drop_path_rate=0.1),
        data=replace(base.data, augment="light"),
        schedule=replace(base.schedule, warmup_steps=2, decay="cosine"),
        grad_accum=2,
        label_smoothing=0.1,
        resume_every=3,
        log_every=1,
    )


@pytest.mark.parametrize("objective", ["classify", "masked"])
def test_stopped_and_resumed_run_is_bitwise_identical(tmp_path: Path, objective: str) -> None:
    cfg = replace(_busy_config(), objective=objective)
    straight = run(cfg, _options(tmp_path, "straight"))
    # Stop in the middle of the first epoch (4 steps per epoch), then twice more, at a state boundary too.
    stopped = run(cfg, _options(tmp_path, "stopped", max_steps=3))
    assert stopped.status == "stopped" and stopped.step == 3
    status = json.loads((tmp_path / "stopped" / "status.json").read_text())
    assert status["status"] == "failed" and status["resumable"] and "--resume" in status["reason"]
    assert run(None, _options(tmp_path, "ignored", resume=tmp_path / "stopped", max_steps=6)).step == 6
    resumed = run(None, _options(tmp_path, "ignored", resume=tmp_path / "stopped"))
    assert resumed.status == "finished" and resumed.step == straight.step == 8
    assert not (tmp_path / "ignored").exists()

    a, b = tmp_path / "straight", tmp_path / "stopped"
    for name in ("last", "best", "checkpoints/epoch-001", "checkpoints/epoch-002"):
        _assert_same_weights(a / f"{name}.safetensors", b / f"{name}.safetensors")
    assert _deterministic_lines(b / "metrics.jsonl") == _deterministic_lines(a / "metrics.jsonl")
    assert _summary_without_time(b / "summary.csv") == _summary_without_time(a / "summary.csv")
    assert json.loads((tmp_path / "stopped" / "status.json").read_text())["status"] == "finished"
    assert resumed.metrics == straight.metrics


def test_in_memory_data_trains_the_same_run_and_resumes_exactly(tmp_path: Path) -> None:
    """data.in_memory only skips the per-image work: same weights and metrics as the streamed run, and resumable."""
    base = replace(_busy_config(), data=replace(presets.tiny().data, num_eval_samples=24))  # augment=none
    streamed = run(base, _options(tmp_path, "streamed"))
    cfg = replace(base, data=replace(base.data, in_memory=True))
    assert run(cfg, _options(tmp_path, "memory", max_steps=5)).step == 5
    resumed = run(None, _options(tmp_path, "ignored", resume=tmp_path / "memory"))
    assert resumed.status == "finished" and resumed.step == streamed.step
    a, b = tmp_path / "streamed", tmp_path / "memory"
    for name in ("last", "checkpoints/epoch-001", "checkpoints/epoch-002"):
        _assert_same_weights(a / f"{name}.safetensors", b / f"{name}.safetensors")
    assert _deterministic_lines(b / "metrics.jsonl") == _deterministic_lines(a / "metrics.jsonl")


def test_sigterm_stops_at_a_step_boundary_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _busy_config()
    run(cfg, _options(tmp_path, "straight"))
    real_step = Trainer.train_step

    def step_then_signal(self: Trainer, images: torch.Tensor, labels: torch.Tensor, step: int) -> object:
        outcome = real_step(self, images, labels, step)
        if step == 4:  # the fifth step: a termination request arrives while it runs
            os.kill(os.getpid(), signal.SIGTERM)
        return outcome

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", step_then_signal)
        stopped = run(cfg, _options(tmp_path, "stopped"))
    assert stopped.status == "stopped" and stopped.step == 5
    assert "stop signal" in json.loads((tmp_path / "stopped" / "status.json").read_text())["reason"]
    assert run(None, _options(tmp_path, "x", resume=tmp_path / "stopped")).status == "finished"
    _assert_same_weights(tmp_path / "straight" / "last.safetensors", tmp_path / "stopped" / "last.safetensors")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run put the old handler back


def test_resume_state_holds_no_pickles(tmp_path: Path) -> None:
    run(presets.tiny(), _options(tmp_path, "r", max_steps=2))
    state_files = sorted(p.suffix for p in (tmp_path / "r" / "state").iterdir())
    assert state_files == [".json", ".safetensors"]
    info = json.loads(next((tmp_path / "r" / "state").glob("*.json")).read_text())
    assert info["step"] == 2 and {"optimizer", "rng", "log_sizes"} <= info.keys()


def _train_command(runs_dir: Path, run_id: str) -> list[str]:
    return [
        sys.executable, "-m", "training", "train", "--preset", "tiny", "--no-progress", "--device", "cpu",
        "--runs-dir", str(runs_dir), "--run-id", run_id,
        "--set", "data.num_train_samples=32", "--set", "epochs=8", "--set", "resume_every=1",
        "--set", "data.augment=light", "--set", "model.drop_path_rate=0.1",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_a_run_killed_with_sigkill_resumes_exactly(tmp_path: Path) -> None:
    subprocess.run(_train_command(tmp_path, "straight"), cwd=ROOT, env=_env(), check=True, capture_output=True)
    victim = subprocess.Popen(
        _train_command(tmp_path, "killed"), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state_dir = tmp_path / "killed" / "state"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and victim.poll() is None:
            if any(int(p.stem.split("-")[1]) >= 4 for p in state_dir.glob("step-*.json")):
                break
            time.sleep(0.02)
        assert victim.poll() is None, "the run ended before it could be killed"
        victim.send_signal(signal.SIGKILL)  # no chance to clean up: mid-step, maybe mid-write
    finally:
        victim.kill()
        victim.wait()
    # What the app sees after a kill -9: "running", with a pid that no longer exists.
    assert json.loads((tmp_path / "killed" / "status.json").read_text())["status"] == "running"

    resume = [sys.executable, "-m", "training", "train", "--resume", str(tmp_path / "killed"),
              "--no-progress", "--device", "cpu"]  # fmt: skip
    subprocess.run(resume, cwd=ROOT, env=_env(), check=True, capture_output=True)
    _assert_same_weights(tmp_path / "straight" / "last.safetensors", tmp_path / "killed" / "last.safetensors")
    killed, straight = tmp_path / "killed" / "metrics.jsonl", tmp_path / "straight" / "metrics.jsonl"
    assert _deterministic_lines(killed) == _deterministic_lines(straight)
    assert json.loads((tmp_path / "killed" / "status.json").read_text())["status"] == "finished"
