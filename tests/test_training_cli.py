"""`python -m training`: user mistakes are one line and exit 2, the documented commands parse, and
`evaluate` reports accuracy, per-class accuracy, the confusion matrix and the pointing game correctly."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import training.__main__ as cli
from training import presets
from training.data import build_dataset, eval_transform
from training.engine import RunOptions, run
from vitviz.capture import attention_maps
from vitviz.faithfulness import FaithfulnessOptions, run_faithfulness
from vitviz.models import load_checkpoint
from vitviz.tokens import token_layout

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    run(presets.tiny(), RunOptions(runs_dir=root, run_id="tiny", device="cpu"))
    return root / "tiny"


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--preset", "tiny", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["train", "--preset", "tiny", "--set", "optim.lr=fast"], "optim.lr must be a number"),
        (["train", "--preset", "tiny", "--set", "epochs"], "key=value"),
        (["train", "--preset", "tiny", "--dataset", "imagenet-22k"], "unknown dataset 'imagenet-22k'"),
        (["train", "--preset", "tiny", "--max-steps", "0"], "--max-steps must be positive"),
        (["train", "--resume", "{tmp}/not-a-run"], "is not a run folder"),
        (["train", "--preset", "tiny", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        ([], "required: command"),
        (["evaluate", "{tmp}/missing.safetensors", "--dataset", "shapes"], "no such checkpoint"),
        (["evaluate", "{run}", "--dataset", "flowers"], "unknown dataset 'flowers'"),
        (["evaluate", "{run}", "--dataset", "digits"], "the model predicts 10 classes (circle, square"),
        (["evaluate", "{run}", "--dataset", "shapes", "--split", "testing"], "unknown split"),
        (["finetune", "--from", "{tmp}/missing"], "no such checkpoint or run folder"),
        (["finetune", "--from", "{run}", "--set", "model.depth=4"], "keeps the source's architecture"),
        (["finetune", "--from", "{run}", "--freeze-blocks", "5", "--runs-dir", "{tmp}"], "more than the model's 2"),
        (["finetune", "--from", "{run}", "--img-size", "30", "30", "--runs-dir", "{tmp}"], "not divisible"),
    ],
)
def test_user_mistakes_print_one_line_and_exit_2(
    args: list[str], fragment: str, tmp_path: Path, trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.format(tmp=tmp_path, run=trained_run) for a in args]
    code, out, err = _main(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_a_real_process_shows_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "training", "train", "--preset", "tiny", "--set", "model.depth=-1"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["error: config field depth must be between 1 and 256; got -1"]


def test_an_existing_run_id_is_refused(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--preset", "tiny", "--runs-dir", str(trained_run.parent), "--run-id", "tiny", "--no-progress"]
    code, _, err = _main(args, capsys)
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1


def test_the_documented_commands_parse() -> None:
    text = cli.__doc__.replace("\\\n", " ")  # join continued lines
    examples = [line for line in text.splitlines() if line.startswith("    ")]  # the indented example block
    commands = [line.split("-m training ", 1)[1] for line in examples if "-m training " in line]
    assert len(commands) >= 7 and any("torchrun --nproc_per_node" in line for line in text.splitlines())
    parser = cli.build_parser()
    for command in commands:
        assert parser.parse_args(shlex.split(command, comments=True)).command in ("train", "finetune", "evaluate")


def test_train_through_the_cli_prints_the_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--preset", "tiny", "--runs-dir", str(tmp_path), "--run-id", "cli", "--no-progress",
            "--set", "epochs=1", "--set", "optim.lr=2e-3", "--max-steps", "2"]  # fmt: skip
    code, out, _ = _main(args, capsys)
    assert code == 0 and out.strip() == str(tmp_path / "cli")
    saved = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert saved["optim"]["lr"] == 2e-3 and saved["epochs"] == 1
    assert json.loads((tmp_path / "cli" / "status.json").read_text())["progress"]["step"] == 2
    code, out, _ = _main(["train", "--resume", str(tmp_path / "cli"), "--no-progress"], capsys)
    assert code == 0 and json.loads((tmp_path / "cli" / "status.json").read_text())["status"] == "finished"


def _reference_rollout_map(attentions: list[torch.Tensor]) -> torch.Tensor:
    """docs/design.md's rollout with mean fusion and no discarding, one image at a time, in float64."""
    n = attentions[0].shape[-1]
    rollout = torch.eye(n, dtype=torch.float64)
    for attn in attentions:
        fused = attn[0].double().mean(dim=0)
        a = 0.5 * fused + 0.5 * torch.eye(n, dtype=torch.float64)
        a = a / a.sum(dim=1, keepdim=True)
        rollout = a @ rollout
    return rollout[0, 1:]


