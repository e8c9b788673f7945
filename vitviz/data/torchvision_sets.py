"""Fashion-MNIST, CIFAR-10 and CIFAR-100 through torchvision, read from `root` and downloaded only when asked.

torchvision keeps them under `root` as it always does (root/FashionMNIST/raw, root/cifar-10-batches-py,
root/cifar-100-python). Splits: "train" is the training file minus its last 5,000 images, "val" those
5,000, "test" the test file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from vitviz.data.base import VisionDataset
from vitviz.errors import VitvizError

log = logging.getLogger(__name__)

VAL_SIZE = 5_000  # held out from the end of the training file
TORCHVISION_NAMES = ("fashion-mnist", "cifar10", "cifar100")


def _torchvision_class(name: str) -> type:
    from torchvision import datasets

    return {"fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]


class TorchvisionDataset(VisionDataset):
    """One split of a torchvision classification set, served as raw PIL images without torchvision transforms."""

    has_masks = False

    def __init__(self, name: str, root: str | Path, *, split: str = "train", download: bool = False) -> None:
        root = Path(root).expanduser()
        source_class = _torchvision_class(name)
        try:
            source = source_class(root=str(root), train=split != "test", download=download)
        except (RuntimeError, OSError) as error:
            # torchvision says "Dataset not found" as RuntimeError, and a failed download as RuntimeError or
            # URLError (an OSError); neither is a bug, so the user gets one line that says what to do.
            if download:
                reason = " ".join(str(error).split())[:200]
                raise VitvizError(
                    f"{name} is not in {root} and downloading it failed (downloading needs the network): {reason}"
                ) from error
            raise VitvizError(
                f"{name} is not in {root}; pass download=True (--download) to fetch it, which needs the network"
            ) from error
        data = source.data
        images = data.numpy() if hasattr(data, "numpy") else np.asarray(data)  # [N, H, W] or [N, H, W, 3] uint8
        labels = np.asarray(source.targets, dtype=np.int64)
        if split != "test":
            keep = slice(None, -VAL_SIZE) if split == "train" else slice(-VAL_SIZE, None)
            images, labels = images[keep], labels[keep]
        self.images = images
        self.labels = labels
        self.class_names = list(source.classes)
        self.in_chans = 1 if images.ndim == 3 else 3
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = self._check_index(index)
        return Image.fromarray(self.images[index]), int(self.labels[index])
