"""The bundled checkpoints and sample images in assets/: they load, are the architectures the app says they
are, the default reproduces its documented accuracy, the snapshots are one run in order, and the samples
are held-out test images.

The documented numbers (docs/training.md, "Bundled checkpoints") are measured by
`python -m training evaluate assets/checkpoints/shapes-default.safetensors --dataset shapes --split test`:
the 1,000 images of the shapes test split, which no training run ever sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.shapes import SHAPE_CLASSES, ShapesDataset
from training.evaluate import evaluate_checkpoint
from vitviz.models import load_model, read_checkpoint_meta
from vitviz.tokens import token_layout

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
CHECKPOINTS = ASSETS / "checkpoints"
SAMPLES = ASSETS / "samples"
MASKS = ASSETS / "masks"
DEFAULT = CHECKPOINTS / "shapes-default.safetensors"

# The default on the 1,000 test images (docs/training.md). The evaluation is deterministic on one
# machine; the tolerance of 3 images allows for float differences between CPUs and BLAS builds.
DOCUMENTED_SUBSET = 1000
DOCUMENTED_ACCURACY = 0.939  # 939 of 1,000
DOCUMENTED_POINTING = 0.998  # 998 of 1,000 (the random-patch baseline: 38.1%)
TOLERANCE = 3 / DOCUMENTED_SUBSET
TARGET = 0.90  # the default's goal: at least 90% accuracy and 90% pointing game on 1,000 fresh held-out images

# stem -> what the app shows it as: position embedding, stem, input size, grid
SHAPES = list(SHAPE_CLASSES)
EXPECTED = {
    "shapes-default": {
        "pos_embed": "learned",
        "stem": "patch",
        "img_size": (32, 32),
        "grid": (8, 8),
        "classes": SHAPES,
    },
    "shapes-2d": {"pos_embed": "learned_2d", "stem": "patch", "img_size": (32, 32), "grid": (8, 8), "classes": SHAPES},
    "shapes-sincos": {"pos_embed": "sincos", "stem": "patch", "img_size": (32, 32), "grid": (8, 8), "classes": SHAPES},
    "shapes-nopos": {"pos_embed": "none", "stem": "patch", "img_size": (32, 32), "grid": (8, 8), "classes": SHAPES},
    "shapes-hybrid": {
        "pos_embed": "learned",
        "stem": "hybrid",
        "img_size": (32, 32),
        "grid": (8, 8),
        "classes": SHAPES,
    },
    "shapes-reg4": {"pos_embed": "learned", "stem": "patch", "img_size": (32, 32), "grid": (8, 8), "classes": SHAPES},
    "shapes-finetune-hires": {
        "pos_embed": "learned",
        "stem": "patch",
        "img_size": (48, 48),
        "grid": (12, 12),
        "classes": SHAPES,
    },
    "mnist-small": {
        "pos_embed": "learned",
        "stem": "patch",
        "img_size": (28, 28),
        "grid": (4, 4),
        "classes": [str(d) for d in range(10)],
    },
}
# The position-embedding variants and the hybrid are the paper's ablation: the default's recipe with one change;
# the registers checkpoint is the same kind of variant (4 register tokens after the class token).
ABLATION = ("shapes-2d", "shapes-sincos", "shapes-nopos", "shapes-hybrid", "shapes-reg4")
REG4_DOCUMENTED_ACCURACY = 0.936  # 936 of 1,000 test images (README, docs/training.md)
SNAPSHOT_PREFIX = "shapes-default-epoch-"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bundled() -> list[Path]:
    return sorted(CHECKPOINTS.glob("*.safetensors"))


def test_every_bundled_checkpoint_is_accounted_for() -> None:
    stems = {p.stem for p in _bundled()}
    snapshots = {s for s in stems if s.startswith(SNAPSHOT_PREFIX)}
    assert stems - snapshots == set(EXPECTED)
    assert len(snapshots) >= 3  # early, middle and late


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_bundled_checkpoint_loads_as_the_expected_model(stem: str) -> None:
    expected = EXPECTED[stem]
    loaded = load_model(str(CHECKPOINTS / f"{stem}.safetensors"))
    config, meta = loaded.meta.config, loaded.meta
    assert config is not None
    assert (config.pos_embed, config.stem) == (expected["pos_embed"], expected["stem"])
    assert tuple(meta.input_size) == expected["img_size"]
    assert token_layout(loaded.model).grid == expected["grid"]
    assert token_layout(loaded.model).has_class_token
    assert meta.class_names == expected["classes"]
    assert meta.training["preset"] == stem
    with torch.no_grad():
        logits = loaded.model.eval()(torch.zeros(1, meta.in_chans, *meta.input_size))
    assert logits.shape == (1, len(expected["classes"]))


@pytest.mark.parametrize("stem", ABLATION)
def test_ablation_checkpoints_change_one_thing_at_the_default_budget(stem: str) -> None:
    """The app compares these side by side, as in the paper's ablation: same data, steps and model otherwise."""
    default, variant = read_checkpoint_meta(DEFAULT), read_checkpoint_meta(CHECKPOINTS / f"{stem}.safetensors")
    assert default.config is not None and variant.config is not None
    changed = {k for k, v in variant.config.to_dict().items() if default.config.to_dict()[k] != v}
    assert changed <= {"pos_embed", "stem", "hybrid_layers", "patch_size", "reg_tokens"} and changed
    for key in ("dataset", "train_split", "steps", "epochs"):
        assert variant.training[key] == default.training[key], key


