"""Matplotlib figures in the style of the ViT paper's Fig. 7, for export as PNG and SVG.

Every function takes numpy arrays (never a model) and returns a `matplotlib.figure.Figure` built
directly, without pyplot, so nothing leaks into global state and it works in threads (Agg).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from vitviz.fileio import atomic_path
from vitviz.plots import (
    as_rgb_uint8,
    curve_label,
    curve_series,
    is_accuracy,
    minmax_scale,
    scale_by_max,
    tile_centres,
    tile_mosaic,
    upsample_bilinear,
)

logger = logging.getLogger(__name__)

GAP_COLOUR = "white"
_TITLE_SIZE = 11
_LABEL_SIZE = 10
_TICK_SIZE = 8
_DEFAULT_DPI = 150


def save_figure(fig: Figure, path_without_ext: str | Path, *, dpi: int = _DEFAULT_DPI) -> list[Path]:
    """Write `fig` as PNG and SVG beside each other (parent folders are created); return both paths.

    Each file is written as `vitviz.fileio` writes results: to a temporary file in the same folder, fsynced, then
    renamed over the old one, so a full disk or a kill leaves the previous figure or none, never half of one.
    """
    base = Path(path_without_ext)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in (".png", ".svg"):
        path = base.with_name(base.name + suffix)  # keeps dots in names such as "vit-b.16"
        with atomic_path(path) as partial:
            fig.savefig(partial, format=suffix[1:], dpi=dpi, bbox_inches="tight", facecolor="white")
        paths.append(path)
    logger.debug("wrote %s", ", ".join(str(p) for p in paths))
    return paths


def filters_figure(
    components: np.ndarray,
    explained_variance_ratio: np.ndarray,
    *,
    ncols: int = 7,
    max_components: int = 28,
    title: str | None = None,
) -> Figure:
    """The principal components of the patch-embedding filters (paper Fig. 7 left).

    Args:
        components: [k, C, P, P], raw or already scaled; each is min-max scaled on its own for
            display. C == 3 is drawn in colour, anything else in grey (mean over channels).
        explained_variance_ratio: [k], shown above each filter.
    """
    components = np.asarray(components, dtype=np.float64)[:max_components]
    ratios = np.asarray(explained_variance_ratio, dtype=np.float64)[: len(components)]
    if components.ndim != 4:
        raise ValueError(f"expected components [k, C, P, P], got shape {components.shape}")
    count, channels = components.shape[:2]
    pictures = _filter_pictures(components)
    ncols = max(1, min(ncols, count))
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(1.05 * ncols, 1.2 * nrows + 0.45), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for index, ax in enumerate(axes):
        ax.set_axis_off()
        if index >= count:
            continue
        picture = pictures[index]
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{index + 1}: {100 * ratios[index]:.1f}%", fontsize=_TICK_SIZE, pad=2)
    if title is None:
        kind = "RGB" if channels == 3 else ("Grey" if channels == 1 else f"{channels}-channel (mean)")
        title = f"{kind} embedding filters (first {count} principal components)"
    fig.suptitle(title, fontsize=_TITLE_SIZE)
    return fig


def position_similarity_figure(
    similarity: np.ndarray,
    *,
    vmin: float = -1.0,
    vmax: float = 1.0,
    cmap: str = "viridis",
    title: str = "Position embedding similarity",
) -> Figure:
    """Cosine similarity of position embeddings (paper Fig. 7 centre), drawn as one mosaic image.

    Args:
        similarity: [gh, gw, gh, gw]; tile (r, c) shows similarity[r, c], the similarity of patch
            (r, c) with every patch.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 4:
        raise ValueError(f"expected similarity [gh, gw, gh, gw], got shape {similarity.shape}")
    gh, gw = similarity.shape[:2]
    mosaic = tile_mosaic(similarity, gap=1)
    height, width = mosaic.shape
    # Large grids get a larger figure so each mosaic pixel (and each 1-pixel gap) covers about two
    # output pixels at the default dpi; below that, nearest-neighbour drops gaps at random.
    side = float(np.clip(2 * max(height, width) / _DEFAULT_DPI, 4.2, 9.0))
    scale = side / max(height, width)
    fig = Figure(figsize=(width * scale + 1.6, height * scale + 1.0), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        mosaic, cmap=_with_gap_colour(cmap), vmin=vmin, vmax=vmax, interpolation=_mosaic_interpolation(side, mosaic)
    )
    _tile_ticks(ax, (gh, gw), (gh, gw))
    ax.set_xlabel("Input patch column", fontsize=_LABEL_SIZE)
    ax.set_ylabel("Input patch row", fontsize=_LABEL_SIZE)
    ax.set_title(title, fontsize=_TITLE_SIZE)
    for spine in ax.spines.values():
        spine.set_visible(False)
    colorbar = fig.colorbar(image, cax=_colorbar_axes(ax, mosaic.shape))
    colorbar.set_label("Cosine similarity", fontsize=_LABEL_SIZE)
    colorbar.ax.tick_params(labelsize=_TICK_SIZE)
    return fig


