"""The resume state's schema: every declared component's state is written and read back unchanged, the
files keep the layout earlier runs wrote, and a resumed run holds exactly the state it was resumed from."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training import engine, presets
from training.distributed import DistContext
from training.engine import RunOptions, run
from training.resume import COMPONENTS, Fields, ResumeState, capture
from training.runfolder import RunFolder
from vitviz.errors import VitvizError

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _same(a: Any, b: Any) -> bool:
    """Equal in value and in type, tensors included (dtype, shape, every element)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _optimizer_state(name: str, steps: int) -> dict[str, Any]:
    """A real optimiser state_dict after `steps` steps, with a non-tensor entry as some optimisers keep."""
    torch.manual_seed(steps)
    module = torch.nn.Linear(3, 2)
    if name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, betas=(0.8, 0.95))
    else:
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for group in optimizer.param_groups:
        group["lr_scale"] = 0.5
    for _ in range(steps):
        module(torch.randn(4, 3)).sum().backward()
        optimizer.step()
    state = optimizer.state_dict()
    state["state"][0]["count"] = steps
    return state


def _numpy_state(seed: int, draws: int) -> tuple[Any, ...]:
    """numpy's legacy RNG state in the field's form; a normal draw leaves a cached gaussian."""
    generator = np.random.RandomState(seed)
    generator.standard_normal(draws)
    kind, keys, pos, has_gauss, cached = generator.get_state()
    return (str(kind), tuple(int(k) for k in keys), int(pos), int(has_gauss), float(cached))


def _python_state(seed: int) -> tuple[Any, ...]:
    generator = random.Random(seed)
    generator.gauss(0.0, 1.0)  # leaves a cached value: the third item is a float, not None
    return generator.getstate()


def _sums(scale: float) -> dict[str, float]:
    return {"loss_sum": 1.5 * scale, "correct": 7.0 * scale, "count": 9.0, "images": 16.0, "skipped": 1.0, "steps": 2.0}


# Two different values for every field of every component (a component stored by one codec is one field),
# none of them what a fresh run starts with.
SAMPLES: dict[str, dict[str | None, tuple[Any, Any]]] = {
    "position": {"step": (6, 11), "steps_per_epoch": (4, 5)},
    "schedule": {"total_steps": (40, 80), "warmup_steps": (3, 5)},
    "model": {
        None: (
            {"weight": torch.arange(6.0).reshape(3, 2), "bias": torch.tensor([1, 2], dtype=torch.int64)},
            {"weight": torch.ones(3, 2), "bias": torch.tensor([5, 6], dtype=torch.int64)},
        )
    },
    "optimizer": {None: (_optimizer_state("adamw", 2), _optimizer_state("sgd", 3))},
    "ema": {"weights": ({"weight": torch.full((3, 2), 0.5)}, {"weight": torch.zeros(3, 2), "bias": torch.ones(2)})},
    "rng": {
        "torch": (torch.Generator().manual_seed(1).get_state(), torch.Generator().manual_seed(2).get_state()),
        "cuda": (
            (torch.arange(8, dtype=torch.uint8),),
            (torch.zeros(4, dtype=torch.uint8), torch.ones(4, dtype=torch.uint8)),
        ),
        "python": (_python_state(1), _python_state(2)),
        "numpy": (_numpy_state(1, 1), _numpy_state(2, 3)),
    },
    "guard": {"consecutive_bad": (2, 3), "skipped_total": (5, 9)},
    "metrics": {
        "epoch_sums": (_sums(1.0), _sums(2.0)),
        "window_sums": (_sums(3.0), _sums(4.0)),
        "best": (0.75, 0.5),
        "last_eval": ({"epoch": 1, "loss": 0.5, "accuracy": 0.75, "count": 32}, {"epoch": 2, "loss": 0.25}),
        "last_train": ({"kind": "epoch", "epoch": 1, "train_loss": 1.25}, {"kind": "epoch", "epoch": 2, "lr": None}),
        "log_sizes": ({"metrics": 1234, "summary": 56}, {"metrics": 7, "summary": 0}),
    },
    "history": {
        "resolution_history": (
            [{"method": "bicubic", "old_grid": [4, 4], "new_grid": [6, 6]}],
            [{"method": "none", "old_grid": [2, 2], "new_grid": [2, 2]}, {"method": "bicubic"}],
        )
    },
}


FIELDS = [(name, key) for name, values in SAMPLES.items() for key in values]


