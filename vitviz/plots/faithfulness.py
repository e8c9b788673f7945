"""Matplotlib figures of the faithfulness comparison: deletion and insertion curves, and the sanity check.

Like `vitviz.plots.paper`, every function takes numpy arrays (never a model) and returns a Figure built
without pyplot; save it with `vitviz.plots.paper.save_figure`. Each method keeps one colour in every figure;
`random` is drawn dashed in grey, as the baseline the others should beat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import matplotlib.colors
import numpy as np
from matplotlib.figure import Figure

from vitviz.faithfulness import METHODS, curve_auc
from vitviz.plots import as_rgb_uint8
from vitviz.plots.paper import overlay_image

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
BASELINE_METHOD = "random"


def method_style(method: str) -> dict[str, object]:
    """Line style of a method: a fixed tab10 colour per known method, `random` dashed grey."""
    if method == BASELINE_METHOD:
        return {"color": "0.45", "linestyle": "--"}
    others = [m for m in METHODS if m != BASELINE_METHOD]
    palette = matplotlib.colormaps["tab10"]
    index = others.index(method) if method in others else len(others) + sum(map(ord, method)) % 3
    return {"color": palette(index % 10), "linestyle": "-"}


def _mean_curve(curves: np.ndarray) -> np.ndarray:
    """[S+1] as is, or [images, S+1] averaged over images."""
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim == 2:
        return curves.mean(axis=0)
    if curves.ndim != 1 or curves.size < 2:
        raise ValueError(f"expected a curve [S+1] or curves [images, S+1], got shape {curves.shape}")
    return curves


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
    if not deletion and not insertion:
        raise ValueError("no curves to draw")
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, curves, name, better in (
        (axes[0], deletion, "Deletion", "lower is better"),
        (axes[1], insertion, "Insertion", "higher is better"),
    ):
        for method, values in curves.items():
            curve = _mean_curve(values)
            xs = np.linspace(0.0, 1.0, curve.size)
            ax.plot(xs, curve, label=f"{method} ({curve_auc(curve):.3f})", linewidth=1.6, **method_style(method))
        ax.set_title(f"{name} ({better})", fontsize=_TITLE_SIZE)
        ax.set_xlabel("fraction of patches " + ("removed" if name == "Deletion" else "restored"), fontsize=_LABEL_SIZE)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=_TICK_SIZE)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=_TICK_SIZE, title="method (AUC)", title_fontsize=_TICK_SIZE, loc="best")
    axes[0].set_ylabel("probability of the target class", fontsize=_LABEL_SIZE)
    if title:
        fig.suptitle(title, fontsize=_TITLE_SIZE)
    return fig


def sanity_figure(randomised: Sequence[str], spearman: Mapping[str, Sequence[float]]) -> Figure:
    """Spearman rank correlation with the original map after each cascading-randomisation stage, per method."""
    if not spearman:
        raise ValueError("no sanity results to draw")
    fig = Figure(figsize=(max(4.5, 0.45 * len(randomised) + 2.5), 3.4), layout="constrained")
    ax = fig.subplots()
    xs = np.arange(len(randomised))
    for method, values in spearman.items():
        ys = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        if ys.size != len(randomised):
            raise ValueError(f"{method}: {ys.size} correlations for {len(randomised)} stages")
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.6, label=method, **method_style(method))
    ax.axhline(0.0, color="0.7", linewidth=0.8)
    ax.set_xticks(xs, list(randomised), rotation=45, ha="right", fontsize=_TICK_SIZE)
    ax.set_xlabel("randomised up to (cumulative, from the head down)", fontsize=_LABEL_SIZE)
    ax.set_ylabel("Spearman with the original map", fontsize=_LABEL_SIZE)
    ax.set_ylim(-1.05, 1.05)
    ax.tick_params(axis="y", labelsize=_TICK_SIZE)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=_TICK_SIZE, loc="best")
    ax.set_title("Sanity check: cascading randomisation", fontsize=_TITLE_SIZE)
    return fig


def method_colour(method: str) -> str:
    """A method's line colour (as `method_style` draws it) as "#rrggbb", for figures outside matplotlib."""
    return matplotlib.colors.to_hex(method_style(method)["color"])  # type: ignore[arg-type]


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