def distance_figure(
    pixels: np.ndarray,
    *,
    std: np.ndarray | None = None,
    show_mean: bool = True,
    ymax: float | None = None,
    title: str | None = None,
) -> Figure:
    """Mean attention distance per head against depth (paper Fig. 7 right).

    Args:
        pixels: [L, H] mean attention distance in pixels.
        std: optional [L, H] spread over images, drawn as error bars.
        show_mean: draw the mean over heads of each layer as a line.
        ymax: top of the y axis, to share one scale across models.
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.ndim != 2:
        raise ValueError(f"expected pixels [L, H], got shape {pixels.shape}")
    depth, heads = pixels.shape
    layers = np.arange(1, depth + 1)
    colours = _head_colours(heads)
    fig = Figure(figsize=(5.6 if heads <= 16 else 6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    # Heads of one layer sit on the same x; a small spread keeps overlapping points visible.
    jitter = np.linspace(-0.18, 0.18, heads) if heads > 1 and depth <= 24 else np.zeros(heads)
    for head in range(heads):
        x = layers + jitter[head]
        ax.scatter(x, pixels[:, head], s=16, color=colours[head], label=f"Head {head + 1}", zorder=3)
        if std is not None:
            ax.errorbar(
                x,
                pixels[:, head],
                yerr=np.asarray(std)[:, head],
                fmt="none",
                ecolor=colours[head],
                elinewidth=0.7,
                alpha=0.6,
                zorder=2,
            )
    if show_mean:
        ax.plot(layers, pixels.mean(axis=1), color="black", linewidth=1.3, label="Mean", zorder=4)
    ax.set_xlabel("Network depth (layer)", fontsize=_LABEL_SIZE)
    ax.set_ylabel("Mean attention distance (pixels)", fontsize=_LABEL_SIZE)
    ax.set_xlim(0.4, depth + 0.6)
    ax.set_ylim(0, ymax if ymax is not None else max(1.0, float(np.nanmax(pixels)) * 1.08))
    ax.set_xticks(layers if depth <= 16 else layers[:: math.ceil(depth / 12)])
    ax.tick_params(labelsize=_TICK_SIZE)
    ax.grid(True, linewidth=0.4, alpha=0.4)
    if title:
        ax.set_title(title, fontsize=_TITLE_SIZE)
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        frameon=False,
        ncols=1 if heads <= 16 else 2,
        handletextpad=0.2,
        borderaxespad=0.0,
    )
    return fig


def training_curves_figure(
    records: Sequence[Mapping[str, object]],
    *,
    x: str = "step",
    metrics: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Loss (left) and accuracy (right) against `x`, from logged records such as a run's metrics.jsonl rows.

    The same series as the app's interactive curves (`vitviz.plots.curve_series`); accuracy is drawn in
    percent. Curves with 30 points or fewer (per-epoch evaluations) get markers.
    """
    series = curve_series(records, x=x, metrics=metrics)
    fig = Figure(figsize=(8.4, 3.4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, name in ((loss_ax, "Loss"), (acc_ax, "Accuracy (%)")):
        ax.set_title(name.split(" ")[0], fontsize=_TITLE_SIZE)
        ax.set_xlabel(x.capitalize(), fontsize=_LABEL_SIZE)
        ax.set_ylabel(name, fontsize=_LABEL_SIZE)
        ax.tick_params(labelsize=_TICK_SIZE)
        ax.grid(True, linewidth=0.4, alpha=0.4)
    for key, (xs, ys) in series.items():
        accuracy = is_accuracy(key)
        ax = acc_ax if accuracy else loss_ax
        values = np.asarray(ys, dtype=np.float64) * (100.0 if accuracy else 1.0)
        ax.plot(xs, values, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2, label=curve_label(key))
    for ax in (loss_ax, acc_ax):
        if ax.lines:
            ax.legend(fontsize=7, frameon=False)
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, fontsize=_LABEL_SIZE)
    if acc_ax.lines:
        acc_ax.set_ylim(0, 100)
    if title:
        fig.suptitle(title, fontsize=_TITLE_SIZE)
    return fig


def overlay_image(
    image: np.ndarray,
    relevance: np.ndarray,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    blocks: bool = False,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend a patch map over an image: the map divided by its max (or by `vmax`), upsampled, coloured.

    Args:
        image: uint8 [H, W, 3] (or [H, W] grey), any aspect ratio: the map is stretched over it.
        relevance: [gh, gw] non-negative map, e.g. attention rollout.
        blocks: one flat block per token (nearest neighbour) instead of bilinear smoothing.
        vmax: the value drawn at the top of the colour map (a shared scale); default the map's max.
    Returns:
        uint8 [H, W, 3].
    """
    rgb = as_rgb_uint8(image).astype(np.float64)
    relevance = np.asarray(relevance, dtype=np.float64)
    scaled = scale_by_max(relevance) if vmax is None else relevance / max(vmax, 1e-12)
    if blocks:
        height, width = rgb.shape[:2]
        gh, gw = scaled.shape
        rows = np.minimum((np.arange(height) * gh) // height, gh - 1)
        cols = np.minimum((np.arange(width) * gw) // width, gw - 1)
        heat = scaled[rows[:, None], cols[None, :]].clip(0.0, 1.0)
    else:
        heat = upsample_bilinear(scaled, rgb.shape[:2]).clip(0.0, 1.0)
    coloured = matplotlib.colormaps[cmap](heat)[..., :3] * 255.0
    return np.rint((1.0 - alpha) * rgb + alpha * coloured).clip(0, 255).astype(np.uint8)


def rollout_overlay_figure(
    image: np.ndarray,
    relevance: np.ndarray,
    *,
    title: str = "Attention rollout",
    cmap: str = "jet",
    alpha: float = 0.5,
) -> Figure:
    """The input image beside the same image with a relevance map (divided by its max) laid over it."""
    rgb = as_rgb_uint8(image)
    height, width = rgb.shape[:2]
    panel = 3.2
    scale = panel / max(height, width)
    fig = Figure(figsize=(2 * width * scale + 0.9, height * scale + 0.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(rgb)
    left.set_title("Input", fontsize=_LABEL_SIZE)
    right.imshow(overlay_image(rgb, relevance, cmap=cmap, alpha=alpha))
    right.set_title(title, fontsize=_LABEL_SIZE)
    for ax in (left, right):
        ax.set_axis_off()
    colorbar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=cmap), ax=right, shrink=0.9, pad=0.02)
    colorbar.set_label("Relevance (÷ max)", fontsize=_TICK_SIZE)
    colorbar.ax.tick_params(labelsize=_TICK_SIZE)
    return fig


def attention_grid_figure(
    attention: np.ndarray,
    *,
    query: tuple[int, int] | None = None,
    per_tile: bool = False,
    vmax: float | None = None,
    cmap: str = "inferno",
    title: str | None = None,
) -> Figure:
    """Where one query patch looks, for every layer (rows) and head (columns), as one mosaic image.

    Args:
        attention: [L, H, gh, gw], the attention of one query over the patches.
        query: (row, col) of the query patch, marked in every tile.
        per_tile: scale each tile by its own max (shows shape, hides strength); otherwise all tiles
            share 0..vmax (default: the overall max).
    """
    attention = np.asarray(attention, dtype=np.float64)
    if attention.ndim != 4:
        raise ValueError(f"expected attention [L, H, gh, gw], got shape {attention.shape}")
    depth, heads, gh, gw = attention.shape
    values = np.stack([[scale_by_max(tile) for tile in layer] for layer in attention]) if per_tile else attention
    top = 1.0 if per_tile else (vmax if vmax is not None else max(float(np.nanmax(values)), 1e-12))
    mosaic = tile_mosaic(values, gap=1)
    height, width = mosaic.shape
    scale = min(7.0 / width, 6.0 / height)
    fig = Figure(figsize=(width * scale + 1.6, height * scale + 1.0), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        mosaic,
        cmap=_with_gap_colour(cmap),
        vmin=0.0,
        vmax=top,
        interpolation=_mosaic_interpolation(scale * max(height, width), mosaic),
    )
    _tile_ticks(ax, (depth, heads), (gh, gw))
    ax.set_xlabel("Head", fontsize=_LABEL_SIZE)
    ax.set_ylabel("Layer", fontsize=_LABEL_SIZE)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if query is not None:
        rows = np.arange(depth)[:, None] * (gh + 1) + query[0]
        cols = np.arange(heads)[None, :] * (gw + 1) + query[1]
        rows, cols = np.broadcast_arrays(rows, cols)
        ax.scatter(cols.ravel(), rows.ravel(), marker="s", s=8, facecolors="none", edgecolors="cyan", linewidths=0.6)
    if title is None:
        where = "one query patch" if query is None else f"query patch ({query[0] + 1}, {query[1] + 1})"
        title = f"Attention of {where}"
    ax.set_title(title, fontsize=_TITLE_SIZE)
    colorbar = fig.colorbar(image, cax=_colorbar_axes(ax, mosaic.shape))
    colorbar.set_label("Attention (÷ tile max)" if per_tile else "Attention probability", fontsize=_LABEL_SIZE)
    colorbar.ax.tick_params(labelsize=_TICK_SIZE)
    return fig


def _filter_pictures(components: np.ndarray) -> list[np.ndarray]:
    """Each component [C, P, P] min-max scaled on its own, as [P, P, 3] colour or [P, P] grey."""
    scaled = minmax_scale(components, over=(1, 2, 3))
    if components.shape[1] == 3:
        return [c.transpose(1, 2, 0) for c in scaled]
    return [c.mean(axis=0) for c in scaled]


def _tile_ticks(ax: Axes, counts: tuple[int, int], tile: tuple[int, int]) -> None:
    """1-based tick labels at tile centres; thinned out so large grids stay legible."""
    for axis, count, tile_len in ((ax.yaxis, counts[0], tile[0]), (ax.xaxis, counts[1], tile[1])):
        step = 1 if count <= 16 else math.ceil(count / 12)
        picked = np.arange(0, count, step)
        axis.set_ticks(tile_centres(count, tile_len)[picked], [str(i + 1) for i in picked])
    ax.tick_params(length=0, labelsize=_TICK_SIZE)


def _colorbar_axes(ax: Axes, mosaic_shape: tuple[int, ...]) -> Axes:
    """A colorbar slot beside a mosaic image exactly as tall as the image (an inset follows its aspect)."""
    height, width = mosaic_shape[:2]
    bar_width = 0.045 * min(1.0, height / width)  # a fraction of the image width: keep wide mosaics' bars thin
    return ax.inset_axes((1.03, 0.0, bar_width, 1.0))


def _mosaic_interpolation(side_inches: float, mosaic: np.ndarray) -> str:
    """Nearest-neighbour while each mosaic pixel spans >= 2 output pixels, else smooth downsampling."""
    output_pixels = side_inches * _DEFAULT_DPI
    return "nearest" if output_pixels >= 2 * max(mosaic.shape[:2]) else "antialiased"


def _with_gap_colour(cmap: str) -> matplotlib.colors.Colormap:
    return matplotlib.colormaps[cmap].with_extremes(bad=GAP_COLOUR)


def _head_colours(heads: int) -> list[tuple[float, ...]]:
    if heads <= 10:
        palette = matplotlib.colormaps["tab10"]
        return [palette(i) for i in range(heads)]
    if heads <= 20:
        palette = matplotlib.colormaps["tab20"]
        return [palette(i) for i in range(heads)]
    palette = matplotlib.colormaps["turbo"]
    return [palette(i / max(heads - 1, 1)) for i in range(heads)]
