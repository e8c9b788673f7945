"""The resume state is the composition of the run's components, declared once: each component saves and
restores itself, a component added to the one list is saved and restored without any other change, and a
run whose stateful attributes differ from the list is refused."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training import engine, presets, resume
from training.distributed import DistContext
from training.engine import RunOptions
from training.guard import StepGuard, TrainingFailed
from training.metrics import MetricsLog, StepOutcome
from training.resume import COMPONENTS, Fields, Json, ProcessRng, Stateful, TensorMap
from training.runfolder import RunFolder
from training.schedule import DataPosition, Schedule, lr_factor
from vitviz.errors import VitvizError

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
OTHER_RANK = DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _outcome(skipped: bool) -> StepOutcome:
    return StepOutcome(loss_sum=2.0, correct=3, count=4, skipped=skipped, lr=0.1)


# --- each component saves and restores itself ------------------------------------------------------------


def test_the_guard_counts_skipped_steps_and_stops_after_too_many_in_a_row() -> None:
    guard = StepGuard(max_bad_steps=3)
    for skipped in (True, True, False, True, True):
        guard.record(_outcome(skipped), step=1)
    assert guard.state_dict() == {"consecutive_bad": 2, "skipped_total": 4}
    restored = StepGuard(max_bad_steps=3)
    restored.load_state_dict(guard.state_dict())
    with pytest.raises(TrainingFailed, match="not finite for 3 steps in a row"):
        restored.record(_outcome(True), step=6)  # the restored count goes on
    assert restored.state_dict() == {"consecutive_bad": 3, "skipped_total": 5}


def test_the_data_position_continues_at_its_step_and_refuses_another_epoch_length() -> None:
    position = DataPosition(steps_per_epoch=4, epochs=2)
    for _ in range(6):
        position.advance()
    assert (position.epoch, position.batch) == (1, 2)
    assert position.progress() == {"step": 6, "total_steps": 8, "epoch": 1, "epochs": 2, "fraction": 0.75}
    restored = DataPosition(steps_per_epoch=4, epochs=2)
    restored.load_state_dict(position.state_dict())
    assert restored.state_dict() == {"step": 6, "steps_per_epoch": 4}
    with pytest.raises(VitvizError, match="5 steps per epoch, but the run started with 4"):
        DataPosition(steps_per_epoch=5, epochs=2).load_state_dict(position.state_dict())


def test_the_schedule_is_a_function_of_the_step_and_refuses_another_schedule() -> None:
    schedule = Schedule(total_steps=20, warmup_steps=2, decay="cosine", min_ratio=0.1)
    expected = [lr_factor(s, total_steps=20, warmup_steps=2, decay="cosine", min_ratio=0.1) for s in range(20)]
    assert [schedule.factor(s) for s in range(20)] == expected
    Schedule(total_steps=20, warmup_steps=2, decay="cosine", min_ratio=0.1).load_state_dict(schedule.state_dict())
    with pytest.raises(VitvizError, match="schedule now has 20 steps"):
        schedule.load_state_dict({"total_steps": 20, "warmup_steps": 3})


def test_the_process_rngs_come_back_to_the_saved_state() -> None:
    rng = ProcessRng()
    saved = rng.state_dict()
    expected = (torch.rand(3), random.random(), np.random.standard_normal())
    rng.load_state_dict(saved)
    again = (torch.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_the_metrics_log_saves_its_sums_and_cuts_its_files_back_on_the_main_process(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, "r")
    guard = StepGuard(max_bad_steps=5)
    log = MetricsLog(CPU, folder, steps_per_epoch=2, guard=guard)
    log.add(_outcome(False), images=8)
    log.add(_outcome(False), images=8)
    log.epoch_record(2, 0.1, {"loss": 0.5, "accuracy": 0.75, "count": 4}, has_eval_split=True)
    log.add(_outcome(False), images=8)
    state = log.state_dict()
    assert state["best"] == 0.75 and state["last_eval"]["accuracy"] == 0.75 and state["epoch_sums"]["steps"] == 1
    assert state["log_sizes"] == folder.log_sizes() and state["log_sizes"]["summary"] > 0
    log.step_record(3, 0.1)  # written after the state was saved: a resumed run replays it

    other_rank = MetricsLog(OTHER_RANK, folder, steps_per_epoch=2, guard=guard)
    other_rank.load_state_dict(state)
    assert folder.log_sizes() != state["log_sizes"]  # only the main process touches the files
    # The state's sums are every rank's added up: the main process continues from them, the others from zero
    # (with the step and skip counts, which every rank shares).
    per_rank = dict.fromkeys(("loss_sum", "correct", "count", "images"), 0.0)
    assert other_rank.epoch_sums.values == {**state["epoch_sums"], **per_rank}
    assert other_rank.window.values == {**state["window_sums"], **per_rank}
    assert (other_rank.best, other_rank.last_eval, other_rank.last_train) == (
        state["best"], state["last_eval"], state["last_train"],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="prepare_state"):
        other_rank.state_dict()  # a rank's own sums are not the run's
    restored = MetricsLog(CPU, folder, steps_per_epoch=2, guard=guard)
    restored.load_state_dict(state)
    assert folder.log_sizes() == state["log_sizes"]
    assert restored.state_dict() == state
    restored.prepare_state()  # one process: the ranks' sums are its own
    assert restored.state_dict() == state


# --- the composition, declared once -----------------------------------------------------------------------


def _started(tmp_path: Path, run_id: str, **options: Any) -> engine._Run:
    cfg = presets.tiny()
    return engine._Run.start(cfg, RunOptions(runs_dir=tmp_path, run_id=run_id, device="cpu", **options), CPU)


def test_the_runs_stateful_attributes_are_the_declared_components(tmp_path: Path) -> None:
    run = _started(tmp_path, "r")
    stateful = {name for name, value in vars(run).items() if isinstance(value, Stateful)}
    assert stateful == set(COMPONENTS)
    assert set(resume.capture(run).parts) == set(COMPONENTS)


def test_a_stateful_attribute_missing_from_the_list_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(COMPONENTS, "guard")
    with pytest.raises(TypeError, match=r"not declared \['guard'\]"):
        _started(tmp_path, "r")


def test_a_declared_component_the_run_lacks_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(COMPONENTS, "swa", TensorMap("swa."))
    with pytest.raises(TypeError, match=r"declared but missing \['swa'\]"):
        _started(tmp_path, "r")


class _Toy:
    """A component as a later one would be written: state_dict and load_state_dict, nothing else."""

    def __init__(self) -> None:
        self.count = 0
        self.weights = torch.zeros(3)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "weights": {"w": self.weights}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        self.weights = state["weights"]["w"].clone()


def test_a_component_added_to_the_list_is_saved_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One entry in COMPONENTS and the attribute on the run: the component reaches the files, and a resumed
    run has it back, with no change to the state, the capture or the restore."""
    monkeypatch.setitem(COMPONENTS, "toy", Fields({"count": Json(("toy", "count"), int), "weights": TensorMap("toy.")}))
    made_by = engine._Run.__init__

    def with_toy(self: engine._Run, **kwargs: Any) -> None:
        self.toy = _Toy()  # what the run's __init__ would do
        made_by(self, **kwargs)

    monkeypatch.setattr(engine._Run, "__init__", with_toy)
    run = _started(tmp_path, "r", max_steps=3)
    run.toy.count, run.toy.weights = 7, torch.tensor([1.0, 2.0, 3.0])
    assert run.execute().status == "stopped"

    folder = RunFolder(tmp_path / "r")
    raw = folder.latest_state()
    assert raw is not None and raw.info["toy"] == {"count": 7} and torch.equal(raw.tensors["toy.w"], run.toy.weights)
    resumed = engine._Run.start(None, RunOptions(resume=folder.path, device="cpu"), CPU)
    assert resumed.position.step == 3 and resumed.toy.count == 7
    assert torch.equal(resumed.toy.weights, torch.tensor([1.0, 2.0, 3.0]))
    assert resumed.execute().status == "finished"
