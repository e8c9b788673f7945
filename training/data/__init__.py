"""The datasets the training backend trains and evaluates on: the core's (`vitviz.data`, where every reader
and the split grammar live, see its docstring for the table), re-exported here with the training
augmentations (`train_transform`) and the in-memory cache (`training.data.memory`).
"""

from __future__ import annotations

from training.data.transforms import train_transform
from vitviz.data import (
    DATASET_NAMES,
    DEFAULT_ROOTS,
    IndexedView,
    TransformedDataset,
    VisionDataset,
    build_dataset,
    eval_transform,
    input_hw,
    normalize_dataset_name,
)

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_ROOTS",
    "IndexedView",
    "TransformedDataset",
    "VisionDataset",
    "build_dataset",
    "eval_transform",
    "input_hw",
    "normalize_dataset_name",
    "train_transform",
]
