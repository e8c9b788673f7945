"""The one model-card presenter (vitviz/card.py): the training summary read from the one key the training
backend writes, `metrics`, and the card as ordered (label, value) rows for `info`, the overview and /compare."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vitviz import card as card_text
from vitviz.cli import info_lines
from vitviz.pipeline import ModelCard

ROOT = Path(__file__).resolve().parents[1]
METRICS = {
    "train_loss": 0.25,
    "train_accuracy": 0.9,
    "eval_loss": 0.3125,
    "eval_accuracy": 0.875,
    "best_accuracy": 0.9375,
    "skipped_steps": 0,
}
SUMMARY = {  # what the training backend writes into a checkpoint (training/engine.py), in its order
    "run_id": "r1",
    "preset": "shapes-default",
    "dataset": "shapes",
    "train_split": "train",
    "objective": "classify",
    "epochs": 2,
    "epochs_planned": 3,
    "steps": 40,
    "finetuned_from": None,
    "metrics": METRICS,
}
GEOMETRY = [
    ("model", "run/checkpoints/best.safetensors  (vitviz)"),
    ("parameters", "12,345"),
    ("input", "32x48 px, 3 channel(s)"),
    ("tokens", "4x6 patches of 8x8 px + 1 prefix token(s)"),
    ("transformer", "depth 2, 3 heads, width 24"),
    ("classes", "3: circle, square, triangle"),
]


def _card(training: dict, *, config: dict | None = None, arch: str = "vitviz", source: str = "") -> ModelCard:
    return ModelCard(
        source=source or "run/checkpoints/best.safetensors",
        arch=arch,
        img_size=(32, 48),
        grid=(4, 6),
        stride=(8, 8),
        num_prefix_tokens=1,
        depth=2,
        num_heads=3,
        embed_dim=24,
        num_classes=3,
        parameters=12_345,
        in_chans=3,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        config=config,
        class_names=("circle", "square", "triangle"),
        training=training,
        resolution_history=({"method": "bicubic", "old_grid": [2, 3], "new_grid": [4, 6]},) if config else (),
    )


VARIANT = {"pos_embed": "learned", "stem": "patch", "global_pool": "token"}


def test_a_card_with_metrics_reads_as_ordered_rows() -> None:
    rows = card_text.card_rows(_card(SUMMARY, config=VARIANT), checkpoint="best")
    assert rows == [
        *GEOMETRY,
        ("variant", "position embedding learned, stem patch, pooling token"),
        ("checkpoint", "best, saved at epoch 2 step 40 of a run of 3 epochs"),
        ("run id", "r1"),
        ("preset", "shapes-default"),
        ("dataset", "shapes"),
        ("train split", "train"),
        ("objective", "classify"),
        (
            "metrics",
            "train_loss=0.25, train_accuracy=0.9, eval_loss=0.3125, eval_accuracy=0.875, best_accuracy=0.9375, "
            "skipped_steps=0",
        ),
        ("resampled", "[2, 3] -> [4, 6] (bicubic)"),
    ]
    assert card_text.accuracies(SUMMARY) == {"Eval accuracy": 0.875, "Best accuracy": 0.9375, "Train accuracy": 0.9}
    assert card_text.recorded_accuracy(SUMMARY) == 0.875
    assert card_text.saved_step(SUMMARY) == 40


def test_a_card_without_metrics_has_no_metrics_row_and_no_accuracy() -> None:
    summary = {key: value for key, value in SUMMARY.items() if key != "metrics"}
    rows = card_text.card_rows(_card(summary, config=VARIANT))
    assert ("checkpoint", "saved at epoch 2 step 40 of a run of 3 epochs") in rows
    assert "metrics" not in dict(rows)
    assert card_text.accuracies(summary) == {} and card_text.recorded_accuracy(summary) is None
    partial = {"dataset": "shapes", "metrics": {"eval_accuracy": None, "train_accuracy": 0.5}}
    assert card_text.accuracies(partial) == {"Train accuracy": 0.5} and card_text.recorded_accuracy(partial) is None
    assert card_text.training_rows(partial) == [("dataset", "shapes")]


def test_only_the_key_the_training_backend_writes_is_read() -> None:
    """`metrics` is the summary's one key for final numbers; any other spelling is not a metric."""
    other = {"final_metrics": METRICS}
    assert card_text.metrics(other) == {} and card_text.accuracies(other) == {}
    assert card_text.recorded_accuracy(other) is None and card_text.metric_text(other) is None
    assert card_text.metrics({"metrics": "not a table"}) == {}


@pytest.mark.parametrize(
    "source, arch", [("timm:vit_tiny_patch16_224", "vit_tiny_patch16_224"), ("hf:google/vit-base", "hf-vit")]
)
def test_a_timm_or_hf_card_has_geometry_only(source: str, arch: str) -> None:
    rows = card_text.card_rows(_card({}, source=source, arch=arch))
    assert rows == [("model", f"{source}  ({arch})"), *GEOMETRY[1:]]
    assert card_text.training_rows({}) == [] and card_text.accuracies({}) == {}


def test_info_prints_the_presenters_rows() -> None:
    card = _card(SUMMARY, config=VARIANT)
    lines = info_lines(card)
    assert lines == [f"{label:<11} {value}" for label, value in card_text.card_rows(card)]
    assert lines[0] == "model       run/checkpoints/best.safetensors  (vitviz)"
    assert "train split train" in lines and "transformer depth 2, 3 heads, width 24" in lines


def test_the_presenter_imports_no_torch() -> None:
    tree = ast.parse((ROOT / "vitviz" / "card.py").read_text(encoding="utf-8"))
    runtime = [
        node
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))  # imports under `if TYPE_CHECKING:` are types only
    ]
    names = {alias.name for node in runtime if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module or "" for node in runtime if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in names} <= {"__future__", "collections", "typing"}


def test_no_other_presenter_reads_the_training_summarys_metrics() -> None:
    """`info`, the overview and /compare read the summary through vitviz/card.py only."""
    for path in ("vitviz/cli.py", "vitviz/ui/overview.py", "vitviz/ui/compare.py"):
        source = (ROOT / path).read_text(encoding="utf-8")
        strings = {node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant) and node.value}
        assert not {"metrics", "final_metrics", "eval_accuracy", "steps"} & strings, path
