"""The dataset base class and the split grammar shared by every built-in dataset.

Every dataset yields raw PIL images and integer labels; the analysis transform lives in `vitviz.data.transforms`,
the training augmentations in `training.data.transforms`.
Splits are named "train", "val" or "test", optionally followed by an HF-style slice: "test[:8000]",
"test[8000:]", "train[100:200]", "train[-500:]", "train[:10%]".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vitviz.errors import VitvizError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")

# name, then an optional [start:stop] where each bound is an optional signed integer or percentage.
_SPLIT_PATTERN = re.compile(r"^\s*(?P<name>[a-z]+)\s*(?:\[\s*(?P<start>-?\d+%?)?\s*:\s*(?P<stop>-?\d+%?)?\s*\])?\s*$")


class VisionDataset(Dataset):
    """A labelled image dataset that returns raw PIL images; subclasses fill in the fields and methods.

    Attributes:
        class_names: Human-readable name of every class, indexed by label.
        in_chans: The images' native channels, 1 (grey) or 3 (RGB).
        has_masks: Whether `mask(i)` gives an object mask for every image.
    """

    class_names: list[str]
    in_chans: int
    has_masks: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def mask(self, index: int) -> np.ndarray:
        """Boolean [H, W] mask of the object in image `index`, at the image's own size."""
        raise VitvizError(f"{type(self).__name__} has no object masks")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _check_index(self, index: int) -> int:
        """Turns a possibly negative index into a position, raising IndexError outside the dataset."""
        length = len(self)
        position = int(index) + length if index < 0 else int(index)
        if not 0 <= position < length:
            raise IndexError(f"index {index} out of range for a dataset of {length} images")
        return position


class GreyDigitsDataset(VisionDataset):
    """Ten digit classes held in memory: `images` uint8 [N, H, W] and `labels` int64 [N], set by the subclass."""

    in_chans = 1
    images: np.ndarray
    labels: np.ndarray

    @property  # type: ignore[override]
    def class_names(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = self._check_index(index)
        return Image.fromarray(self.images[index]), int(self.labels[index])


class IndexedView(VisionDataset):
    """A subset of another dataset, in the order of `indices` (what split slices and sample caps produce)."""

    def __init__(self, source: VisionDataset, indices: Sequence[int] | np.ndarray) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.class_names = source.class_names
        self.in_chans = source.in_chans
        self.has_masks = source.has_masks

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.source[int(self.indices[self._check_index(index)])]

    def mask(self, index: int) -> np.ndarray:
        return self.source.mask(int(self.indices[self._check_index(index)]))

    @property
    def labels(self) -> np.ndarray | None:
        """Labels of the view when the source can give them without decoding images, else None."""
        source_labels = getattr(self.source, "labels", None)
        return None if source_labels is None else np.asarray(source_labels)[self.indices]


@dataclass(frozen=True)
class SplitSpec:
    """A parsed split string: the base split and an optional slice of it."""

    name: str  # "train", "val" or "test"
    start: str | None = None  # the slice bounds as written ("100", "-5", "10%"), resolved against a length later
    stop: str | None = None

    @property
    def is_sliced(self) -> bool:
        return self.start is not None or self.stop is not None

    def slice_range(self, length: int) -> range:
        """The positions this split's slice selects from a base split of `length` images."""
        return range(length)[slice(_resolve_bound(self.start, length), _resolve_bound(self.stop, length))]

    def __str__(self) -> str:
        if not self.is_sliced:
            return self.name
        return f"{self.name}[{self.start or ''}:{self.stop or ''}]"


def parse_split(split: str) -> SplitSpec:
    """Parses "train", "val", "test" with an optional HF-style slice such as "test[:8000]" or "train[:10%]"."""
    match = _SPLIT_PATTERN.match(str(split).lower())
    if match is None or match["name"] not in SPLIT_NAMES:
        raise VitvizError(
            f"unknown split {split!r}: use one of {', '.join(SPLIT_NAMES)}, optionally sliced like 'test[:8000]' or 'train[:10%]'"
        )
    return SplitSpec(match["name"], match["start"], match["stop"])


def _resolve_bound(bound: str | None, length: int) -> int | None:
    if bound is None:
        return None
    if bound.endswith("%"):
        # Percentages round to the nearest image, as HF datasets do by default.
        return int(round(int(bound[:-1]) * length / 100))
    return int(bound)


def select_split(dataset: VisionDataset, spec: SplitSpec, *, dataset_name: str) -> VisionDataset:
    """Applies the slice of `spec` to the base split `dataset`; an empty result is a user error."""
    if not spec.is_sliced:
        return dataset
    positions = spec.slice_range(len(dataset))
    if len(positions) == 0:
        raise VitvizError(f"split {spec} of {dataset_name} is empty (the {spec.name} split has {len(dataset)} images)")
    return IndexedView(dataset, np.arange(positions.start, positions.stop, positions.step))


def cap_samples(dataset: VisionDataset, num_samples: int | None, *, seed: int) -> VisionDataset:
    """Keeps a seeded random subset of `num_samples` images (in their original order), for quick runs."""
    if num_samples is None or num_samples >= len(dataset):
        return dataset
    if num_samples <= 0:
        raise VitvizError(f"num_samples must be positive, got {num_samples}")
    chosen = np.random.default_rng(seed).choice(len(dataset), size=num_samples, replace=False)
    return IndexedView(dataset, np.sort(chosen))
