"""MNIST read from its original IDX files (gzip-compressed or raw) in a folder the user names.

Split "train" is the first 55,000 images of train-images-idx3-ubyte, "val" its last 5,000 (so the two never
overlap), "test" is t10k-images-idx3-ubyte. The repository ships the test files in `BUNDLED_ROOT`
(assets/data/mnist, with their source and licence); with only those at hand, slice the test split
("test[:8000]" to train, "test[8000:]" to evaluate) and say so wherever a number is reported.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import numpy as np

from vitviz.data.base import GreyDigitsDataset
from vitviz.errors import VitvizError

log = logging.getLogger(__name__)

# The MNIST test set that ships with the repository, found from this file so that any working directory works.
BUNDLED_ROOT = Path(__file__).resolve().parents[2] / "assets" / "data" / "mnist"

IDX_UBYTE_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_UBYTE_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
VAL_SIZE = 5_000  # held out from the end of the training file
_FILE_STEMS = {"train": "train", "val": "train", "test": "t10k"}


def read_idx(path: Path, *, expected_magic: int) -> np.ndarray:
    """Reads an IDX file of unsigned bytes (gzip or raw) into an array shaped by its header.

    Raises VitvizError naming the file when it is not a gzip/IDX file of the expected kind or its size
    disagrees with its header.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic; decompress whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise VitvizError(f"{path} is not a readable gzip file ({error}); download it again") from error
    if len(raw) < 4:
        raise VitvizError(f"{path} is too short to be an IDX file ({len(raw)} bytes); download it again")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise VitvizError(
            f"{path} is not an IDX file of the expected kind (magic number {magic:#010x}, expected {expected_magic:#010x})"
        )
    num_dims = magic & 0xFF
    header_size = 4 + 4 * num_dims
    if len(raw) < header_size:
        raise VitvizError(f"{path} ends inside its IDX header; download it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * d : 8 + 4 * d], "big") for d in range(num_dims))
    expected_size = header_size + int(np.prod(shape))
    if len(raw) != expected_size:
        raise VitvizError(
            f"{path} holds {len(raw)} bytes but its IDX header {shape} needs {expected_size}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def find_idx_file(root: Path, name: str) -> Path | None:
    """The IDX file `name` in `root`, raw or with .gz, or None when neither is there."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


class MnistDataset(GreyDigitsDataset):
    """One split of MNIST from IDX files in `root`; 28x28 grey images, labels 0..9."""

    has_masks = False

    def __init__(self, root: str | Path, *, split: str = "train") -> None:
        root = Path(root).expanduser()
        stem = _FILE_STEMS[split]
        names = (f"{stem}-images-idx3-ubyte", f"{stem}-labels-idx1-ubyte")
        paths = [find_idx_file(root, name) for name in names]
        if None in paths:
            hint = ""
            if split != "test" and find_idx_file(root, "t10k-images-idx3-ubyte") is not None:
                hint = "; the folder has only the test files: slice them, e.g. split 'test[:8000]' to train and 'test[8000:]' to evaluate"
            raise VitvizError(
                f"MNIST {split} split not found in {root}: expected {names[0]}(.gz) and {names[1]}(.gz) there{hint}"
            )
        images = read_idx(paths[0], expected_magic=IDX_UBYTE_IMAGES_MAGIC)
        labels = read_idx(paths[1], expected_magic=IDX_UBYTE_LABELS_MAGIC)
        if len(images) != len(labels):
            raise VitvizError(f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise VitvizError(f"{paths[1]} has label {labels.max()}; MNIST labels are 0..9")
        if split != "test":
            if len(images) <= VAL_SIZE:
                raise VitvizError(
                    f"{paths[0]} holds only {len(images)} images, too few to hold out {VAL_SIZE} for the val split"
                )
            keep = slice(None, -VAL_SIZE) if split == "train" else slice(-VAL_SIZE, None)
            images, labels = images[keep], labels[keep]
        log.debug("read %d MNIST %s images from %s", len(images), split, root)
        self.images = images  # [N, 28, 28] uint8, read-only view of the file's bytes
        self.labels = labels.astype(np.int64)
        self.split = split
