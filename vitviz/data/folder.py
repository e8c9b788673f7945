"""The user's own images in an ImageFolder tree: one subfolder per class, class names sorted.

Two layouts:
- root/<class>/<image>: the split of each file is decided by a hash of its path relative to root
  (80% train, 10% val, 10% test), so it never changes when files are added, renamed elsewhere or listed in
  another order, and it is the same on every machine.
- root/train/<class>/..., root/val/<class>/... (and optionally root/test/<class>/...): used as given;
  the class names come from train/.
A class's images are the image files in its folder and in that folder's visible sub-folders, by the rule
of `vitviz.imagefiles` that the CLI's --images and the studio's samples follow too (visible files in a
format vitviz decodes; links to folders are not followed, class folders that are links included, and files
that are not regular files are never opened). What was left out is said in one line on the log. Images are decoded by vitviz's one image loader
(`vitviz.images.decode_image`: safe formats, EXIF orientation, transparency on grey) and served as RGB.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vitviz.data.base import VisionDataset
from vitviz.errors import VitvizError, shown
from vitviz.imagefiles import image_extensions, images_under
from vitviz.images import decode_image

log = logging.getLogger(__name__)

HASH_SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
_SPLIT_FOLDER_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
_HASH_BUCKETS = 10_000


SKIPPED_NOTE = "skipped {count} entries that are not regular files or are links to folders"


def find_class_folders(directory: Path, skipped: list[Path] | None = None) -> list[str]:
    """Sorted names of the visible subfolders of `directory` (links to folders are not followed): the class
    names. Links to folders are appended to `skipped` when it is given."""
    names = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if entry.is_symlink():
                if skipped is not None:
                    skipped.append(Path(entry.path))
                continue
            names.append(entry.name)
    return sorted(names)


def hash_split(relative_path: str) -> str:
    """The split ("train", "val" or "test") a file falls in, from a hash of its path relative to the root."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") % _HASH_BUCKETS / _HASH_BUCKETS
    if position < HASH_SPLIT_FRACTIONS["train"]:
        return "train"
    if position < HASH_SPLIT_FRACTIONS["train"] + HASH_SPLIT_FRACTIONS["val"]:
        return "val"
    return "test"


def _split_folder(root: Path, split: str) -> Path | None:
    for alias in _SPLIT_FOLDER_ALIASES[split]:
        if (root / alias).is_dir():
            return root / alias
    return None


class ImageFolderDataset(VisionDataset):
    """One split of an ImageFolder tree of the user's images (see the module docstring for the layouts)."""

    in_chans = 3
    has_masks = False

    def __init__(self, root: str | Path, *, split: str = "train") -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise VitvizError(f"image folder {shown(root)} does not exist or is not a folder")
        skipped: list[Path] = []
        train_folder = _split_folder(root, "train")
        if train_folder is not None:
            # Layout with split folders: classes come from train/, the split folder is read as it is.
            class_names = find_class_folders(train_folder)
            split_folder = _split_folder(root, split)
            if split_folder is None:
                raise VitvizError(
                    f"{shown(root)} has a train/ folder but no {'/ or '.join(_SPLIT_FOLDER_ALIASES[split])}/ folder for the {split} split"
                )
            unknown = sorted(set(find_class_folders(split_folder, skipped)) - set(class_names))
            if unknown:
                raise VitvizError(
                    f"{shown(split_folder)} has class folders that train/ lacks: {', '.join(map(shown, unknown))}"
                )
            samples = self._list_images(split_folder, class_names, skipped)
            if not samples:
                raise VitvizError(
                    f"no images in {shown(split_folder)} (looked for {', '.join(image_extensions())} in its class folders)"
                )
        else:
            class_names = find_class_folders(root, skipped)
            all_samples = self._list_images(root, class_names, skipped)
            if not all_samples:
                raise VitvizError(
                    f"no images in {shown(root)}: put them in one subfolder per class (looked for {', '.join(image_extensions())})"
                )
            samples = [
                (path, label) for path, label in all_samples if hash_split(path.relative_to(root).as_posix()) == split
            ]
            if not samples:
                raise VitvizError(
                    f"the {split} split of {shown(root)} is empty: {len(all_samples)} images are split "
                    f"{'/'.join(f'{f:.0%}' for f in HASH_SPLIT_FRACTIONS.values())} by file-name hash; "
                    "add images, or make train/ and val/ folders"
                )
        skipped = sorted(set(skipped))  # a split folder's class link is met twice (as a folder, as a class)
        if skipped:
            log.info(SKIPPED_NOTE.format(count=len(skipped)))
        self.root = root
        self.split = split
        self.skipped = skipped
        self.class_names = class_names
        self.paths = [path for path, _ in samples]
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    @staticmethod
    def _list_images(directory: Path, class_names: list[str], skipped: list[Path]) -> list[tuple[Path, int]]:
        """(path, label) of every image of the classes; links to folders and non-regular files go to `skipped`."""
        samples: list[tuple[Path, int]] = []
        for label, name in enumerate(class_names):
            folder = directory / name
            if folder.is_symlink():  # a split folder's class that is a link (to / perhaps): never entered
                skipped.append(folder)
                continue
            samples += [(path, label) for path in images_under(folder, skipped)]
        return samples

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = self._check_index(index)
        return decode_image(self.paths[index]), int(self.labels[index])


@dataclass(frozen=True)
class FolderSummary:
    """What training on `folder:ROOT` would read: the class names and the number of images of each split."""

    root: Path
    class_names: list[str]
    images: dict[str, int]  # split -> images ("train" and "val" always, "test" when there is one)

    @property
    def total(self) -> int:
        return sum(self.images.values())

    def describe(self) -> str:
        """One line, e.g. "3 classes, 120 images (train 96, val 12, test 12)"."""
        splits = ", ".join(f"{split} {count}" for split, count in self.images.items())
        return f"{len(self.class_names)} classes, {self.total} images ({splits})"


def summarize_folder(root: str | Path) -> FolderSummary:
    """Check that `root` can be trained on (as `--dataset folder:ROOT`) and say what it holds.

    The splits are read exactly as training reads them (`ImageFolderDataset`), so a folder accepted here gives
    training a train and a val split; a VitvizError says in one line why a folder cannot be used.
    """
    text = str(root).strip()
    if not text:
        raise VitvizError("give the path of an image folder on the server (one subfolder per class)")
    root = Path(text).expanduser()
    train = ImageFolderDataset(root, split="train")
    count = len(train.class_names)
    if count < 2:
        raise VitvizError(
            f"{root} has {count} class folder{'' if count == 1 else 's'}; a classifier needs at least two"
        )
    images = {"train": len(train), "val": len(ImageFolderDataset(root, split="val"))}
    with contextlib.suppress(VitvizError):  # no test split: training needs train and val only
        images["test"] = len(ImageFolderDataset(root, split="test"))
    return FolderSummary(root=root, class_names=list(train.class_names), images=images)