def _component(name: str, which: int) -> Any:
    values = SAMPLES[name]
    if None in values:
        return values[None][which]
    return {key: pair[which] for key, pair in values.items()}


def _state(which: int = 0) -> ResumeState:
    return ResumeState({name: _component(name, which) for name in SAMPLES})


def _changed(state: ResumeState, component: str, **values: Any) -> ResumeState:
    """`state` with some fields of one component replaced."""
    return ResumeState({**state.parts, component: {**state[component], **values}})


def _with(state: ResumeState, name: str, key: str | None, value: Any) -> ResumeState:
    if key is None:
        return ResumeState({**state.parts, name: value})
    return _changed(state, name, **{key: value})


def _assert_same_state(got: ResumeState, expected: ResumeState) -> None:
    assert got.parts.keys() == expected.parts.keys()
    for name in expected.parts:
        assert _same(dict(got[name]), dict(expected[name])), name


def test_every_field_has_samples() -> None:
    """A component added to COMPONENTS must be added here too, so that the round trips below cover it."""
    assert set(SAMPLES) == set(COMPONENTS)
    for name, codec in COMPONENTS.items():
        if isinstance(codec, Fields):
            assert set(SAMPLES[name]) == set(codec.codecs), name
    for name, key in FIELDS:
        first, second = SAMPLES[name][key]
        assert not _same(first, second), (name, key)


def test_every_field_round_trips_through_the_run_folder(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, "r")
    state = _state()
    state.to_files(folder)
    loaded = ResumeState.from_files(folder)
    assert loaded is not None
    _assert_same_state(loaded, state)
    assert sorted(p.suffix for p in folder.state_dir.iterdir()) == [".json", ".safetensors"]  # no pickle


@pytest.mark.parametrize(("name", "key"), FIELDS)
def test_each_field_reaches_the_files_and_comes_back(tmp_path: Path, name: str, key: str | None) -> None:
    """Changing one field changes what is written, and reading gives back the changed value: a field that
    the schema writes but does not read (or the reverse) fails here."""
    base = _state()
    changed = _with(base, name, key, SAMPLES[name][key][1])
    base_tensors, base_info = base.encode()
    tensors, info = changed.encode()
    differs = tensors.keys() != base_tensors.keys() or any(
        not torch.equal(tensors[k], base_tensors[k]) for k in tensors
    )
    assert differs or info != base_info or key == "step"  # the run folder writes the step itself
    folder = RunFolder.create(tmp_path, "r")
    changed.to_files(folder)
    loaded = ResumeState.from_files(folder)
    assert loaded is not None
    _assert_same_state(loaded, changed)


def test_no_best_score_yet_round_trips() -> None:
    state = _changed(_changed(_state(), "metrics", best=None, last_eval={}, last_train={}), "rng", cuda=())
    loaded = ResumeState.decode(state.step, *state.encode())
    _assert_same_state(loaded, state)


def test_the_files_keep_the_layout_earlier_runs_wrote() -> None:
    tensors, info = _state().encode()
    assert {k.split(".")[0] for k in tensors} == {"model", "optimizer", "ema", "rng"}  # ema: runs with an EMA
    assert {"model.weight", "model.bias", "rng.torch", "rng.cuda.0", "optimizer.0.exp_avg"} <= tensors.keys()
    assert info.keys() == {
        "optimizer", "rng", "epoch_sums", "window_sums", "best", "consecutive_bad", "skipped_total",
        "last_eval", "last_train", "resolution_history", "log_sizes", "scheduler", "data",
    }  # fmt: skip
    assert info["optimizer"].keys() == {"param_groups", "scalars"} and info["optimizer"]["scalars"] == {
        "0": {"count": 2}
    }
    assert info["rng"].keys() == {"python", "numpy"}
    assert info["scheduler"] == {"step": 6, "total_steps": 40, "warmup_steps": 3}
    assert info["data"] == {"epoch": 1, "batch": 2, "steps_per_epoch": 4}
    json.dumps(info, allow_nan=False)  # plain JSON


