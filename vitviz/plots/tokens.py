"""Matplotlib figures of what tokens carry: norms per layer and token, attention to prefix tokens, outlier patches,
patch features as RGB, head maps and the logit lens. Every function takes numpy arrays (never a model) and
returns a `matplotlib.figure.Figure` built without pyplot (thread-safe, Agg)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import matplotlib.ticker
import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from vitviz.plots import as_rgb_uint8, minmax_scale

logger = logging.getLogger(__name__)

_TITLE_SIZE = 11
_LABEL_SIZE = 10
_TICK_SIZE = 8


def features_rgb(projections: np.ndarray, *, foreground: bool = False, threshold: float = 0.5) -> np.ndarray:
    """PCA projections [B, gh, gw, 3] as RGB in [0, 1]: each component min-max scaled over all images (DINOv2's
    figures). With `foreground`, patches whose scaled first component is at most `threshold` are black."""
    values = np.asarray(projections, dtype=np.float64)
    if values.shape[-1] < 3:  # a model narrower than 3 features: pad with zeros
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 3 - values.shape[-1]))], axis=-1)
    rgb = np.stack([minmax_scale(values[..., c]) for c in range(3)], axis=-1)
    if foreground:
        rgb = np.where((rgb[..., :1] > threshold), rgb, 0.0)
    return rgb


def _upsample_nearest(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    gh, gw = values.shape[:2]
    rows = np.minimum((np.arange(size[0]) * gh) // size[0], gh - 1)
    cols = np.minimum((np.arange(size[1]) * gw) // size[1], gw - 1)
    return values[rows[:, None], cols[None, :]]


def norm_heatmap_figure(norms: np.ndarray, token_names: Sequence[str], num_prefix_tokens: int) -> Figure:
    """Layers x tokens heatmap of the mean token norm; prefix tokens labelled, a line where the patches start."""
    norms = np.asarray(norms, dtype=np.float64)
    layers, tokens = norms.shape
    fig = Figure(figsize=(12.0, 1.8 + 0.22 * layers), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(norms, aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="L2 norm (mean over images)", pad=0.01)
    patch_step = max(1, (tokens - num_prefix_tokens) // 8)
    first_patch = num_prefix_tokens + (patch_step if num_prefix_tokens else 0)  # keep clear of the prefix labels
    ticks = list(range(num_prefix_tokens)) + list(range(first_patch, tokens, patch_step))
    ax.set_xticks(ticks, [token_names[t] for t in ticks], rotation=90, fontsize=_TICK_SIZE)
    for label in ax.get_xticklabels()[:num_prefix_tokens]:
        label.set_fontweight("bold")
    if num_prefix_tokens:
        ax.axvline(num_prefix_tokens - 0.5, color="white", linewidth=1.5)
    ax.set_yticks(range(layers), [str(layer + 1) for layer in range(layers)], fontsize=_TICK_SIZE)
    ax.set_xlabel("token (model order; prefix tokens in bold)", fontsize=_LABEL_SIZE)
    ax.set_ylabel("layer (block output)", fontsize=_LABEL_SIZE)
    ax.set_title("Token norms in the residual stream", fontsize=_TITLE_SIZE)
    return fig


def prefix_attention_figure(prefix_attention: np.ndarray, num_prefix_tokens: int) -> Figure:
    """Per layer, the share of attention patch queries give to the prefix tokens: every head and their mean."""
    values = np.asarray(prefix_attention, dtype=np.float64)
    layers, heads = values.shape
    fig = Figure(figsize=(5.5, 3.4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(1, layers + 1)
    for head in range(heads):
        ax.plot(x, values[:, head], color="0.7", linewidth=0.8, marker=".", label="a head" if head == 0 else None)
    ax.plot(x, values.mean(axis=1), color="C3", linewidth=2.2, marker="o", label="mean over heads")
    ax.set_ylim(0, max(1e-3, float(values.max()) * 1.1) if values.size else 1)
    ax.set_xticks(x)
    ax.set_xlabel("layer", fontsize=_LABEL_SIZE)
    ax.set_ylabel("attention to prefix tokens", fontsize=_LABEL_SIZE)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    title = "Attention sink: patch queries → prefix tokens"
    if not num_prefix_tokens:
        title = "No prefix tokens: nothing to attend to (0)"
    ax.set_title(title, fontsize=_TITLE_SIZE)
    ax.legend(fontsize=_TICK_SIZE, frameon=False)
    return fig


def outliers_figure(
    picture: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    ratios: np.ndarray,
    grid: tuple[int, int],
    *,
    title: str = "High-norm patch tokens",
) -> Figure:
    """The image with each outlier patch outlined (line width grows with its norm ratio)."""
    rgb = as_rgb_uint8(picture)
    height, width = rgb.shape[:2]
    dy, dx = height / grid[0], width / grid[1]
    fig = Figure(figsize=(4.0, 4.0 * height / width + 0.4), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(rgb)
    for row, col, ratio in zip(rows, cols, ratios):
        ax.add_patch(
            Rectangle(
                (col * dx - 0.5, row * dy - 0.5),
                dx,
                dy,
                fill=False,
                edgecolor="#ff2a6d",
                linewidth=1.0 + min(3.0, float(ratio) - 1.0),
            )
        )
    ax.set_axis_off()
    ax.set_title(f"{title} ({len(rows)})", fontsize=_TITLE_SIZE)
    return fig


def features_figure(picture: np.ndarray, rgb: np.ndarray, explained_variance_ratio: np.ndarray) -> Figure:
    """The image beside its patch features' first three principal components as RGB."""
    image = as_rgb_uint8(picture)
    fig = Figure(figsize=(7.0, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(image)
    left.set_title("Input", fontsize=_TITLE_SIZE)
    right.imshow(_upsample_nearest(np.clip(rgb, 0, 1), image.shape[:2]))
    ratio = ", ".join(f"{100 * r:.1f}%" for r in np.asarray(explained_variance_ratio)[:3])
    right.set_title(f"PCA of patch features (RGB = PC1-3: {ratio})", fontsize=_LABEL_SIZE)
    for ax in (left, right):
        ax.set_axis_off()
    return fig


def head_maps_figure(attention: np.ndarray, masks: np.ndarray, *, query: str, mass_share: float) -> Figure:
    """Each head's last-layer attention over the patches, with its mass-threshold mask outlined."""
    maps = np.asarray(attention, dtype=np.float64)
    heads = maps.shape[0]
    columns = min(heads, 6)
    rows = math.ceil(heads / columns)
    fig = Figure(figsize=(1.9 * columns + 1.2, 2.0 * rows + 0.5), layout="constrained")
    grid = np.atleast_1d(fig.subplots(rows, columns, squeeze=False))
    axes = grid.reshape(-1)
    image = None
    for head, ax in enumerate(axes):
        ax.set_axis_off()
        if head >= heads:
            continue
        # each head on its own scale, 0 to its peak, so a diffuse head still shows where it looks
        peak = max(float(maps[head].max()), 1e-12)
        image = ax.imshow(maps[head] / peak, cmap="viridis", norm=Normalize(0.0, 1.0))
        _outline_patches(ax, np.asarray(masks[head], dtype=bool))
        ax.set_title(f"head {head + 1}", fontsize=_TICK_SIZE)
    if image is not None:
        fig.colorbar(image, ax=grid, shrink=0.8, label="attention ÷ the head's peak")
    fig.suptitle(
        f"Last layer, {query} attention; outline: {100 * mass_share:.0f}% of each head's mass", fontsize=_LABEL_SIZE
    )
    return fig


def _outline_patches(ax: object, mask: np.ndarray) -> None:
    """Draw the outline of a patch mask along patch edges (imshow coordinates: patch (r, c) spans r±0.5, c±0.5)."""
    padded = np.pad(mask, 1)
    segments = []
    for r, c in zip(*np.nonzero(mask)):
        pr, pc = r + 1, c + 1
        if not padded[pr - 1, pc]:
            segments.append([(c - 0.5, r - 0.5), (c + 0.5, r - 0.5)])
        if not padded[pr + 1, pc]:
            segments.append([(c - 0.5, r + 0.5), (c + 0.5, r + 0.5)])
        if not padded[pr, pc - 1]:
            segments.append([(c - 0.5, r - 0.5), (c - 0.5, r + 0.5)])
        if not padded[pr, pc + 1]:
            segments.append([(c + 0.5, r - 0.5), (c + 0.5, r + 0.5)])
    ax.add_collection(LineCollection(segments, colors="white", linewidths=1.4))  # type: ignore[attr-defined]


def logit_lens_figure(probabilities: np.ndarray, class_name: str) -> Figure:
    """The target class's probability per patch after every layer, on one 0..1 scale."""
    maps = np.asarray(probabilities, dtype=np.float64)
    layers = maps.shape[0]
    columns = min(layers, 6)
    rows = math.ceil(layers / columns)
    fig = Figure(figsize=(1.9 * columns + 1.2, 2.0 * rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False))
    image = None
    for layer, ax in enumerate(axes.reshape(-1)):
        ax.set_axis_off()
        if layer >= layers:
            continue
        image = ax.imshow(maps[layer], cmap="viridis", norm=Normalize(0.0, 1.0))
        ax.set_title(f"layer {layer + 1}", fontsize=_TICK_SIZE)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=f"p({class_name})")
    fig.suptitle(f"Logit lens: each layer's patch tokens through the final norm and head → {class_name}", fontsize=10)
    return fig
