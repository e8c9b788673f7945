"""scikit-learn's handwritten digits (8x8 grey, 1,797 images), bundled with scikit-learn so always offline.

The three splits are a fixed stratified 70/15/15 partition (its own seed, not the run's), so a test
accuracy always refers to the same images.
"""

from __future__ import annotations

import numpy as np

from vitviz.data.base import GreyDigitsDataset

SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
_PARTITION_SEED = 0  # fixed forever: changing it changes every reported digits number


def _partition(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted indices of each split: train, then val and test halves of the rest, stratified by label."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    held_out_fraction = SPLIT_FRACTIONS["val"] + SPLIT_FRACTIONS["test"]
    train, held_out = train_test_split(
        indices, test_size=held_out_fraction, stratify=labels, random_state=_PARTITION_SEED
    )
    val, test = train_test_split(
        held_out,
        test_size=SPLIT_FRACTIONS["test"] / held_out_fraction,
        stratify=labels[held_out],
        random_state=_PARTITION_SEED,
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


class DigitsDataset(GreyDigitsDataset):
    """One split of `sklearn.datasets.load_digits`, as 8x8 grey images scaled from 0..16 to 0..255."""

    has_masks = False

    def __init__(self, *, split: str = "train") -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        chosen = _partition(digits.target)[split]
        # 0..16 -> 0..255 exactly at both ends.
        self.images = np.round(digits.images[chosen] * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
        self.labels = digits.target[chosen].astype(np.int64)
        self.split = split
