"""Figures of vitviz: `paper` (matplotlib, the ViT paper's style, for PNG/SVG export) and
`interactive` (plotly, for the app).

Import the submodule you need (`from vitviz.plots import paper`), so matplotlib or plotly is loaded
only where it is used. This module holds the small array helpers both share: laying tiles out as one
mosaic picture (so a 24 x 24 grid of maps is one image, not 576 axes) and scaling maps for display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "as_rgb_uint8",
    "curve_label",
    "curve_series",
    "is_accuracy",
    "is_number",
    "minmax_scale",
    "mosaic_positions",
    "scale_by_max",
    "tile_centres",
    "tile_mosaic",
    "upsample_bilinear",
]


def tile_mosaic(tiles: np.ndarray, *, gap: int = 1, fill: float = np.nan) -> np.ndarray:
    """Lay out tiles [rows, cols, h, w, *channels] as one picture, `gap` pixels of `fill` between tiles.

    Tile (r, c) starts at pixel (r * (h + gap), c * (w + gap)). Integer tiles with a NaN fill give
    float32 output.
    """
    tiles = np.asarray(tiles)
    if tiles.ndim < 4:
        raise ValueError(f"expected tiles [rows, cols, h, w, ...], got shape {tiles.shape}")
    rows, cols, h, w = tiles.shape[:4]
    channels = tiles.shape[4:]
    dtype = tiles.dtype if np.issubdtype(tiles.dtype, np.floating) or not np.isnan(fill) else np.float32
    padded = np.full((rows, cols, h + gap, w + gap, *channels), fill, dtype=dtype)
    padded[:, :, :h, :w] = tiles
    axes = (0, 2, 1, 3, *range(4, 4 + len(channels)))
    mosaic = padded.transpose(axes).reshape(rows * (h + gap), cols * (w + gap), *channels)
    return mosaic[: mosaic.shape[0] - gap, : mosaic.shape[1] - gap]


def mosaic_positions(num_tiles: int, tile_len: int, gap: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel along one mosaic axis: (tile index, index inside the tile), both -1 on gaps."""
    length = num_tiles * (tile_len + gap) - gap
    offset = np.arange(length)
    tile, inner = np.divmod(offset, tile_len + gap)
    on_gap = inner >= tile_len
    return np.where(on_gap, -1, tile), np.where(on_gap, -1, inner)


def tile_centres(num_tiles: int, tile_len: int, gap: int = 1) -> np.ndarray:
    """Mosaic coordinate of the centre of each tile along one axis, for tick marks."""
    return np.arange(num_tiles) * (tile_len + gap) + (tile_len - 1) / 2.0


def scale_by_max(values: np.ndarray) -> np.ndarray:
    """Divide a non-negative map by its maximum for display (DESIGN: displays divide by the max)."""
    values = np.asarray(values, dtype=np.float64)
    peak = float(np.nanmax(values)) if values.size else 0.0
    return values / peak if peak > 0 else np.zeros_like(values)


def minmax_scale(values: np.ndarray, *, over: tuple[int, ...] | None = None) -> np.ndarray:
    """Scale to [0, 1] by min and max over the axes `over` (all axes if None); constants give 0.5."""
    values = np.asarray(values, dtype=np.float64)
    low = values.min(axis=over, keepdims=True)
    high = values.max(axis=over, keepdims=True)
    span = high - low
    return np.where(span > 0, (values - low) / np.where(span > 0, span, 1.0), 0.5)


def upsample_bilinear(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a [h, w] map to size (H, W) with bilinear interpolation (half-pixel centres)."""
    grid = torch.as_tensor(np.asarray(values, dtype=np.float32))[None, None]
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """An image as uint8 [H, W, 3]: grey is repeated, alpha dropped, floats read as 0..1."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.dtype != np.uint8:
        image = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return image[..., :3]


def curve_series(
    records: Sequence[Mapping[str, object]],
    *,
    x: str = "step",
    metrics: Sequence[str] | None = None,
) -> dict[str, tuple[list[float], list[float]]]:
    """Training-curve series from logged records (e.g. metrics.jsonl rows): {metric: (xs, ys)}.

    Args:
        records: one mapping per logged point; a record without a finite `x` or metric is skipped for it.
        metrics: keys to draw; default every key, in first-seen order, whose name contains "loss" or "acc"
            and that has at least one finite number.
    """
    if metrics is None:
        keys = dict.fromkeys(key for record in records for key in record)
        metrics = [key for key in keys if key != x and ("loss" in key.lower() or "acc" in key.lower())]
    series: dict[str, tuple[list[float], list[float]]] = {}
    for key in metrics:
        points = [
            (record[x], record[key]) for record in records if is_number(record.get(x)) and is_number(record.get(key))
        ]
        if points:
            xs, ys = zip(*points)
            series[key] = (list(xs), list(ys))
    return series


# What the training backend's metrics.jsonl keys mean, for legends: step records hold running means over
# the last `log_every` steps, epoch records the whole epoch and the evaluation after it.
_CURVE_LABELS = {
    "loss": "train loss (steps)",
    "accuracy": "train accuracy (steps)",
    "train_loss": "train loss (epoch)",
    "train_accuracy": "train accuracy (epoch)",
    "eval_loss": "eval loss (epoch)",
    "eval_accuracy": "eval accuracy (epoch)",
}


def curve_label(metric: str) -> str:
    """The legend text of a logged metric: the backend's own keys spelled out, any other key as written."""
    return _CURVE_LABELS.get(metric, metric.replace("_", " "))


def is_accuracy(metric: str) -> bool:
    """Whether a curve belongs on the accuracy panel (all others go on the loss panel)."""
    return "acc" in metric.lower()


def is_number(value: object) -> bool:
    """A finite int or float (numpy scalars included), never a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(value)
