"""Figures of a comparison of two models: the linear-CKA heat map (matplotlib for export, plotly for the studio),
the mean-attention-distance shift, the mean-map differences and the two models' AUCs with their intervals (described
once in `vitviz.plots.figures`, drawn by both renderers). Every function takes numpy arrays (never a model); the
matplotlib ones build a `Figure` without pyplot (thread-safe, Agg)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import plotly.graph_objects as go
from matplotlib.figure import Figure

from vitviz.plots.figures import describe_auc_intervals
from vitviz.plots.interactive import render_plotly
from vitviz.plots.paper import render_matplotlib

_TITLE_SIZE = 11
_LABEL_SIZE = 10
_TICK_SIZE = 8


def _layer_ticks(count: int) -> list[int]:
    """At most about 12 ticks, 1-based."""
    step = max(1, int(np.ceil(count / 12)))
    return list(range(1, count + 1, step))


def cka_figure(matrix: np.ndarray, *, name_a: str = "A", name_b: str = "B") -> Figure:
    """Linear CKA [L_A, L_B] as a heat map on 0..1: rows model A's blocks (top: the first), columns model B's."""
    values = np.asarray(matrix, dtype=np.float64)
    rows, cols = values.shape
    fig = Figure(figsize=(1.6 + 0.32 * max(cols, 4), 1.0 + 0.32 * max(rows, 4)))
    ax = fig.add_subplot()
    image = ax.imshow(
        values, cmap="magma", vmin=0.0, vmax=1.0, extent=(0.5, cols + 0.5, rows + 0.5, 0.5), interpolation="nearest"
    )
    ax.set_xticks(_layer_ticks(cols))
    ax.set_yticks(_layer_ticks(rows))
    ax.tick_params(labelsize=_TICK_SIZE)
    ax.set_xlabel(f"B block ({_short(name_b)})", fontsize=_LABEL_SIZE)
    ax.set_ylabel(f"A block ({_short(name_a)})", fontsize=_LABEL_SIZE)
    ax.set_title("Linear CKA", fontsize=_TITLE_SIZE)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.ax.tick_params(labelsize=_TICK_SIZE)
    fig.tight_layout()
    return fig


def cka_heatmap(matrix: np.ndarray, *, title: str | None = None) -> go.Figure:
    """The plotly version of `cka_figure`: hover gives both blocks and the value."""
    values = np.asarray(matrix, dtype=np.float64)
    rows, cols = values.shape
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=np.arange(1, cols + 1),
            y=np.arange(1, rows + 1),
            zmin=0.0,
            zmax=1.0,
            colorscale="Magma",
            colorbar={"title": {"text": "CKA", "side": "right"}},
            hovertemplate="A block %{y}, B block %{x}<br>CKA %{z:.3f}<extra></extra>",
        )
    )
    # Blocks are whole numbers: a tick every block (every few on deep models), never at the half-way edges.
    fig.update_yaxes(
        title="Model A block", range=[rows + 0.5, 0.5], dtick=-(-rows // 16), showgrid=False, zeroline=False
    )
    fig.update_xaxes(
        title="Model B block", range=[0.5, cols + 0.5], dtick=-(-cols // 16), showgrid=False, zeroline=False
    )
    fig.update_layout(title=title, font={"size": 12}, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def distance_shift_figure(shift: np.ndarray) -> Figure:
    """B − A mean attention distance [L, H] in pixels: one marker per head, the mean over heads as a line."""
    values = np.asarray(shift, dtype=np.float64)
    layers = np.arange(1, values.shape[0] + 1)
    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.add_subplot()
    for head in range(values.shape[1]):
        ax.scatter(layers, values[:, head], s=12, color="tab:blue", alpha=0.6)
    ax.plot(layers, values.mean(axis=1), color="black", linewidth=1.2, label="mean over heads")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("Layer", fontsize=_LABEL_SIZE)
    ax.set_ylabel("B − A distance (px)", fontsize=_LABEL_SIZE)
    ax.set_title("Mean attention distance shift", fontsize=_TITLE_SIZE)
    ax.tick_params(labelsize=_TICK_SIZE)
    ax.legend(fontsize=_TICK_SIZE, frameon=False)
    fig.tight_layout()
    return fig


def difference_maps_figure(maps: Mapping[str, np.ndarray], limit: float) -> Figure:
    """Difference maps side by side (title -> [gh, gw]) on one diverging scale −limit..limit."""
    fig = Figure(figsize=(3.2 * len(maps) + 0.8, 3.2))
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    image = None
    for ax, (title, values) in zip(axes, maps.items()):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(title, fontsize=_TITLE_SIZE)
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), fraction=0.046, pad=0.04)
        bar.ax.tick_params(labelsize=_TICK_SIZE)
    return fig


def auc_intervals_figure(aucs: Mapping[str, Mapping[str, Mapping[str, tuple[float, float, float]]]]) -> Figure:
    """Each model's deletion and insertion AUC per method with its interval (`figures.describe_auc_intervals`:
    model -> curve -> method -> (AUC, low, high))."""
    return render_matplotlib(describe_auc_intervals(aucs, title="Deletion and insertion AUCs, 95% intervals"))


def auc_intervals_chart(aucs: Mapping[str, Mapping[str, Mapping[str, tuple[float, float, float]]]]) -> go.Figure:
    """The plotly version of `auc_intervals_figure`: hover gives the model, the method, the AUC and its interval."""
    return render_plotly(describe_auc_intervals(aucs))


def _short(text: str, limit: int = 28) -> str:
    text = text.rsplit("/", 1)[-1]
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]
