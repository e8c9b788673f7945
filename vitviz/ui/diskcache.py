"""On-disk cache of heavy analysis results, shared by every session of the app and by restarts.

An entry is one .npz file of plain arrays (read back with `allow_pickle=False`, so a cache file can never
run code), named by the sha256 of a canonical JSON key: the analysis, the checkpoint's content hash, the
input images' content hashes and every parameter. Writes go through `vitviz.fileio` (temporary file,
rename), so a reader sees a whole entry or none. A damaged entry is ignored and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitviz import __version__
from vitviz.fileio import atomic_path

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the meaning of stored arrays changes, so old entries stop matching


def cache_key(analysis: str, **parts: Any) -> str:
    """sha256 hex of the canonical JSON of the analysis name, the format and vitviz versions and `parts`."""
    document = {"analysis": analysis, "format": CACHE_FORMAT, "vitviz": __version__, **parts}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class DiskCache:
    """Arrays by key under one folder: <root>/<analysis>/<key[:2]>/<key>.npz."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, analysis: str, key: str) -> Path:
        return self.root / analysis / key[:2] / f"{key}.npz"

    def get(self, analysis: str, key: str) -> dict[str, np.ndarray] | None:
        """The stored arrays, or None when absent or unreadable."""
        path = self.path(analysis, key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {name: stored[name] for name in stored.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            logger.warning("ignoring damaged cache entry %s (%s)", path, exc)
            return None

    def put(self, analysis: str, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Store arrays atomically; failure to write (read-only disk, full disk) is logged, not raised."""
        path = self.path(analysis, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp_path, open(tmp_path, "wb") as handle:
                np.savez(handle, **{name: np.asarray(value) for name, value in arrays.items()})
        except OSError as exc:
            logger.warning("could not write cache entry %s (%s)", path, exc)

    def get_or_compute(
        self, analysis: str, key: str, compute: Callable[[], Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """The stored arrays for `key`, computing and storing them first when absent."""
        found = self.get(analysis, key)
        if found is not None:
            return found
        arrays = {name: np.asarray(value) for name, value in compute().items()}
        self.put(analysis, key, arrays)
        return arrays