def test_registers_checkpoint_has_four_registers_and_reproduces_its_documented_accuracy() -> None:
    path = CHECKPOINTS / "shapes-reg4.safetensors"
    layout = token_layout(load_model(str(path)).model)
    assert (layout.has_class_token, layout.num_reg_tokens, layout.num_prefix_tokens) == (True, 4, 5)
    result = evaluate_checkpoint(str(path), dataset="shapes", split="test", num_samples=DOCUMENTED_SUBSET, device="cpu")
    assert result["num_images"] == DOCUMENTED_SUBSET
    assert result["accuracy"] == pytest.approx(REG4_DOCUMENTED_ACCURACY, abs=TOLERANCE)


def test_hires_checkpoint_is_the_default_resampled_in_2d() -> None:
    meta = read_checkpoint_meta(CHECKPOINTS / "shapes-finetune-hires.safetensors")
    history = meta.resolution_history
    assert len(history) == 1
    assert (tuple(history[0]["old_grid"]), tuple(history[0]["new_grid"])) == ((8, 8), (12, 12))
    assert Path(meta.training["finetuned_from"]).parent.name == read_checkpoint_meta(DEFAULT).training["run_id"]


def test_snapshots_are_one_run_in_training_order() -> None:
    default = read_checkpoint_meta(DEFAULT)
    snapshots = sorted(CHECKPOINTS.glob(f"{SNAPSHOT_PREFIX}*.safetensors"))
    metas = [read_checkpoint_meta(p) for p in snapshots]
    epochs = [int(p.stem.removeprefix(SNAPSHOT_PREFIX)) for p in snapshots]
    steps = [m.training["steps"] for m in metas]
    assert [m.training["epochs"] for m in metas] == epochs
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert steps[-1] <= default.training["steps"]
    for meta in metas:
        assert meta.training["run_id"] == default.training["run_id"]
        assert meta.config == default.config


def test_default_reproduces_its_documented_accuracy_on_held_out_images() -> None:
    result = evaluate_checkpoint(
        str(DEFAULT), dataset="shapes", split="test", num_samples=DOCUMENTED_SUBSET, device="cpu"
    )
    assert result["num_images"] == DOCUMENTED_SUBSET
    assert result["accuracy"] == pytest.approx(DOCUMENTED_ACCURACY, abs=TOLERANCE)
    assert result["pointing_game"]["rollout"] == pytest.approx(DOCUMENTED_POINTING, abs=TOLERANCE)
    assert result["accuracy"] >= TARGET and result["pointing_game"]["rollout"] >= TARGET
    assert result["pointing_game"]["rollout"] > result["pointing_game"]["random"]


def test_default_was_not_trained_on_the_test_split() -> None:
    training = read_checkpoint_meta(DEFAULT).training
    assert training["dataset"] == "shapes" and training["train_split"] == "train"


@pytest.mark.parametrize("name", SHAPES)
def test_sample_images_are_held_out_test_images_named_by_class(name: str) -> None:
    """Sample <class>.png is shapes test image i = the class's index (labels cycle through the classes); its
    object mask is masks/<class>.png."""
    image, mask, scene = ShapesDataset(split="test", img_size=(64, 64)).render(SHAPES.index(name))
    assert SHAPE_CLASSES[scene.label] == name
    assert np.array_equal(np.asarray(Image.open(SAMPLES / f"{name}.png").convert("RGB")), image)
    assert np.array_equal(np.asarray(Image.open(MASKS / f"{name}.png")) > 127, mask)


def test_assets_fit_the_size_budget() -> None:
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024


MNIST_DIR = ASSETS / "data" / "mnist"  # the real MNIST test set, shipped with the repository
MNIST_DOCUMENTED = 0.979  # 1,958 of the last 2,000 MNIST test images (README, docs/training.md)
MNIST_REFERENCE_TRAIN_ACCURACY = 0.946  # what the small from-scratch reference reached on its training data


def test_mnist_small_reproduces_its_documented_accuracy_on_held_out_digits() -> None:
    """The README's 97.9% for mnist-small, re-measured on MNIST test[8000:], which its run never trained on."""
    checkpoint = CHECKPOINTS / "mnist-small.safetensors"
    assert read_checkpoint_meta(checkpoint).training["train_split"] == "test[:8000]"  # never saw the last 2,000
    result = evaluate_checkpoint(
        str(checkpoint), dataset="mnist", root=str(MNIST_DIR), split="test[8000:]", device="cpu"
    )
    assert result["num_images"] == 2000
    assert result["accuracy"] == pytest.approx(MNIST_DOCUMENTED, abs=3 / 2000)
    assert result["accuracy"] > MNIST_REFERENCE_TRAIN_ACCURACY
