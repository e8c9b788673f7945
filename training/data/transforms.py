"""Image transforms for training, and the evaluation transform and dataset wrapper re-exported from the core.

- `eval_transform` (defined in `vitviz.data.transforms`) is `vitviz.images.preprocess`, the analysis
  preprocessing of docs/design.md (the model's channels, a direct bicubic resize to the input size, no crop,
  [0, 1], normalise), so a model is evaluated on exactly the pixels the studio explains.
- `train_transform` is timm's training pipeline (`timm.data.create_transform(is_training=True)`), which
  also works for grey (1-channel) models: the augmentations run on an RGB copy, then the image goes back
  to grey before it becomes a tensor. timm's augmentations draw from Python's and NumPy's global RNGs; the
  pipeline seeds those from torch's RNG on each call, so `torch.manual_seed` (or a DataLoader's generator)
  alone makes it repeatable.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitviz.data.transforms import (
    AnalysisPreprocess,
    TransformedDataset,
    check_channels,
    eval_transform,
    input_hw,
)
from vitviz.errors import VitvizError
from vitviz.images import to_model_channels

__all__ = [
    "AUGMENT_OPTIONS",
    "AUGMENT_PRESETS",
    "AnalysisPreprocess",
    "TorchSeededTransform",
    "TransformedDataset",
    "augment_options",
    "eval_transform",
    "input_hw",
    "train_transform",
]

log = logging.getLogger(__name__)

# Named augmentation recipes; a dict passed as `augment` is laid over "light".
AUGMENT_PRESETS: dict[str, dict[str, Any] | None] = {
    "none": None,  # training sees exactly the evaluation preprocessing
    "light": {
        "scale": (0.6, 1.0),
        "ratio": (3 / 4, 4 / 3),
        "hflip": 0.5,
        "color_jitter": 0.2,
        "interpolation": "bicubic",
    },
    # Handwriting: small shifts and zooms from crops of 70-100% of the image; never mirrored (a flipped 2, 3,
    # 4, 5, 7 or 9 is not that digit) and no colour changes.
    "digits": {
        "scale": (0.7, 1.0),
        "ratio": (0.85, 1.18),
        "hflip": 0.0,
        "color_jitter": None,
        "interpolation": "bilinear",
    },
    "randaug": {
        "scale": (0.35, 1.0),
        "ratio": (3 / 4, 4 / 3),
        "hflip": 0.5,
        "auto_augment": "rand-m9-mstd0.5-inc1",
        "interpolation": "bicubic",
        "re_prob": 0.25,
    },
}
# The create_transform options an `augment` dict may set.
AUGMENT_OPTIONS = frozenset(
    {
        "scale",
        "ratio",
        "hflip",
        "vflip",
        "color_jitter",
        "color_jitter_prob",
        "grayscale_prob",
        "gaussian_blur_prob",
        "auto_augment",
        "interpolation",
        "re_prob",
        "re_mode",
        "re_count",
        "train_crop_mode",
    }
)
# Prefixes of timm's auto-augment policy strings, accepted as `augment` on their own (over "light").
_AUTO_AUGMENT_PREFIXES = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a")


class TorchSeededTransform:
    """Runs a transform with Python's and NumPy's global RNGs seeded from torch's RNG, then restores them.

    timm's crops, RandAugment and random erasing draw from `random` and `numpy.random`, which
    `torch.manual_seed` and DataLoader worker seeding do not fully control; seeding them from torch per
    call makes the whole pipeline a function of torch's RNG state.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.transform(image)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def augment_options(augment: Mapping[str, Any] | str | None) -> dict[str, Any] | None:
    """The create_transform options for a preset name, an auto-augment policy string or a dict; None = no augmentation."""
    if augment is None:
        return None
    if isinstance(augment, str):
        key = augment.strip().lower()
        if key in AUGMENT_PRESETS:
            preset = AUGMENT_PRESETS[key]
            return None if preset is None else dict(preset)
        if key.startswith(_AUTO_AUGMENT_PREFIXES):
            return {**AUGMENT_PRESETS["light"], "auto_augment": augment.strip()}
        raise VitvizError(
            f"unknown augmentation {augment!r}: use {', '.join(AUGMENT_PRESETS)}, a timm auto-augment policy "
            "such as 'rand-m9-mstd0.5-inc1', or a dict of timm create_transform options"
        )
    unknown = sorted(set(augment) - AUGMENT_OPTIONS)
    if unknown:
        raise VitvizError(
            f"unknown augmentation option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(AUGMENT_OPTIONS))}"
        )
    return {**AUGMENT_PRESETS["light"], **augment}


def train_transform(
    *,
    input_size: int | Sequence[int],
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: Mapping[str, Any] | str | None,
) -> Callable[[Image.Image], torch.Tensor]:
    """The training transform: timm's augmentations (crop, flip, jitter, RandAugment, erasing) for 1 or 3 channels.

    `augment` is a preset ("none", "light", "randaug"), a timm auto-augment policy string (over "light"), or
    a dict of `timm.data.create_transform` options (over "light"). Returns PIL image -> tensor [in_chans, H, W].
    """
    from timm.data import create_transform

    height, width = input_hw(input_size)
    mean, std = check_channels(in_chans, mean, std)
    options = augment_options(augment)
    if options is None:
        return eval_transform(input_size=(height, width), in_chans=in_chans, mean=mean, std=std)
    # The augmentations always run on RGB (timm's fill colours and colour ops assume three bands); only the
    # final tensor conversion, normalisation and erasing run at the model's channel count.
    rgb_mean, rgb_std = (mean * 3, std * 3) if in_chans == 1 else (mean, std)
    try:
        primary, secondary, final = create_transform(
            input_size=(3, height, width), is_training=True, mean=rgb_mean, std=rgb_std, separate=True, **options
        )
        if in_chans == 1:
            *_, final = create_transform(
                input_size=(1, height, width), is_training=True, mean=mean, std=std, separate=True, **options
            )
    except (AssertionError, ValueError, TypeError, KeyError) as error:
        raise VitvizError(f"timm cannot build the augmentation {augment!r}: {error}") from error
    steps: list[Callable] = [partial(to_model_channels, in_chans=3), primary, secondary]
    if in_chans == 1:
        steps.append(partial(to_model_channels, in_chans=1))
    steps.append(final)
    from torchvision.transforms import Compose

    return TorchSeededTransform(Compose(steps))
