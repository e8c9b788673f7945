"""training.make_assets: a finished run is copied into the bundle (checkpoint, curves, snapshots), snapshots of
an earlier recipe are removed, the training processes get the asked-for compute threads, and the sample images
and their masks are written to separate folders."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import make_assets
from training.make_assets import Bundle, make_bundle


def _finished_run(folder: Path, epochs: int) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"status": "finished"}))
    (folder / "last.safetensors").write_bytes(b"last")
    (folder / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "loss": 2.3}\n')
    for epoch in range(1, epochs + 1):
        (folder / "checkpoints" / f"epoch-{epoch:03d}.safetensors").write_bytes(f"epoch {epoch}".encode())
    return folder


def test_a_finished_run_becomes_the_bundle_and_old_snapshots_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = tmp_path / "assets"
    bundled.mkdir()
    (bundled / "demo-epoch-008.safetensors").write_bytes(b"from an 8-epoch recipe")
    (bundled / "other-epoch-008.safetensors").write_bytes(b"another bundle's")
    monkeypatch.setattr(make_assets, "CHECKPOINTS_DIR", bundled)
    calls: list[tuple[list[str], int]] = []

    def evaluate(args: list[str], threads: int) -> make_assets.StepTimes:
        calls.append((list(args), threads))
        Path(args[args.index("--json") + 1]).write_text(
            json.dumps({"accuracy": 0.9, "num_images": 1000, "pointing_game": {"rollout": 0.95, "random": 0.3}})
        )
        return make_assets.StepTimes(1.0, 1.0)

    monkeypatch.setattr(make_assets, "_run", evaluate)
    runs = tmp_path / "runs"
    _finished_run(runs / "demo", epochs=4)
    row = make_bundle(
        Bundle("demo", ("train", "--preset", "tiny"), snapshots=(1, 2, 4)), runs, retrain=False, threads=2
    )

    assert [c[0][0] for c in calls] == ["evaluate"] and calls[0][1] == 2  # reused: no training, only evaluation
    assert (bundled / "demo.safetensors").read_bytes() == b"last"
    assert (bundled / "demo.metrics.jsonl").read_text().startswith('{"kind": "step"')
    assert sorted(p.name for p in bundled.glob("demo-epoch-*")) == [
        "demo-epoch-001.safetensors", "demo-epoch-002.safetensors", "demo-epoch-004.safetensors",
    ]  # fmt: skip
    assert (bundled / "demo-epoch-002.safetensors").read_bytes() == b"epoch 2"
    assert (bundled / "other-epoch-008.safetensors").exists()  # another bundle's snapshots stay
    assert not list(bundled.glob(".*"))  # no temporary files left behind
    assert (row["accuracy"], row["pointing"], row["random"]) == (0.9, 0.95, 0.3)


def test_training_processes_get_the_asked_for_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, str] = {}

    def fake_run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
        seen.update(env)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(make_assets.subprocess, "run", fake_run)
    make_assets._run(["presets"], 3)
    assert seen["OMP_NUM_THREADS"] == "3" and seen["MKL_NUM_THREADS"] == "3"


MNIST_BUNDLES = ("mnist-small", "shapes-to-mnist-linear", "shapes-to-mnist-lora", "shapes-to-mnist-full")


@pytest.mark.parametrize("name", MNIST_BUNDLES)
def test_the_mnist_bundles_are_evaluated_on_the_bundled_test_set_whatever_the_working_directory(name: str) -> None:
    bundle = next(b for b in make_assets.BUNDLES if b.name == name)
    args = list(bundle.eval_args)
    root = Path(args[args.index("--root") + 1])
    assert root.is_absolute() and root == make_assets.REPO_ROOT / "assets" / "data" / "mnist"
    assert sorted(p.name for p in root.glob("t10k-*")) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert args[args.index("--split") + 1] == "test[8000:]"  # the 2,000 images no MNIST run trains on


def test_a_fine_tune_of_a_bundled_checkpoint_starts_from_its_repository_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base is named relative to the repository root (the runs' working directory), so the lineage the
    checkpoint records is the same on every machine and the studio finds the base among the bundled ones."""
    monkeypatch.setattr(make_assets, "CHECKPOINTS_DIR", tmp_path / "assets")
    calls: list[list[str]] = []

    def run(args: list[str], threads: int) -> make_assets.StepTimes:
        calls.append(list(args))
        if args[0] == "finetune":
            _finished_run(Path(args[args.index("--runs-dir") + 1]) / args[args.index("--run-id") + 1], epochs=0)
        else:
            Path(args[args.index("--json") + 1]).write_text(json.dumps({"accuracy": 0.9, "num_images": 2000}))
        return make_assets.StepTimes(1.0, 1.0)

    monkeypatch.setattr(make_assets, "_run", run)
    bundle = next(b for b in make_assets.BUNDLES if b.name == "shapes-to-mnist-lora")
    make_bundle(bundle, tmp_path / "runs", retrain=True, threads=1)
    training = calls[0]
    assert training[:3] == ["finetune", "--preset", "shapes-to-mnist-lora"]
    source = training[training.index("--from") + 1]
    assert source == "assets/checkpoints/shapes-default.safetensors"
    assert (make_assets.REPO_ROOT / source).is_file()
    names = [b.name for b in make_assets.BUNDLES]
    assert names.index("shapes-default") < names.index(bundle.name)  # a full rebuild remakes the base first


def test_samples_and_their_masks_go_to_separate_folders(tmp_path: Path) -> None:
    """The samples folder holds only images to analyse; the masks are the bundled ones, under the same names."""
    written = make_assets.write_samples(tmp_path / "samples", tmp_path / "masks")
    names = sorted(p.name for p in written)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == names
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == names
    for name in names:
        for kind in ("samples", "masks"):
            fresh, bundled = (
                np.asarray(Image.open(folder / kind / name)) for folder in (tmp_path, make_assets.REPO_ROOT / "assets")
            )
            assert np.array_equal(fresh, bundled), f"{kind}/{name}"