def test_a_state_written_before_the_schema_is_read(tmp_path: Path) -> None:
    """The files as the training code wrote them before ResumeState existed (keys written out by hand)."""
    python_state = _python_state(3)
    numpy_state = _numpy_state(3, 1)
    tensors = {
        "model.weight": torch.ones(2, 2),
        "optimizer.0.step": torch.tensor(4.0),
        "optimizer.0.exp_avg": torch.full((2, 2), 0.5),
        "rng.torch": torch.Generator().manual_seed(3).get_state(),
    }
    group = {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.0, "params": [0], "lr_scale": 1.0}
    info = {
        "optimizer": {"param_groups": [group], "scalars": {}},
        "rng": {
            "python": [python_state[0], list(python_state[1]), python_state[2]],
            "numpy": dict(zip(("kind", "keys", "pos", "has_gauss", "cached"), numpy_state)),
        },
        "epoch_sums": {"loss_sum": 1.0, "correct": 2.0, "count": 3.0, "images": 16.0, "skipped": 0.0, "steps": 1.0},
        "window_sums": {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "images": 0.0, "skipped": 0.0, "steps": 0.0},
        "best": 0.5,
        "consecutive_bad": 0,
        "skipped_total": 1,
        "last_eval": {"epoch": 1, "loss": 1.0, "accuracy": 0.5, "count": 32},
        "last_train": {"kind": "epoch", "epoch": 1},
        "resolution_history": [],
        "log_sizes": {"metrics": 100, "summary": 20},
        "scheduler": {"step": 5, "total_steps": 8, "warmup_steps": 0},
        "data": {"epoch": 1, "batch": 1, "steps_per_epoch": 4},
    }
    folder = RunFolder.create(tmp_path, "old")
    folder.save_state(5, tensors, info)
    state = ResumeState.from_files(folder)
    assert state is not None and state.step == 5 and state["position"]["steps_per_epoch"] == 4
    assert state["guard"]["skipped_total"] == 1 and state["ema"]["weights"] == {}  # no EMA before it existed
    assert torch.equal(state["model"]["weight"], torch.ones(2, 2)) and state["rng"]["cuda"] == ()
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], torch.full((2, 2), 0.5))
    assert state["rng"]["python"] == python_state and state["rng"]["numpy"] == numpy_state


def test_a_state_that_lacks_a_field_is_refused_by_name(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, "r")
    _state().to_files(folder)
    json_path = next(folder.state_dir.glob("*.json"))
    doc = json.loads(json_path.read_text())
    del doc["scheduler"]["warmup_steps"]
    json_path.write_text(json.dumps(doc))
    with pytest.raises(VitvizError, match=r"no scheduler\.warmup_steps"):
        ResumeState.from_files(folder)
    assert ResumeState.from_files(RunFolder.create(tmp_path, "empty")) is None


def test_a_resumed_run_holds_exactly_the_state_it_was_resumed_from(tmp_path: Path) -> None:
    """Set up from a saved state (with metrics changed to values a fresh run would not have), the run's own
    capture is that state again: the engine restores every field it saves."""
    cfg = replace(presets.tiny(), log_every=4)  # at step 6 the window holds 2 steps
    assert run(cfg, RunOptions(runs_dir=tmp_path, run_id="r", device="cpu", max_steps=6)).step == 6
    folder = RunFolder(tmp_path / "r")
    saved = ResumeState.from_files(folder)
    assert (
        saved is not None and saved.step == 6 and saved["metrics"]["last_eval"] and saved["metrics"]["best"] is not None
    )
    sizes = folder.log_sizes()
    options = RunOptions(resume=folder.path, device="cpu")

    _changed(saved, "schedule", warmup_steps=saved["schedule"]["warmup_steps"] + 1).to_files(folder)
    with pytest.raises(VitvizError, match="schedule"):
        engine._Run.start(None, options, CPU)

    changed = _changed(
        saved,
        "metrics",
        epoch_sums=_sums(5.0),
        window_sums=_sums(6.0),
        best=0.125,
        last_eval={"epoch": 1, "loss": 9.0, "accuracy": 0.125, "count": 32},
        last_train={**saved["metrics"]["last_train"], "train_loss": 9.0},
        log_sizes={"metrics": sizes["metrics"] - 1, "summary": sizes["summary"] - 1},
    )
    changed = _changed(changed, "guard", consecutive_bad=1, skipped_total=3)
    changed.to_files(folder)
    resumed = engine._Run.start(None, options, CPU)
    assert resumed.position.step == 6
    captured = capture(resumed)
    _assert_same_state(ResumeState.decode(6, *captured.encode()), ResumeState.decode(6, *changed.encode()))

    attributes = set(vars(resumed))
    result = resumed.execute()
    assert result.status == "finished" and result.step == 8
    assert set(vars(resumed)) == attributes  # the loop sets no attribute that __init__ did not
    assert result.metrics["skipped_steps"] == 3  # carried on from the restored count
