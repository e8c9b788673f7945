"""MNIST from IDX files, defined in `vitviz.data.mnist` (the core analyses it too); re-exported here."""

from vitviz.data.mnist import BUNDLED_ROOT, MnistDataset, find_idx_file, read_idx

__all__ = ["BUNDLED_ROOT", "MnistDataset", "find_idx_file", "read_idx"]
