"""Matplotlib figures in the style of the ViT paper's Fig. 7, for export as PNG and SVG.

Every function takes numpy arrays (never a model) and returns a `matplotlib.figure.Figure` built
directly, without pyplot, so nothing leaks into global state and it works in threads (Agg).

The figures the app also draws are described once in `vitviz.plots.figures`; each `*_figure` here is
`render_matplotlib(describe_*(...))`, the app's `vitviz.plots.interactive` draws the same description
with plotly.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from vitviz.fileio import atomic_path
from vitviz.plots import as_rgb_uint8, scale_by_max, upsample_bilinear
from vitviz.plots.figures import (
    DEFAULT_COLORMAP,
    GRID_COLORMAP,
    MARK_COLOUR,
    CurvesFigure,
    DistanceFigure,
    FiltersFigure,
    IntervalsFigure,
    MosaicFigure,
    OverlayFigure,
    Ticks,
    describe_attention_grid,
    describe_distance,
    describe_filters,
    describe_position_similarity,
    describe_rollout,
    describe_training_curves,
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
    """The principal components of the patch-embedding filters (paper Fig. 7 left); see `describe_filters`."""
    return render_matplotlib(
        describe_filters(components, explained_variance_ratio, ncols=ncols, max_components=max_components, title=title)
    )


def position_similarity_figure(
    similarity: np.ndarray,
    *,
    vmin: float = -1.0,
    vmax: float = 1.0,
    colormap: str = DEFAULT_COLORMAP,
    cmap: str | None = None,
    title: str = "Position embedding similarity",
) -> Figure:
    """Cosine similarity of position embeddings (paper Fig. 7 centre), drawn as one mosaic image.

    Args:
        similarity: [gh, gw, gh, gw]; tile (r, c) shows similarity[r, c], the similarity of patch
            (r, c) with every patch.
        colormap: the colour map's matplotlib name; `cmap` is the same, under its older name.
    """
    return render_matplotlib(
        describe_position_similarity(similarity, vmin=vmin, vmax=vmax, colormap=cmap or colormap, title=title)
    )


def distance_figure(
    pixels: np.ndarray,
    *,
    std: np.ndarray | None = None,
    show_mean: bool = True,
    ymax: float | None = None,
    title: str | None = None,
) -> Figure:
    """Mean attention distance per head against depth (paper Fig. 7 right); see `describe_distance`."""
    return render_matplotlib(describe_distance(pixels, std=std, show_mean=show_mean, ymax=ymax, title=title))


def training_curves_figure(
    records: Sequence[Mapping[str, object]],
    *,
    x: str = "step",
    metrics: Sequence[str] | None = None,
    title: str | None = None,
    marker: tuple[float, str] | None = None,
) -> Figure:
    """Loss (left) and accuracy (right, in percent) against `x`, from logged records such as metrics.jsonl rows.

    The same series as the app's interactive curves; curves with 30 points or fewer (per-epoch evaluations)
    get markers. `marker` (x, label): a dotted vertical line across both panels, labelled in the first.
    """
    return render_matplotlib(describe_training_curves(records, x=x, metrics=metrics, title=title, marker=marker))


def overlay_image(
    image: np.ndarray,
    relevance: np.ndarray,
    *,
    cmap: str = DEFAULT_COLORMAP,
    alpha: float = 0.5,
    blocks: bool = True,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend a patch map over an image: the map divided by its max (or by `vmax`), stretched, coloured.

    Args:
        image: uint8 [H, W, 3] (or [H, W] grey), any aspect ratio: the map is stretched over it.
        relevance: [gh, gw] non-negative map, e.g. attention rollout.
        blocks: one flat block per token (nearest neighbour, the default as in the figures); False
            smooths with bilinear interpolation.
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
    colormap: str = DEFAULT_COLORMAP,
    cmap: str | None = None,
    alpha: float = 0.5,
    smooth: bool = False,
) -> Figure:
    """The input image beside the same image with a relevance map (divided by its max) laid over it.

    One block per token unless `smooth`; `colormap` is the colour map's matplotlib name (`cmap` the same,
    under its older name), `alpha` the map's opacity.
    """
    description = describe_rollout(
        image, relevance, title=title, colormap=cmap or colormap, opacity=alpha, smooth=smooth, input_title="Input"
    )
    return render_matplotlib(description)


def attention_grid_figure(
    attention: np.ndarray,
    *,
    query: tuple[int, int] | None = None,
    per_tile: bool = False,
    vmax: float | None = None,
    colormap: str = GRID_COLORMAP,
    cmap: str | None = None,
    title: str | None = None,
) -> Figure:
    """Where one query patch looks, for every layer (rows) and head (columns), as one mosaic image.

    Args:
        attention: [L, H, gh, gw], the attention of one query over the patches.
        query: (row, col) of the query patch, marked in every tile.
        per_tile: scale each tile by its own max (shows shape, hides strength); otherwise all tiles
            share 0..vmax (default: the overall max).
        colormap: the colour map's matplotlib name; `cmap` is the same, under its older name.
    """
    description = describe_attention_grid(
        attention, query=query, per_tile=per_tile, vmax=vmax, colormap=cmap or colormap, title=title
    )
    return render_matplotlib(description)


# --- the renderer -----------------------------------------------------------------------------------


@functools.singledispatch
def render_matplotlib(description: object) -> Figure:
    """Draw a figure description of `vitviz.plots.figures` with matplotlib."""
    raise TypeError(f"no matplotlib renderer for {type(description).__name__}")


@render_matplotlib.register
def _(description: MosaicFigure) -> Figure:
    mosaic = description.mosaic
    height, width = mosaic.shape
    # Each mosaic pixel (and each 1-pixel gap) should cover about two output pixels at the default dpi;
    # below that, nearest-neighbour drops gaps at random. Large grids get a larger figure, up to a limit.
    side = float(np.clip(2 * max(height, width) / _DEFAULT_DPI, 4.2, 9.0))
    scale = side / max(height, width)
    fig = Figure(figsize=(width * scale + 1.6, height * scale + 1.0), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        mosaic,
        cmap=matplotlib.colormaps[description.colormap].with_extremes(bad=GAP_COLOUR),
        vmin=description.vmin,
        vmax=description.vmax,
        interpolation=_mosaic_interpolation(side, mosaic),
    )
    _set_ticks(ax, description.x_ticks, description.y_ticks)
    ax.tick_params(length=0, labelsize=_TICK_SIZE)
    ax.set_xlabel(description.x_label, fontsize=_LABEL_SIZE)
    ax.set_ylabel(description.y_label, fontsize=_LABEL_SIZE)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if description.marks:
        xs, ys = zip(*description.marks)
        ax.scatter(xs, ys, marker="s", s=8, facecolors="none", edgecolors=MARK_COLOUR, linewidths=0.6)
    if description.title:
        ax.set_title(description.title, fontsize=_TITLE_SIZE)
    colorbar = fig.colorbar(image, cax=_colorbar_axes(ax, mosaic.shape))
    colorbar.set_label(description.colorbar_label, fontsize=_LABEL_SIZE)
    colorbar.ax.tick_params(labelsize=_TICK_SIZE)
    return fig


@render_matplotlib.register
def _(description: OverlayFigure) -> Figure:
    rgb = description.image
    height, width = rgb.shape[:2]
    panel = 3.2
    scale = panel / max(height, width)
    panels = 2 if description.input_title is not None else 1
    fig = Figure(figsize=(panels * width * scale + 0.9, height * scale + 0.6), layout="constrained")
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    if description.input_title is not None:
        axes[0].imshow(rgb)
        axes[0].set_title(description.input_title, fontsize=_LABEL_SIZE)
    ax = axes[-1]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # the map is stretched over the picture's pixels
    ax.imshow(rgb, extent=extent)
    heat = ax.imshow(
        description.values,
        cmap=description.colormap,
        vmin=description.vmin,
        vmax=description.vmax,
        alpha=description.opacity,
        extent=extent,
        interpolation="bilinear" if description.smooth else "nearest",
    )
    if description.title:
        ax.set_title(description.title, fontsize=_LABEL_SIZE)
    for each in axes:
        each.set_axis_off()
    colorbar = fig.colorbar(heat, ax=ax, shrink=0.9, pad=0.02)
    colorbar.solids.set_alpha(1.0)  # the scale itself opaque, as in the app
    colorbar.set_label(description.colorbar_label, fontsize=_TICK_SIZE)
    colorbar.ax.tick_params(labelsize=_TICK_SIZE)
    return fig


@render_matplotlib.register
def _(description: DistanceFigure) -> Figure:
    pixels = description.pixels
    depth, heads = pixels.shape
    layers = np.arange(1, depth + 1)
    fig = Figure(figsize=(5.6 if heads <= 16 else 6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    # Heads of one layer sit on the same x; a small spread keeps overlapping points visible.
    jitter = np.linspace(-0.18, 0.18, heads) if heads > 1 and depth <= 24 else np.zeros(heads)
    for head, (label, colour) in enumerate(zip(description.head_labels, description.head_colours)):
        x = layers + jitter[head]
        ax.scatter(x, pixels[:, head], s=16, color=colour, label=label, zorder=3)
        if description.std is not None:
            ax.errorbar(
                x,
                pixels[:, head],
                yerr=description.std[:, head],
                fmt="none",
                ecolor=colour,
                elinewidth=0.7,
                alpha=0.6,
                zorder=2,
            )
    if description.show_mean:
        ax.plot(layers, pixels.mean(axis=1), color="black", linewidth=1.3, label=description.mean_label, zorder=4)
    ax.set_xlabel(description.x_label, fontsize=_LABEL_SIZE)
    ax.set_ylabel(description.y_label, fontsize=_LABEL_SIZE)
    ax.set_xlim(0.4, depth + 0.6)
    ax.set_ylim(*description.y_range)
    ax.set_xticks(description.x_ticks.positions, description.x_ticks.labels)
    ax.tick_params(labelsize=_TICK_SIZE)
    ax.grid(True, linewidth=0.4, alpha=0.4)
    if description.title:
        ax.set_title(description.title, fontsize=_TITLE_SIZE)
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


@render_matplotlib.register
def _(description: FiltersFigure) -> Figure:
    count = len(description.pictures)
    ncols = description.ncols
    nrows = -(-count // ncols)
    fig = Figure(figsize=(1.05 * ncols, 1.2 * nrows + 0.45), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for index, ax in enumerate(axes):
        ax.set_axis_off()
        if index >= count:
            continue
        picture = description.pictures[index]
        ax.imshow(picture, cmap="gray" if description.grey else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(description.labels[index], fontsize=_TICK_SIZE, pad=2)
    fig.suptitle(description.title, fontsize=_TITLE_SIZE)
    return fig


@render_matplotlib.register
def _(description: CurvesFigure) -> Figure:
    panels = description.panels
    width = max((0.45 * len(p.categories) + 2.5 for p in panels if p.categories), default=4.2 * len(panels))
    fig = Figure(figsize=(max(width, 4.5), 3.4 if len(panels) > 1 or not panels[0].categories else 3.6))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=description.share_y)[0]
    for ax, panel in zip(axes, panels):
        if panel.title:
            ax.set_title(panel.title, fontsize=_TITLE_SIZE)
        ax.set_xlabel(panel.x_label, fontsize=_LABEL_SIZE)
        if ax is axes[0] or not description.share_y:
            ax.set_ylabel(panel.y_label, fontsize=_LABEL_SIZE)
        ax.tick_params(labelsize=_TICK_SIZE)
        ax.grid(True, linewidth=0.4, alpha=0.4)
        for series in panel.series:
            style = {
                "color": series.colour,
                "marker": "o" if series.markers else None,
                "linestyle": "--" if series.dashed else "-",
            }
            if series.raw is not None:
                ax.plot(series.xs, series.raw, linewidth=0.8, alpha=0.3, markersize=2, **style)
            ax.plot(series.xs, series.ys, markersize=3, linewidth=1.4, label=series.label, **style)
        if panel.zero_line:
            ax.axhline(0.0, color="0.7", linewidth=0.8)
        if panel.categories is not None:
            ax.set_xticks(range(len(panel.categories)), panel.categories, rotation=45, ha="right")
        if panel.x_percent:
            ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
        if panel.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
        if panel.x_range is not None:
            ax.set_xlim(*panel.x_range)
        if panel.y_range is not None:
            ax.set_ylim(*panel.y_range)
        if panel.series:
            ax.legend(fontsize=7, frameon=False, title=panel.legend_title, title_fontsize=7)
            if panel.percent and panel.y_range is None:
                ax.set_ylim(0, 1)
        elif panel.empty_text:
            ax.text(0.5, 0.5, panel.empty_text, ha="center", va="center", transform=ax.transAxes, fontsize=_LABEL_SIZE)
        if description.marker is not None:
            ax.axvline(description.marker[0], linestyle=":", color="#555", linewidth=1.2)
    if description.marker is not None:  # labelled once, in the first panel
        axes[0].text(
            description.marker[0],
            0.98,
            description.marker[1] + " ",
            transform=axes[0].get_xaxis_transform(),
            ha="right",
            va="top",
            fontsize=7,
            color="#555",
        )
    if description.title:
        fig.suptitle(description.title, fontsize=_TITLE_SIZE)
    return fig


@render_matplotlib.register
def _(description: IntervalsFigure) -> Figure:
    panels, count = description.panels, len(description.categories)
    fig = Figure(figsize=(len(panels) * max(2.6, 1.2 + 0.7 * count), 3.6))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    positions = np.arange(count, dtype=np.float64)
    for ax, panel in zip(axes, panels):
        for offset, series in zip(description.offsets(), panel.series):
            values, lows, highs = (np.asarray(v, dtype=np.float64) for v in (series.values, series.lows, series.highs))
            ax.errorbar(
                positions + offset,
                values,
                yerr=np.stack([values - lows, highs - values]),
                fmt="o",
                color=series.colour,
                markersize=4,
                capsize=3,
                linewidth=1.2,
                label=series.label,
            )
        ax.set_title(panel.title, fontsize=_TITLE_SIZE)
        ax.set_ylabel(panel.y_label, fontsize=_LABEL_SIZE)
        ax.set_xticks(positions, description.categories, rotation=30, ha="right")
        ax.set_xlim(-0.5, count - 0.5)
        ax.tick_params(labelsize=_TICK_SIZE)
        ax.grid(True, axis="y", linewidth=0.4, alpha=0.4)
        ax.legend(fontsize=7, frameon=False)
    if description.title:
        fig.suptitle(description.title, fontsize=_TITLE_SIZE)
    return fig


def _set_ticks(ax: Axes, x_ticks: Ticks, y_ticks: Ticks) -> None:
    ax.set_xticks(x_ticks.positions, x_ticks.labels)
    ax.set_yticks(y_ticks.positions, y_ticks.labels)


def _colorbar_axes(ax: Axes, mosaic_shape: tuple[int, ...]) -> Axes:
    """A colorbar slot beside a mosaic image exactly as tall as the image (an inset follows its aspect)."""
    height, width = mosaic_shape[:2]
    bar_width = 0.045 * min(1.0, height / width)  # a fraction of the image width: keep wide mosaics' bars thin
    return ax.inset_axes((1.03, 0.0, bar_width, 1.0))


def _mosaic_interpolation(side_inches: float, mosaic: np.ndarray) -> str:
    """Nearest-neighbour while each mosaic pixel spans >= 2 output pixels, else smooth downsampling."""
    output_pixels = side_inches * _DEFAULT_DPI
    return "nearest" if output_pixels >= 2 * max(mosaic.shape[:2]) else "antialiased"
