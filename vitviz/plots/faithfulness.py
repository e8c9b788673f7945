"""Matplotlib figures of the faithfulness comparison: deletion and insertion curves, and the sanity check.

Like `vitviz.plots.paper`, every function takes numpy arrays (never a model) and returns a Figure built
without pyplot; save it with `vitviz.plots.paper.save_figure`. Each method keeps one colour in every figure;
`random` is drawn dashed in grey, as the baseline the others should beat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from vitviz.faithfulness import METHODS, curve_auc

__all__ = ["curves_figure", "method_style", "sanity_figure"]

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
