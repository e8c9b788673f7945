"""What a model was trained on, and how far an image is from it.

A classifier answers for every image, with a confident top class even for a picture unlike anything it saw
in training (a portrait given to a 32-pixel shapes classifier). `TrainingDomain` says what the model was
trained on, from its card; `domain_gaps` lists the plain reasons an image is far from that: it is shrunk a
lot to a small input, it has colour the model never sees, or its brightness is far from the pixel statistics
the model normalises with. No torch here: the checks work on the decoded pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from vitviz.pipeline import ModelCard

# An image whose shorter side shrinks by at least this factor to a small input (shorter side below
# SMALL_INPUT px) keeps little of what it shows: the model sees a thumbnail. Models with a photo-sized
# input (224 px) were trained on photos shrunk that much, so for them a large shrink is the norm.
DOWNSCALE_LIMIT = 8.0
SMALL_INPUT = 128
# Mean absolute difference between an image's colour channels (0 … 1) above which it is a colour picture;
# JPEG noise on a grey picture stays well below it.
COLOUR_LIMIT = 0.03
# How many of the model's normalisation standard deviations an image's mean brightness may be from its
# normalisation mean before it is far from the training pixels.
BRIGHTNESS_LIMIT = 1.0


@dataclass(frozen=True)
class TrainingDomain:
    """What a model was trained on, as far as its card records it."""

    dataset: str | None  # the training data set's name; None for models that do not record it (timm, HF)
    num_classes: int
    input_size: tuple[int, int]  # (height, width) in pixels
    in_chans: int
    mean: tuple[float, ...]  # the normalisation's per-channel mean and std, in 0 … 1
    std: tuple[float, ...]

    @classmethod
    def from_card(cls, card: ModelCard) -> TrainingDomain:
        return cls.from_values(
            training=card.training,
            num_classes=card.num_classes,
            input_size=card.img_size,
            in_chans=card.in_chans,
            mean=card.mean,
            std=card.std,
        )

    @classmethod
    def from_values(
        cls,
        *,
        training: Mapping[str, Any],
        num_classes: int,
        input_size: Sequence[int],
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> TrainingDomain:
        dataset = training.get("dataset")
        return cls(
            dataset=dataset if isinstance(dataset, str) and dataset else None,
            num_classes=int(num_classes),
            input_size=(int(input_size[0]), int(input_size[1])),
            in_chans=int(in_chans),
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
        )

    def describe(self) -> str:
        """One line: what the model was trained on, e.g. "Trained on shapes: 10 classes, 32×32 px, colour"."""
        height, width = self.input_size
        colour = "grey-scale" if self.in_chans == 1 else "colour"
        seen = f"{self.num_classes} classes, {width}×{height} px {colour} images"
        if self.dataset is None:
            return f"The model does not record its training data: {seen}."
        return f"Trained on {self.dataset}: {seen}."


def domain_gaps(pixels: np.ndarray, domain: TrainingDomain) -> list[str]:
    """Why an image (uint8 [H, W] or [H, W, C], as decoded, at its own size) is far from the model's
    training images; an empty list when nothing stands out."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = pixels[:, :, :3]
    gaps = []
    height, width = pixels.shape[:2]
    in_h, in_w = domain.input_size
    shrink = min(height / in_h, width / in_w)
    if shrink >= DOWNSCALE_LIMIT and min(in_h, in_w) < SMALL_INPUT:
        gaps.append(
            f"it is {width}×{height} px and shrinks {shrink:.0f}× to the model's {in_w}×{in_h} px input, "
            "so the model sees a thumbnail of it"
        )
    values = pixels.astype(np.float32) / 255.0
    if domain.in_chans == 1 and values.shape[2] == 3:
        colourfulness = float(np.mean(np.abs(values - values.mean(axis=2, keepdims=True))))
        if colourfulness > COLOUR_LIMIT:
            gaps.append("it is a colour picture and the model sees grey only (its colour is dropped)")
    seen = _as_model_sees(pixels, domain)
    means = seen.reshape(-1, seen.shape[2]).mean(axis=0)
    distances = [abs(float(m) - mu) / max(sd, 1e-6) for m, mu, sd in zip(means, domain.mean, domain.std, strict=False)]
    if distances and max(distances) > BRIGHTNESS_LIMIT:
        gaps.append(
            f"its mean brightness ({_numbers(means)}) is {max(distances):.1f} standard deviations from the "
            f"training pixels' mean ({_numbers(domain.mean)})"
        )
    return gaps


def _as_model_sees(pixels: np.ndarray, domain: TrainingDomain) -> np.ndarray:
    """The image at the model's input size and channels, as floats in 0 … 1."""
    picture = Image.fromarray(np.ascontiguousarray(pixels if pixels.shape[2] == 3 else pixels[:, :, 0]))
    picture = picture.convert("L" if domain.in_chans == 1 else "RGB")
    in_h, in_w = domain.input_size
    resized = np.asarray(picture.resize((in_w, in_h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return resized[:, :, None] if resized.ndim == 2 else resized


def _numbers(values: Sequence[float] | np.ndarray) -> str:
    return ", ".join(f"{float(v):.2f}" for v in values)
