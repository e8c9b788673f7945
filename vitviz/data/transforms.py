"""The analysis transform and the dataset wrapper that applies it.

`eval_transform` is `vitviz.images.preprocess`, the analysis preprocessing of docs/design.md (the model's
channels, a direct bicubic resize to the input size, no crop, [0, 1], normalise), so a model is evaluated
(`python -m training evaluate`) and analysed over a data set (`python -m vitviz analyze --dataset`) on
exactly the pixels the studio explains. The training augmentations are the training backend's
(`training.data.transforms`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from vitviz.data.base import VisionDataset
from vitviz.errors import VitvizError
from vitviz.images import preprocess


def input_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) from an int, an (H, W) pair or timm's (C, H, W)."""
    if isinstance(input_size, int):
        return (input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) not in (2, 3) or min(size[-2:]) <= 0:
        raise VitvizError(f"input size must be an int, (H, W) or (C, H, W) with positive sides, got {input_size!r}")
    return size[-2], size[-1]


def check_channels(
    in_chans: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_chans not in (1, 3):
        raise VitvizError(f"models take 1 (grey) or 3 (RGB) channels, not {in_chans}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != in_chans or len(std) != in_chans:
        raise VitvizError(
            f"mean and std need {in_chans} value(s) each for a {in_chans}-channel model, got {mean} and {std}"
        )
    if min(std) <= 0:
        raise VitvizError(f"std values must be positive, got {std}")
    return mean, std


class AnalysisPreprocess:
    """`vitviz.images.preprocess` with its options bound: a picklable transform for DataLoader workers."""

    def __init__(
        self, *, input_size: tuple[int, int], in_chans: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        self.input_size = input_size
        self.in_chans = in_chans
        self.mean = mean
        self.std = std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, input_size=self.input_size, mean=self.mean, std=self.std, in_chans=self.in_chans)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_size={self.input_size}, in_chans={self.in_chans}, mean={self.mean}, std={self.std})"


def eval_transform(
    *, input_size: int | Sequence[int], in_chans: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform: PIL image -> normalised tensor [in_chans, H, W], exactly as the studio preprocesses."""
    mean, std = check_channels(in_chans, mean, std)
    return AnalysisPreprocess(input_size=input_hw(input_size), in_chans=in_chans, mean=mean, std=std)


class TransformedDataset(Dataset):
    """A VisionDataset seen through a transform: item i is (transform(image), label)."""

    def __init__(self, dataset: VisionDataset, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), label

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names