def test_evaluate_reports_accuracy_confusion_and_pointing_game(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "eval.json"
    args = ["evaluate", str(trained_run), "--dataset", "shapes", "--num-samples", "24", "--batch-size", "10",
            "--faithfulness-images", "4", "--faithfulness-steps", "6", "--json", str(out_path)]  # fmt: skip
    code, out, _ = _main(args, capsys)
    assert code == 0 and out.startswith("accuracy ")
    assert "deletion/insertion AUC on 4 images: rollout " in out
    report = json.loads(out_path.read_text())

    loaded = load_checkpoint(trained_run / "best.safetensors")
    model, meta = loaded.model, loaded.meta
    data = build_dataset("shapes", split="test", img_size=meta.input_size, num_samples=24, seed=0)
    transform = eval_transform(input_size=meta.input_size, in_chans=meta.in_chans, mean=meta.mean, std=meta.std)
    layout = token_layout(model)
    sh, sw = layout.stride
    confusion = np.zeros((10, 10), dtype=int)
    hits, chances = [], []
    for index in range(len(data)):
        image, label = data[index]
        x = transform(image)[None]
        with torch.no_grad():
            predicted = int(model(x).argmax())
        confusion[label, predicted] += 1
        mask = np.asarray(data.mask(index), dtype=bool)
        overlaps = [
            [mask[r * sh : (r + 1) * sh, c * sw : (c + 1) * sw].any() for c in range(layout.grid[1])]
            for r in range(layout.grid[0])
        ]
        top = int(_reference_rollout_map(attention_maps(model, x)).argmax())
        hits.append(overlaps[top // layout.grid[1]][top % layout.grid[1]])
        chances.append(np.mean(overlaps))

    assert report["num_images"] == 24
    assert report["confusion_matrix"] == confusion.tolist()
    assert report["accuracy"] == pytest.approx(np.trace(confusion) / 24)
    for i, name in enumerate(report["class_names"]):
        row = confusion[i].sum()
        assert report["per_class_accuracy"][name] == (pytest.approx(confusion[i, i] / row) if row else None)
    assert report["pointing_game"]["rollout"] == pytest.approx(np.mean(hits))
    assert report["pointing_game"]["random"] == pytest.approx(np.mean(chances))

    # Deletion and insertion AUCs: vitviz.faithfulness on the split's first 4 images, with the same options.
    first = torch.stack([transform(data[index][0]) for index in range(4)])
    options = FaithfulnessOptions(methods=("rollout", "gradient-rollout", "random"), steps=6, batch_size=10)
    expected = run_faithfulness(model.eval(), first, [f"shapes/test/{i}" for i in range(4)], options)
    curves = report["faithfulness"]
    assert curves["num_images"] == 4
    assert curves["protocol"] == {"steps": 6, "baseline": "normalised-zero", "target": "predicted"}
    assert list(curves["methods"]) == ["rollout", "gradient-rollout", "random"]
    for name, method in expected.methods.items():
        got = curves["methods"][name]
        assert (got["deletion_auc"], got["insertion_auc"]) == (method.deletion_auc, method.insertion_auc)


def test_evaluate_on_a_dataset_without_masks_has_no_pointing_game(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = presets.tiny()
    digits = replace(
        cfg,
        model=replace(cfg.model, img_size=(8, 8), patch_size=4),
        data=replace(cfg.data, dataset="digits", num_train_samples=None, num_eval_samples=None),
        epochs=1,
    )
    run(digits, RunOptions(runs_dir=tmp_path, run_id="digits", device="cpu", max_steps=3))
    args = ["evaluate", str(tmp_path / "digits"), "--dataset", "digits", "--json", str(tmp_path / "d.json")]
    code, _out, _ = _main(args, capsys)
    report = json.loads((tmp_path / "d.json").read_text())
    assert code == 0 and "pointing_game" not in report and report["num_images"] > 0
    assert sum(map(sum, report["confusion_matrix"])) == report["num_images"]
    # The curves need no masks: the first 100 images (the default), 2x2 patches so S = min(4, 50) = 4.
    assert report["faithfulness"]["num_images"] == min(100, report["num_images"])
    assert report["faithfulness"]["protocol"]["steps"] == 4

    args = [*args[:-2], "--faithfulness-images", "0", "--json", str(tmp_path / "none.json")]
    assert _main(args, capsys)[0] == 0 and "faithfulness" not in json.loads((tmp_path / "none.json").read_text())


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--faithfulness-images", "-1"], "--faithfulness-images must be 0 or more, got -1"),
        (["--faithfulness-steps", "0"], "--faithfulness-steps must be at least 1, got 0"),
        (["--faithfulness-methods", "rollout,saliency"], "unknown method saliency"),
        (["--faithfulness-images", "many"], "invalid int value: 'many'"),
    ],
)
def test_evaluate_faithfulness_options_are_checked_first(
    extra: list[str], fragment: str, trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _main(["evaluate", str(trained_run), "--dataset", "shapes", *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


def test_presets_command_lists_every_preset_as_json() -> None:
    """The app reads presets through this command instead of importing the backend."""
    from training.presets import PRESETS

    done = subprocess.run(
        [sys.executable, "-m", "training", "presets", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    configs = json.loads(done.stdout)
    assert list(configs) == list(PRESETS)
    assert configs["tiny"] == PRESETS["tiny"]().to_dict()
