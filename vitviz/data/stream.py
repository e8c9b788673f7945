"""A slice of a built-in data set streamed through the analyses: preprocessed as the model expects, in batches,
shared out between `torchrun` processes.

    slice_ = DatasetSlice.parse("shapes", split="test", limit=1000)
    dataset = open_dataset(slice_, input_size=meta.input_size, in_chans=meta.in_chans, mean=meta.mean, std=meta.std)
    ranks = Ranks.from_environment()            # one process, or this process's place in a torchrun job
    for batch in dataset_batches(dataset, 16, ranks=ranks):   # DatasetBatch(images, labels, indices)
        ...

The images are `build_dataset(name, split=split, img_size=<the model's input size>, root=root)`, the images
`python -m training evaluate` reads, through `eval_transform` with the model's normalisation, the transform it
uses; `limit` keeps the first N of the split. Nothing is held beyond one batch (and the DataLoader's
prefetch), so memory does not grow with N.

Sharding: the split is cut into global batches of `batch_size` consecutive images, [0, B), [B, 2B), ...;
rank r of W takes global batches r, r + W, r + 2W, ... Every batch a rank forwards is therefore exactly the
batch one process forwards, so per-image numbers are bitwise those of one process (same device, same thread
count), and the callers combine the ranks' per-batch records in global batch order (`Ranks.gather`).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from vitviz.data import DATASET_NAMES, build_dataset, eval_transform, normalize_dataset_name
from vitviz.data.base import IndexedView, VisionDataset
from vitviz.errors import VitvizError

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetBatch",
    "DatasetSlice",
    "Ranks",
    "SliceDataset",
    "dataset_batches",
    "open_dataset",
    "rank_batches",
]


@dataclass(frozen=True)
class DatasetSlice:
    """Which images: a built-in data set's split, its first `limit` images (None: all), read from `root`."""

    name: str  # canonical, one of DATASET_NAMES
    split: str = "test"
    limit: int | None = None
    root: Path | None = None  # mnist: default the bundled test set; cifar10: default ./data; folder: required

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", normalize_dataset_name(self.name))
        if self.limit is not None and self.limit < 1:
            raise VitvizError(f"--limit must be at least 1, got {self.limit}")
        if self.name == "folder" and self.root is None:
            raise VitvizError("the folder data set needs its path: --dataset folder:PATH")

    @classmethod
    def parse(
        cls, text: str, *, split: str = "test", limit: int | None = None, root: str | Path | None = None
    ) -> DatasetSlice:
        """From the CLI's `--dataset` value: a name of DATASET_NAMES, or folder:PATH (an ImageFolder tree)."""
        name, sep, path = str(text).partition(":")
        if sep and name.strip().lower() == "folder":
            if not path.strip():
                raise VitvizError("the folder data set needs its path: --dataset folder:PATH")
            if root is not None:
                raise VitvizError("--dataset folder:PATH names its folder; --root is for mnist and cifar10")
            return cls("folder", split=split, limit=limit, root=Path(path).expanduser())
        if sep:
            raise VitvizError(f"unknown data set {text!r}: choose one of {', '.join(DATASET_NAMES)} or folder:PATH")
        return cls(name, split=split, limit=limit, root=None if root is None else Path(root).expanduser())

    def describe(self) -> dict[str, Any]:
        """The JSON's description of the slice (its "dataset" section, before the counts)."""
        return {
            "name": self.name,
            "split": self.split,
            "limit": self.limit,
            "root": None if self.root is None else str(self.root),
        }

    def image_name(self, index: int) -> str:
        """How image `index` of the slice is named in results: "shapes:test[17]"."""
        return f"{self.name}:{self.split}[{index}]"


class SliceDataset(Dataset):
    """Item i: (the preprocessed image [C, H, W] float32, its label, i). `source` is the raw VisionDataset."""

    def __init__(self, source: VisionDataset, slice_: DatasetSlice, transform: Any) -> None:
        self.source = source
        self.slice = slice_
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.source[index]
        return self.transform(image), int(label), int(index)

    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)


def _default_root(slice_: DatasetSlice) -> Path | None:
    if slice_.root is not None or slice_.name != "mnist":
        return slice_.root
    from vitviz.data.mnist import BUNDLED_ROOT

    return BUNDLED_ROOT


def open_dataset(
    slice_: DatasetSlice,
    *,
    input_size: Sequence[int],
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    download: bool = False,
) -> SliceDataset:
    """The slice's images preprocessed for a model of `input_size` (H, W), `in_chans`, `mean` and `std`.

    A data set, split or folder that is not there, or a download that fails, is a VitvizError of one line.
    """
    size = tuple(int(s) for s in input_size)[-2:]
    source = build_dataset(
        slice_.name, split=slice_.split, img_size=size, root=_default_root(slice_), download=download
    )
    if slice_.limit is not None and slice_.limit < len(source):
        source = IndexedView(source, range(slice_.limit))
    transform = eval_transform(input_size=size, in_chans=in_chans, mean=mean, std=std)
    return SliceDataset(source, slice_, transform)


@dataclass(frozen=True)
class DatasetBatch:
    """One batch of a slice: images [B, C, H, W], labels [B] and the images' positions in the slice [B]."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun), and the one collective needed."""

    def __init__(self, rank: int = 0, world_size: int = 1, *, owns_group: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self._owns_group = owns_group
        self._gathered = 0

    @classmethod
    def from_environment(cls) -> Ranks:
        """Join the gloo process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT); else one process."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world_size <= 1:
            return cls()
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=datetime.timedelta(minutes=60))
            owns = True
            logger.debug("joined the gloo process group: rank %d of %d", rank, world_size)
        return cls(dist.get_rank(), dist.get_world_size(), owns_group=owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank; [value] for one process."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        self._gathered += 1
        failures = [item for item in gathered if isinstance(item, _RankFailure)]
        if failures:  # one rank's user error is every rank's: the first by rank is the message
            raise VitvizError(failures[0].message)
        return gathered

    def fail(self, error: BaseException, message: str) -> None:
        """On a rank whose work failed with a user error before it reached its gather: join the gather the other
        ranks wait in with the failure, so that every rank raises the same VitvizError instead of waiting for ever
        (or ending in a gloo traceback). Raises that VitvizError; does nothing for one process or after the gather."""
        if self.world_size == 1 or self._gathered:
            return
        self.gather(_RankFailure(message))
        raise VitvizError(message) from None  # only if the gather came back without it (it never does)

    def close(self) -> None:
        """Leave the process group if this object joined it."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False


@dataclass(frozen=True)
class _RankFailure:
    """What a failed rank sends in place of its records (`Ranks.fail`)."""

    message: str


def rank_batches(num_images: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The positions of the global batches rank `rank` of `world_size` takes (see the module docstring)."""
    if batch_size < 1:
        raise VitvizError(f"--batch-size must be at least 1, got {batch_size}")
    count = math.ceil(num_images / batch_size)
    return [list(range(j * batch_size, min((j + 1) * batch_size, num_images))) for j in range(rank, count, world_size)]


def dataset_batches(
    dataset: SliceDataset, batch_size: int, *, ranks: Ranks | None = None, num_workers: int = 0
) -> Iterator[DatasetBatch]:
    """This rank's batches of `dataset`, streamed through a DataLoader (`num_workers` processes decode)."""
    ranks = ranks or Ranks()
    batches = rank_batches(len(dataset), batch_size, ranks.rank, ranks.world_size)
    if not batches:
        return
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    for images, labels, indices in loader:
        yield DatasetBatch(images=images, labels=labels, indices=indices)
