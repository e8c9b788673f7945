"""A dataset prepared once into memory, so that training epochs after the first cost no rendering or decoding.

`InMemoryImages` holds every image as uint8 pixels [N, C, H, W] at the model's input size and turns a batch
of indices into the normalised float batch the model takes. Its numbers are exactly those of
`eval_transform` image by image (the same resize, then x / 255, minus mean, divided by std, all in float32),
so a run with `data.in_memory` trains on bitwise the same inputs as one without; it only skips the
per-image work. Augmentation is per image and random, so it cannot be cached: in-memory data is for
`augment=none`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vitviz.data.base import VisionDataset
from vitviz.data.transforms import TransformedDataset
from vitviz.images import to_model_channels

log = logging.getLogger(__name__)

_FILL_BATCH = 256


def _pixels(image: Image.Image, *, input_size: tuple[int, int], in_chans: int) -> torch.Tensor:
    """The uint8 [C, H, W] pixels that eval_transform would normalise."""
    height, width = input_size
    image = to_model_channels(image, in_chans)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)  # as vitviz.images.preprocess
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    return (pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)).contiguous()


class InMemoryImages:
    """Every image of a dataset as uint8 [N, C, H, W] plus int64 labels, normalised a batch at a time.

    Args:
        dataset: The images (a VisionDataset giving PIL images and labels).
        input_size: (H, W) the model takes; images of another size are resized as the eval transform does.
        in_chans: 1 or 3, the model's channels.
        mean, std: One value per channel, as for `eval_transform`.
        num_workers: DataLoader workers that render or decode the images while the cache fills.
    """

    def __init__(
        self,
        dataset: VisionDataset,
        *,
        input_size: tuple[int, int],
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_workers: int = 0,
    ) -> None:
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean and std need {in_chans} values each, got {len(mean)} and {len(std)}")
        height, width = input_size
        count = len(dataset)
        started = time.perf_counter()
        self.pixels = torch.empty((count, in_chans, height, width), dtype=torch.uint8)
        self.labels = torch.empty(count, dtype=torch.int64)
        images = TransformedDataset(dataset, partial(_pixels, input_size=(height, width), in_chans=in_chans))
        loader = DataLoader(images, batch_size=_FILL_BATCH, num_workers=num_workers)
        position = 0
        for pixels, labels in loader:
            self.pixels[position : position + len(labels)] = pixels
            self.labels[position : position + len(labels)] = labels
            position += len(labels)
        # The same float32 constants TF.normalize builds from the tuples, shaped to broadcast over [B, C, H, W].
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        log.info(
            "prepared %d images in memory (%.0f MB) in %.1f s",
            count, self.pixels.numel() / 2**20, time.perf_counter() - started,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised float32 images [B, C, H, W] and labels [B] of `indices`, in that order."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        images = self.pixels.index_select(0, index).float().div_(255)
        return images.sub_(self.mean).div_(self.std), self.labels.index_select(0, index)
