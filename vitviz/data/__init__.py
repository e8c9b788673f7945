"""The built-in datasets, built by name with `build_dataset`: what the training backend trains and evaluates on,
and what `python -m vitviz analyze --dataset` and `faithfulness --dataset` analyse (`vitviz.data.stream`).

| name          | source                                   | channels | masks | default root   |
| ------------- | ---------------------------------------- | -------- | ----- | -------------- |
| shapes        | procedural, seeded, unlimited            | 3        | yes   | -              |
| digits        | sklearn.datasets.load_digits (8x8)       | 1        | no    | -              |
| mnist         | IDX files (.gz or raw) in root           | 1        | no    | data/mnist     |
| fashion-mnist | torchvision, root/FashionMNIST           | 1        | no    | data           |
| cifar10       | torchvision, root/cifar-10-batches-py    | 3        | no    | data           |
| cifar100      | torchvision, root/cifar-100-python       | 3        | no    | data           |
| folder        | root/<class>/<image> or root/train, val  | 3        | no    | (required)     |

Every dataset has the splits "train", "val" and "test", and HF-style slices of them ("test[:8000]",
"test[8000:]", "train[:10%]"). Only shapes renders at `img_size`; the others keep their native size and
the transforms resize.
"""

from __future__ import annotations

from pathlib import Path

from vitviz.data.base import IndexedView, VisionDataset, cap_samples, parse_split, select_split
from vitviz.data.transforms import TransformedDataset, eval_transform, input_hw
from vitviz.errors import VitvizError

DATASET_NAMES: tuple[str, ...] = ("shapes", "digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "folder")
DEFAULT_ROOTS = {
    "mnist": Path("data/mnist"),
    "fashion-mnist": Path("data"),
    "cifar10": Path("data"),
    "cifar100": Path("data"),
}

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
]


def normalize_dataset_name(name: str) -> str:
    """The canonical dataset name ("Fashion_MNIST" -> "fashion-mnist"); unknown names are a user error."""
    canonical = str(name).strip().lower().replace("_", "-")
    canonical = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}.get(
        canonical, canonical
    )
    if canonical not in DATASET_NAMES:
        raise VitvizError(f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}")
    return canonical


def build_dataset(
    name: str,
    *,
    split: str = "train",
    img_size: int | tuple[int, int] | None = None,
    root: str | Path | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    download: bool = False,
) -> VisionDataset:
    """Builds one split of a built-in dataset (see the module docstring), returning raw PIL images and labels.

    Args:
        name: One of DATASET_NAMES.
        split: "train", "val" or "test", optionally sliced: "test[:8000]", "train[10%:]".
        img_size: (H, W) that shapes renders at (default 64x64); the other datasets keep their own size.
        root: Where the files are (mnist, torchvision sets, folder).
        num_samples: shapes: the split's length (default 50,000 train, 1,000 val/test). Others: keep a
            seeded random subset of this many images of the (sliced) split.
        seed: shapes: which images are generated. Others: which subset num_samples keeps.
        download: Let torchvision download fashion-mnist/cifar10/cifar100 into root (needs the network).
    """
    name = normalize_dataset_name(name)
    spec = parse_split(split)
    if name == "shapes":
        from vitviz.data.shapes import DEFAULT_IMG_SIZE, ShapesDataset

        size = DEFAULT_IMG_SIZE if img_size is None else input_hw(img_size)
        # num_samples is the length of the base split; a slice then selects within it.
        base: VisionDataset = ShapesDataset(split=spec.name, img_size=size, num_samples=num_samples, seed=seed)
        return select_split(base, spec, dataset_name=name)
    if name == "digits":
        from vitviz.data.digits import DigitsDataset

        base = DigitsDataset(split=spec.name)
    elif name == "mnist":
        from vitviz.data.mnist import MnistDataset

        base = MnistDataset(DEFAULT_ROOTS[name] if root is None else root, split=spec.name)
    elif name in ("fashion-mnist", "cifar10", "cifar100"):
        from vitviz.data.torchvision_sets import TorchvisionDataset

        base = TorchvisionDataset(
            name, DEFAULT_ROOTS[name] if root is None else root, split=spec.name, download=download
        )
    else:
        from vitviz.data.folder import ImageFolderDataset

        if root is None:
            raise VitvizError("the folder dataset needs a root: the folder holding one subfolder of images per class")
        base = ImageFolderDataset(root, split=spec.name)
    return cap_samples(select_split(base, spec, dataset_name=name), num_samples, seed=seed)
