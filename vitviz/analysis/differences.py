"""Cross-model difference maps: each model's map minus a reference model's, on the reference's patch grid.

Given named maps in order ([gh, gw] maps, or [gh, gw, gh, gw] tables over both grids, e.g. position
similarity), the first is the reference. Each other map whose shape differs from the reference's is first
resampled bilinearly to the reference grid (PIL's BILINEAR resize of float32 planes, read back as float64; a
table is resampled over its key grid, then over its query grid), then the reference is subtracted. ``limit`` is
the largest |difference| (NaN ignored), the shared colour scale; 1e-12 when every difference is 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["Difference", "MapDifferences", "map_differences", "resample_bilinear"]

ZERO_LIMIT = 1e-12


@dataclass(frozen=True)
class Difference:
    """One model's map minus the reference's, on the reference's grid."""

    name: str
    values: np.ndarray  # float64, the reference's shape
    resampled_from: tuple[int, int] | None  # the model's own grid when it was resampled, else None


@dataclass(frozen=True)
class MapDifferences:
    """Every other model minus the reference, in the order given."""

    reference: str
    grid: tuple[int, int]  # the reference's patch grid
    differences: dict[str, Difference]
    limit: float  # the largest |difference|: a shared, symmetric colour scale

    @property
    def resampled(self) -> dict[str, tuple[int, int]]:
        """The models resampled to the reference grid, with the grid each came from."""
        return {n: d.resampled_from for n, d in self.differences.items() if d.resampled_from is not None}


def resample_bilinear(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A [gh, gw] map, or a [gh, gw, gh, gw] table on both of its grids, resampled bilinearly to ``grid``."""

    def resize(plane: np.ndarray) -> np.ndarray:
        picture = Image.fromarray(np.asarray(plane, dtype=np.float32), mode="F")
        return np.asarray(picture.resize((grid[1], grid[0]), Image.Resampling.BILINEAR), dtype=np.float64)

    values = np.asarray(values)
    if values.ndim == 2:
        return resize(values)
    if values.ndim != 4:
        raise ValueError(f"a map is [gh, gw] or [gh, gw, gh, gw], got shape {values.shape}")
    gh, gw = values.shape[:2]
    keys_done = np.stack([[resize(values[r, c]) for c in range(gw)] for r in range(gh)])  # [gh, gw, GH, GW]
    moved = keys_done.transpose(2, 3, 0, 1)  # [GH, GW, gh, gw]
    queries_done = np.stack([[resize(moved[i, j]) for j in range(grid[1])] for i in range(grid[0])])
    return queries_done.transpose(2, 3, 0, 1)


def map_differences(maps: Mapping[str, np.ndarray]) -> MapDifferences | None:
    """Each map but the first minus the first (resampled to its grid where the shapes differ); None for fewer
    than two maps."""
    if len(maps) < 2:
        return None
    reference_name, reference = next(iter(maps.items()))
    reference = np.asarray(reference)
    grid = (int(reference.shape[0]), int(reference.shape[1]))
    differences: dict[str, Difference] = {}
    for name, values in maps.items():
        if name == reference_name:
            continue
        values = np.asarray(values)
        source = None
        if values.shape != reference.shape:
            source = (int(values.shape[0]), int(values.shape[1]))
            values = resample_bilinear(values, grid)
        differences[name] = Difference(name=name, values=values - reference, resampled_from=source)
    limit = max(float(np.nanmax(np.abs(d.values))) for d in differences.values()) or ZERO_LIMIT
    return MapDifferences(reference=reference_name, grid=grid, differences=differences, limit=limit)
