"""Matplotlib figures of the faithfulness comparison: deletion and insertion curves, and the sanity check.

Like `vitviz.plots.paper`, every function takes numpy arrays (never a model) and returns a Figure built
without pyplot; save it with `vitviz.plots.paper.save_figure`. Each method keeps one colour in every figure;
`random` is drawn dashed in grey, as the baseline the others should beat. The curves are described once in
`vitviz.plots.figures` and drawn by `paper.render_matplotlib` here, by `interactive.render_plotly` in the app.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from vitviz.plots import as_rgb_uint8
from vitviz.plots.figures import (
    BASELINE_METHOD,
    describe_faithfulness_curves,
    describe_sanity_curve,
    method_colour,
)
from vitviz.plots.paper import overlay_image, render_matplotlib

__all__ = [
    "curves_figure",
    "display_map",
    "map_picture",
    "maps_figure",
    "method_colour",
    "method_style",
    "sanity_figure",
    "sanity_maps_figure",
]

_TITLE_SIZE = 11
_LABEL_SIZE = 10
_TICK_SIZE = 8


def method_style(method: str) -> dict[str, object]:
    """Line style of a method: a fixed tab10 colour per known method, `random` dashed grey."""
    return {"color": method_colour(method), "linestyle": "--" if method == BASELINE_METHOD else "-"}


def curves_figure(
    deletion: Mapping[str, np.ndarray],
    insertion: Mapping[str, np.ndarray],
    *,
    title: str | None = None,
) -> Figure:
    """Deletion (left) and insertion (right) curves of several methods, AUC in the legend.

    Args:
        deletion, insertion: {method: curve [S+1] or curves [images, S+1]}; several images are averaged (the AUC
            of the mean curve is the mean of the images' AUCs). Point i is drawn at i/S, the share of steps.
    """
    return render_matplotlib(describe_faithfulness_curves(deletion, insertion, title=title))


def sanity_figure(randomised: Sequence[str], spearman: Mapping[str, Sequence[float]]) -> Figure:
    """Spearman rank correlation with the original map after each cascading-randomisation stage, per method."""
    return render_matplotlib(describe_sanity_curve(randomised, spearman))


def display_map(relevance: np.ndarray) -> np.ndarray:
    """A map ready to be divided by its maximum for display: as it is when non-negative, else shifted so its
    minimum is 0 (occlusion's logit drops can be negative). The order of the values, all the curves read, is kept."""
    values = np.asarray(relevance, dtype=np.float64)
    low = float(np.min(values)) if values.size else 0.0
    return values - low if low < 0 else values


def map_picture(
    picture: np.ndarray | None,
    relevance: np.ndarray,
    *,
    cmap: str = "viridis",
    alpha: float = 0.6,
    side: int = 256,
) -> np.ndarray:
    """One flat block per token, coloured by the map divided by its max, over the picture (or alone when
    `picture` is None): uint8 [H, W, 3], enlarged by whole pixels to at least `side` so browsers keep it sharp.

    Blocks, not bilinear smoothing, because the curves delete and insert whole patches.
    """
    values = display_map(relevance)
    gh, gw = values.shape
    if picture is None:
        picture = np.zeros((gh, gw, 3), dtype=np.uint8)
        alpha = 1.0
    rgb = as_rgb_uint8(picture)
    height, width = rgb.shape[:2]
    factor = max(1, -(-side // max(height, width)))
    rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    height, width = rgb.shape[:2]
    rows = np.minimum((np.arange(height) * gh) // height, gh - 1)
    cols = np.minimum((np.arange(width) * gw) // width, gw - 1)
    blocks = values[rows[:, None], cols[None, :]]  # at full size, so the overlay's resize leaves it as it is
    return overlay_image(rgb, blocks, cmap=cmap, alpha=alpha)


def maps_figure(
    pictures: Sequence[np.ndarray],
    maps: Mapping[str, np.ndarray],
    names: Sequence[str],
    *,
    aucs: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    cmap: str = "viridis",
    alpha: float = 0.6,
) -> Figure:
    """Each method's map over each image: one row per image (its picture first), one column per method.

    Args:
        pictures: uint8 [H, W, 3] per image, as the model sees it.
        maps: {method: [images, gh, gw]} raw maps; each is drawn divided by its own max (see `display_map`).
        aucs: {method: [(deletion AUC, insertion AUC) per image]}, written under each map.
    """
    if not maps or not pictures:
        raise ValueError("no maps to draw")
    methods = list(maps)
    rows, cols = len(pictures), len(methods) + 1
    fig = Figure(figsize=(1.7 * cols + 0.4, 1.9 * rows + 0.5), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for row, picture in enumerate(pictures):
        axes[row, 0].imshow(as_rgb_uint8(picture), interpolation="nearest")
        axes[row, 0].set_ylabel(_short(names[row]), fontsize=_TICK_SIZE)
        for col, method in enumerate(methods, start=1):
            values = np.asarray(maps[method])[row]
            axes[row, col].imshow(map_picture(picture, values, cmap=cmap, alpha=alpha), interpolation="nearest")
            if aucs is not None and method in aucs:
                deletion, insertion = aucs[method][row]
                axes[row, col].set_xlabel(f"del {deletion:.3f} · ins {insertion:.3f}", fontsize=_TICK_SIZE)
    axes[0, 0].set_title("input", fontsize=_LABEL_SIZE)
    for col, method in enumerate(methods, start=1):
        axes[0, col].set_title(method, fontsize=_LABEL_SIZE, color=method_colour(method))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def sanity_maps_figure(
    originals: Mapping[str, np.ndarray],
    randomised_maps: Mapping[str, np.ndarray],
    randomised: Sequence[str],
    *,
    spearman: Mapping[str, Sequence[float]] | None = None,
    cmap: str = "viridis",
    title: str | None = None,
) -> Figure:
    """The sanity strip of one image: one row per method, its original map then its map after each stage.

    Args:
        originals: {method: [gh, gw]}; randomised_maps: {method: [stages, gh, gw]}, stages in `randomised` order.
        spearman: {method: [stages]} Spearman of each stage's map with the original, written under it.
    """
    if not originals:
        raise ValueError("no sanity maps to draw")
    methods = list(originals)
    rows, cols = len(methods), len(randomised) + 1
    fig = Figure(figsize=(1.35 * cols + 0.6, 1.55 * rows + 0.6), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for row, method in enumerate(methods):
        stages = np.asarray(randomised_maps[method])
        if stages.shape[0] != len(randomised):
            raise ValueError(f"{method}: {stages.shape[0]} maps for {len(randomised)} stages")
        axes[row, 0].imshow(map_picture(None, originals[method], cmap=cmap, side=64), interpolation="nearest")
        axes[row, 0].set_ylabel(method, fontsize=_LABEL_SIZE, color=method_colour(method))
        for col in range(len(randomised)):
            ax = axes[row, col + 1]
            ax.imshow(map_picture(None, stages[col], cmap=cmap, side=64), interpolation="nearest")
            if spearman is not None and method in spearman:
                value = spearman[method][col]
                text = "n/a" if value is None or not np.isfinite(value) else f"{value:.2f}"
                ax.set_xlabel(f"ρ = {text}", fontsize=_TICK_SIZE)
    axes[0, 0].set_title("original", fontsize=_TICK_SIZE)
    for col, stage in enumerate(randomised, start=1):
        axes[0, col].set_title(stage, fontsize=_TICK_SIZE)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        title or "Maps after cascading randomisation (left to right: more of the model randomised)",
        fontsize=_LABEL_SIZE,
    )
    return fig


def _short(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]
