"""vitviz.domain: what a model was trained on, and the reasons an image is far from it, on generated images:
a photo-like picture (large, colourful, textured) and a shapes-like one (small, a flat shape on a plain ground)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vitviz.domain import TrainingDomain, domain_gaps

CHECKPOINTS = Path(__file__).resolve().parents[1] / "assets" / "checkpoints"


def _domain(name: str) -> TrainingDomain:
    from vitviz.models import load_model
    from vitviz.pipeline import model_card

    return TrainingDomain.from_card(model_card(load_model(str(CHECKPOINTS / f"{name}.safetensors"))))


def _photo_like(height: int = 800, width: int = 600) -> np.ndarray:
    """Smooth colour gradients with fine noise: a portrait-sized colour picture."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    red, green, blue = 0.6 + 0.3 * np.sin(6 * x), 0.4 + 0.3 * np.cos(5 * y), 0.3 + 0.2 * x * y
    picture = np.stack([red, green, blue], axis=-1) + rng.normal(0, 0.05, (height, width, 3))
    return (np.clip(picture, 0, 1) * 255).astype(np.uint8)


def _shapes_like(side: int = 64) -> np.ndarray:
    """A red square on a light grey ground, at twice the shapes models' input size."""
    picture = np.full((side, side, 3), 200, dtype=np.uint8)
    picture[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = (200, 40, 40)
    return picture


def test_the_shapes_model_is_described_from_its_card() -> None:
    domain = _domain("shapes-default")
    assert (domain.dataset, domain.num_classes, domain.input_size, domain.in_chans) == ("shapes", 10, (32, 32), 3)
    assert domain.describe() == "Trained on shapes: 10 classes, 32×32 px colour images."
    assert _domain("mnist-small").describe() == "Trained on mnist: 10 classes, 28×28 px grey-scale images."


def test_a_photo_is_far_from_the_shapes_models_training_images_and_a_shape_is_not() -> None:
    domain = _domain("shapes-default")
    gaps = domain_gaps(_photo_like(), domain)
    assert len(gaps) == 1 and "600×800 px" in gaps[0] and "shrinks 19×" in gaps[0] and "32×32 px" in gaps[0]
    assert domain_gaps(_shapes_like(), domain) == []


def test_a_colour_picture_into_a_grey_model_says_its_colour_is_dropped() -> None:
    domain = _domain("mnist-small")
    gaps = domain_gaps(_photo_like(), domain)
    assert any("shrinks" in gap for gap in gaps)
    assert any("colour is dropped" in gap for gap in gaps)
    assert any("standard deviations from the training pixels' mean (0.13)" in gap for gap in gaps), gaps
    digit = np.zeros((28, 28), dtype=np.uint8)  # an MNIST-like digit: a white stroke on black, grey-scale
    digit[5:23, 12:16] = 255
    assert domain_gaps(digit, domain) == []


@pytest.mark.parametrize("side", [224, 384])
def test_a_large_shrink_is_the_norm_for_a_photo_sized_input(side: int) -> None:
    domain = TrainingDomain.from_values(
        training={},
        num_classes=1000,
        input_size=(side, side),
        in_chans=3,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    assert domain.dataset is None and "does not record its training data" in domain.describe()
    assert domain_gaps(_photo_like(4000, 3000), domain) == []
