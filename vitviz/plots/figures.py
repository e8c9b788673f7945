"""What each figure shows, independent of the library that draws it.

Every figure that both the app (plotly, `vitviz.plots.interactive`) and the exports (matplotlib,
`vitviz.plots.paper`) draw is described here ONCE: a small dataclass per figure kind holds the arrays to
draw and every convention (title, axis labels, tick labels, colour map, colour range, overlay opacity,
panels), and one `describe_*` function per figure builds it from the analysis result. The two renderers,
`interactive.render_plotly` and `paper.render_matplotlib`, draw any description of a kind and decide
nothing about its content, so the two backends cannot drift apart.

Colour maps are named as matplotlib names them (lowercase: "viridis", "inferno", "jet", ...); plotly knows
the same names. Maps are drawn at token resolution (one flat block per token) unless a description asks
for smoothing. This module needs numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vitviz.plots import (
    as_rgb_uint8,
    curve_label,
    curve_series,
    is_accuracy,
    minmax_scale,
    scale_by_max,
    tile_centres,
    tile_mosaic,
)

__all__ = [
    "BASELINE_COLOUR",
    "BASELINE_METHOD",
    "DEFAULT_COLORMAP",
    "GRID_COLORMAP",
    "MARK_COLOUR",
    "SERIES_COLOURS",
    "CurvePanel",
    "CurveSeries",
    "CurvesFigure",
    "DistanceFigure",
    "FiltersFigure",
    "IntervalPanel",
    "IntervalSeries",
    "IntervalsFigure",
    "MosaicFigure",
    "OverlayFigure",
    "Ticks",
    "describe_attention_grid",
    "describe_auc_intervals",
    "describe_distance",
    "describe_faithfulness_curves",
    "describe_filters",
    "describe_position_similarity",
    "describe_rollout",
    "describe_sanity_curve",
    "describe_training_curves",
    "method_colour",
    "smoothed",
]

DEFAULT_COLORMAP = "viridis"  # maps and overlays: perceptually uniform, the app's default
GRID_COLORMAP = "inferno"  # attention of one query: mostly near 0, a dark background shows the few peaks
MARK_COLOUR = "#00e5ff"  # the query patch's outline, visible on every colour map above
# One colour per curve or head, in order (matplotlib's tab10, which plotly also draws as hex).
SERIES_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


@dataclass(frozen=True)
class Ticks:
    """Tick marks of one axis: data coordinates and the text written at each."""

    positions: tuple[float, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class MosaicFigure:
    """A grid of maps [rows, cols, h, w] drawn as ONE image (`tile_mosaic`, 1-cell gaps) on one colour scale.

    Hover (where the backend has it) names the tile with `hover_tile` (a format string with {row} and {col},
    1-based, rows counted from `row_offset` + 1), the cell as "key patch (row, col)" and the value as
    `hover_value` followed by the value in `value_format`.
    """

    tiles: np.ndarray
    title: str | None
    x_label: str
    y_label: str
    x_ticks: Ticks
    y_ticks: Ticks
    colormap: str
    vmin: float
    vmax: float
    colorbar_label: str
    hover_tile: str
    hover_value: str
    value_format: str
    row_offset: int = 0
    marks: tuple[tuple[float, float], ...] = ()  # (x, y) mosaic coordinates outlined in `MARK_COLOUR`

    @property
    def mosaic(self) -> np.ndarray:
        return tile_mosaic(self.tiles, gap=1)


@dataclass(frozen=True)
class OverlayFigure:
    """A patch map laid over a picture, stretched so cell (i, j) covers its patch's pixels.

    `values` are what the colour map shows on vmin..vmax, `raw` the map as computed (for hover). With an
    `input_title` the plain picture is drawn as a panel of its own, to the left, under that title.
    """

    image: np.ndarray
    values: np.ndarray
    raw: np.ndarray
    title: str | None
    colormap: str
    vmin: float
    vmax: float
    opacity: float
    smooth: bool
    colorbar_label: str
    input_title: str | None = None


@dataclass(frozen=True)
class DistanceFigure:
    """Mean attention distance per head (one point series per head) against 1-based depth, and the mean line."""

    pixels: np.ndarray
    std: np.ndarray | None
    show_mean: bool
    title: str | None
    x_label: str
    y_label: str
    x_ticks: Ticks
    y_range: tuple[float, float]
    head_labels: tuple[str, ...]
    head_colours: tuple[str, ...]
    mean_label: str = "Mean"


@dataclass(frozen=True)
class FiltersFigure:
    """Filter pictures in a grid of `ncols` columns, each labelled above; [k, P, P, 3] colour or [k, P, P] grey."""

    pictures: np.ndarray
    labels: tuple[str, ...]
    ncols: int
    title: str

    @property
    def grey(self) -> bool:
        return self.pictures.ndim == 3


@dataclass(frozen=True)
class CurveSeries:
    label: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    colour: str
    markers: bool
    raw: tuple[float, ...] | None = None  # the unsmoothed values, drawn faintly under `ys`
    dashed: bool = False


@dataclass(frozen=True)
class CurvePanel:
    title: str
    x_label: str
    y_label: str
    series: tuple[CurveSeries, ...]
    percent: bool  # y values are fractions, written as percent on the axis
    x_percent: bool = False  # the same for x
    x_range: tuple[float, float] | None = None
    y_range: tuple[float, float] | None = None
    legend_title: str | None = None
    categories: tuple[str, ...] | None = None  # x values are indices into these names
    zero_line: bool = False  # a faint horizontal line at y = 0
    empty_text: str = "nothing logged"  # written in a panel without series


@dataclass(frozen=True)
class CurvesFigure:
    """Line panels side by side, on one y scale when `share_y`; `marker`, an x value and its label, is a dotted
    vertical line across every panel (a checkpoint's step on its run's curves)."""

    panels: tuple[CurvePanel, ...]
    title: str | None
    share_y: bool = False
    marker: tuple[float, str] | None = None


@dataclass(frozen=True)
class IntervalSeries:
    label: str
    values: tuple[float, ...]  # one per category; NaN where the series has none
    lows: tuple[float, ...]
    highs: tuple[float, ...]
    colour: str


@dataclass(frozen=True)
class IntervalPanel:
    title: str
    y_label: str
    series: tuple[IntervalSeries, ...]


@dataclass(frozen=True)
class IntervalsFigure:
    """Panels side by side of one value per category and series, its interval an error bar; the series of a
    category stand side by side around its tick (`offsets`)."""

    categories: tuple[str, ...]
    panels: tuple[IntervalPanel, ...]
    title: str | None

    def offsets(self) -> tuple[float, ...]:
        """Each series' distance from its category's tick, in categories."""
        count = max((len(panel.series) for panel in self.panels), default=0)
        return tuple(0.18 * (k - (count - 1) / 2) for k in range(count))


def _tile_ticks(count: int, tile_len: int, offset: int = 0) -> Ticks:
    """1-based labels at tile centres, thinned out so large grids stay legible."""
    step = 1 if count <= 16 else math.ceil(count / 12)
    picked = np.arange(0, count, step)
    positions = tile_centres(count, tile_len)[picked]
    return Ticks(tuple(float(p) for p in positions), tuple(str(i + 1 + offset) for i in picked))


def describe_position_similarity(
    similarity: np.ndarray,
    *,
    vmin: float = -1.0,
    vmax: float = 1.0,
    colormap: str = DEFAULT_COLORMAP,
    title: str | None = "Position embedding similarity",
) -> MosaicFigure:
    """Cosine similarity of position embeddings [gh, gw, gh, gw]: tile (r, c) = similarity[r, c]."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 4:
        raise ValueError(f"expected similarity [gh, gw, gh, gw], got shape {similarity.shape}")
    gh, gw = similarity.shape[:2]
    return MosaicFigure(
        tiles=similarity,
        title=title,
        x_label="Input patch column",
        y_label="Input patch row",
        x_ticks=_tile_ticks(gw, gw),
        y_ticks=_tile_ticks(gh, gh),
        colormap=colormap,
        vmin=float(vmin),
        vmax=float(vmax),
        colorbar_label="Cosine similarity",
        hover_tile="query patch ({row}, {col})",
        hover_value="similarity ",
        value_format=".3f",
    )


def describe_attention_grid(
    attention: np.ndarray,
    *,
    query: tuple[int, int] | None = None,
    per_tile: bool = False,
    vmin: float = 0.0,
    vmax: float | None = None,
    colormap: str = GRID_COLORMAP,
    title: str | None = None,
    first_layer: int = 0,
) -> MosaicFigure:
    """Attention of one query over the patches [L, H, gh, gw], layers (rows) x heads (columns).

    Args:
        query: 0-based (row, col) of the query patch, outlined in every tile; it also names the default title.
        per_tile: divide each tile by its own max (shape, not strength); else one scale 0..vmax for all
            (default: the overall max).
        first_layer: 0-based index of the first layer in `attention` (labels when showing a slice of layers).
    """
    attention = np.asarray(attention, dtype=np.float64)
    if attention.ndim != 4:
        raise ValueError(f"expected attention [L, H, gh, gw], got shape {attention.shape}")
    depth, heads, gh, gw = attention.shape
    values = np.stack([[scale_by_max(tile) for tile in layer] for layer in attention]) if per_tile else attention
    top = 1.0 if per_tile else (vmax if vmax is not None else max(float(np.nanmax(values)), 1e-12))
    marks: tuple[tuple[float, float], ...] = ()
    if query is not None:
        layer, head = np.meshgrid(np.arange(depth), np.arange(heads), indexing="ij")
        xs = (head * (gw + 1) + query[1]).ravel()
        ys = (layer * (gh + 1) + query[0]).ravel()
        marks = tuple((float(x), float(y)) for x, y in zip(xs, ys))
    if title is None:
        where = "one query patch" if query is None else f"query patch ({query[0] + 1}, {query[1] + 1})"
        title = f"Attention of {where}"
    return MosaicFigure(
        tiles=values,
        title=title,
        x_label="Head",
        y_label="Layer",
        x_ticks=_tile_ticks(heads, gw),
        y_ticks=_tile_ticks(depth, gh, first_layer),
        colormap=colormap,
        vmin=float(vmin),
        vmax=float(top),
        colorbar_label="Attention (÷ tile max)" if per_tile else "Attention probability",
        hover_tile="layer {row}, head {col}",
        hover_value="",
        value_format=".4f",
        row_offset=first_layer,
        marks=marks,
    )


def describe_rollout(
    image: np.ndarray,
    relevance: np.ndarray,
    *,
    title: str | None = "Attention rollout",
    colormap: str = DEFAULT_COLORMAP,
    opacity: float = 0.5,
    vmin: float = 0.0,
    vmax: float | None = None,
    absolute: bool = False,
    smooth: bool = False,
    input_title: str | None = None,
) -> OverlayFigure:
    """A relevance map [gh, gw] over a picture uint8 [H, W, 3] (any aspect ratio), one block per token.

    By default the map is divided by its max and drawn on vmin..1 (each map fills the colour scale; `vmax`
    overrides the top). With `absolute` the raw values are drawn on vmin..vmax (default: the map's max), so
    several figures can share one scale.
    """
    picture = as_rgb_uint8(image)
    relevance = np.asarray(relevance, dtype=np.float64)
    if relevance.ndim != 2:
        raise ValueError(f"expected a relevance map [gh, gw], got shape {relevance.shape}")
    if absolute:
        shown = relevance
        top = vmax if vmax is not None else max(float(np.nanmax(relevance)), 1e-12)
        label = "Relevance"
    else:
        shown, top, label = scale_by_max(relevance), (1.0 if vmax is None else vmax), "Relevance (÷ max)"
    return OverlayFigure(
        image=picture,
        values=shown,
        raw=relevance,
        title=title,
        colormap=colormap,
        vmin=float(vmin),
        vmax=float(top),
        opacity=float(opacity),
        smooth=smooth,
        colorbar_label=label,
        input_title=input_title,
    )


def describe_distance(
    pixels: np.ndarray,
    *,
    std: np.ndarray | None = None,
    show_mean: bool = True,
    ymax: float | None = None,
    title: str | None = None,
) -> DistanceFigure:
    """Mean attention distance [L, H] in pixels against depth, optional spread [L, H] over images as error bars."""
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.ndim != 2:
        raise ValueError(f"expected pixels [L, H], got shape {pixels.shape}")
    depth, heads = pixels.shape
    layers = np.arange(1, depth + 1)
    picked = layers if depth <= 16 else layers[:: math.ceil(depth / 12)]
    top = ymax if ymax is not None else max(1.0, float(np.nanmax(pixels)) * 1.08)
    return DistanceFigure(
        pixels=pixels,
        std=None if std is None else np.asarray(std, dtype=np.float64),
        show_mean=show_mean,
        title=title,
        x_label="Network depth (layer)",
        y_label="Mean attention distance (pixels)",
        x_ticks=Ticks(tuple(float(p) for p in picked), tuple(str(p) for p in picked)),
        y_range=(0.0, float(top)),
        head_labels=tuple(f"Head {head + 1}" for head in range(heads)),
        head_colours=_head_colours(heads),
    )


def _head_colours(heads: int) -> tuple[str, ...]:
    """tab10 up to 10 heads, then evenly spaced hues (golden-angle steps keep neighbours apart)."""
    if heads <= len(SERIES_COLOURS):
        return SERIES_COLOURS[:heads]
    import colorsys

    colours = []
    for head in range(heads):
        red, green, blue = colorsys.hls_to_rgb((head * 0.381966) % 1.0, 0.45 + 0.15 * (head % 2), 0.75)
        colours.append(f"#{round(255 * red):02x}{round(255 * green):02x}{round(255 * blue):02x}")
    return tuple(colours)


def describe_filters(
    components: np.ndarray,
    explained_variance_ratio: np.ndarray,
    *,
    ncols: int = 7,
    max_components: int = 28,
    title: str | None = None,
) -> FiltersFigure:
    """Principal components [k, C, P, P] of the patch-embedding filters, each min-max scaled on its own.

    C == 3 is drawn in colour, anything else in grey (mean over channels); each is labelled with its share
    of the explained variance.
    """
    components = np.asarray(components, dtype=np.float64)[:max_components]
    if components.ndim != 4:
        raise ValueError(f"expected components [k, C, P, P], got shape {components.shape}")
    ratios = np.asarray(explained_variance_ratio, dtype=np.float64)[: len(components)]
    count, channels = components.shape[:2]
    scaled = minmax_scale(components, over=(1, 2, 3))
    pictures = scaled.transpose(0, 2, 3, 1) if channels == 3 else scaled.mean(axis=1)
    if title is None:
        kind = "RGB" if channels == 3 else ("Grey" if channels == 1 else f"{channels}-channel (mean)")
        title = f"{kind} embedding filters (first {count} principal components)"
    return FiltersFigure(
        pictures=pictures,
        labels=tuple(f"{index + 1}: {100 * ratios[index]:.1f}%" for index in range(count)),
        ncols=max(1, min(ncols, count)),
        title=title,
    )


def smoothed(values: Sequence[float], weight: float) -> np.ndarray:
    """Exponential moving average, debiased as TensorBoard's: s_t = w s_(t-1) + (1 - w) v_t, divided by 1 - w^t."""
    values = np.asarray(values, dtype=np.float64)
    if weight <= 0.0 or values.size == 0:
        return values
    out = np.empty_like(values)
    running = 0.0
    for index, value in enumerate(values):
        running = weight * running + (1.0 - weight) * value
        out[index] = running / (1.0 - weight ** (index + 1))
    return out


def describe_training_curves(
    records: Sequence[Mapping[str, object]],
    *,
    x: str = "step",
    metrics: Sequence[str] | None = None,
    smoothing: float = 0.0,
    title: str | None = None,
    marker: tuple[float, str] | None = None,
) -> CurvesFigure:
    """Loss (left) and accuracy (right, as percent) against `x`, from logged records such as metrics.jsonl rows.

    Args:
        metrics: keys to draw (see `vitviz.plots.curve_series`); keys containing "acc" go to the right panel.
        smoothing: weight of an exponential moving average (0 <= w < 1, see `smoothed`); above 0 each
            series keeps its raw values, drawn faintly under the smoothed line.
        marker: (x, label) drawn as a dotted vertical line in both panels, e.g. the step a checkpoint was saved.
    """
    loss: list[CurveSeries] = []
    accuracy: list[CurveSeries] = []
    for index, (key, (xs, ys)) in enumerate(curve_series(records, x=x, metrics=metrics).items()):
        shown = smoothed(ys, smoothing) if smoothing > 0.0 else np.asarray(ys, dtype=np.float64)
        series = CurveSeries(
            label=curve_label(key),
            xs=tuple(float(v) for v in xs),
            ys=tuple(float(v) for v in shown),
            colour=SERIES_COLOURS[index % len(SERIES_COLOURS)],
            markers=len(xs) <= 30,
            raw=tuple(float(v) for v in ys) if smoothing > 0.0 else None,
        )
        (accuracy if is_accuracy(key) else loss).append(series)
    x_label = x.capitalize()
    return CurvesFigure(
        panels=(
            CurvePanel("Loss", x_label, "Loss", tuple(loss), percent=False),
            CurvePanel("Accuracy", x_label, "Accuracy", tuple(accuracy), percent=True),
        ),
        title=title,
        marker=marker,
    )


BASELINE_METHOD = "random"  # the map every method should beat: drawn dashed in grey
BASELINE_COLOUR = "#737373"


def method_colour(method: str) -> str:
    """A map method's colour in every figure: a fixed tab10 colour per known method, `random` grey."""
    from vitviz.faithfulness import METHODS

    if method == BASELINE_METHOD:
        return BASELINE_COLOUR
    others = [m for m in METHODS if m != BASELINE_METHOD]
    index = others.index(method) if method in others else len(others) + sum(map(ord, method)) % 3
    return SERIES_COLOURS[index % len(SERIES_COLOURS)]


def _mean_curve(curves: np.ndarray) -> np.ndarray:
    """[S+1] as is, or [images, S+1] averaged over images."""
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim == 2:
        return curves.mean(axis=0)
    if curves.ndim != 1 or curves.size < 2:
        raise ValueError(f"expected a curve [S+1] or curves [images, S+1], got shape {curves.shape}")
    return curves


def describe_faithfulness_curves(
    deletion: Mapping[str, np.ndarray],
    insertion: Mapping[str, np.ndarray],
    *,
    title: str | None = None,
) -> CurvesFigure:
    """Deletion (left) and insertion (right) curves, one colour per method and `random` dashed, AUC in the legend.

    Args:
        deletion, insertion: {method: curve [S+1] or curves [images, S+1]}; several images are averaged (the AUC
            of the mean curve is the mean of the images' AUCs). Point i is drawn at i/S, the share of patches
            removed (deletion) or restored (insertion).
    """
    from vitviz.faithfulness import curve_auc

    if not deletion and not insertion:
        raise ValueError("no curves to draw")
    panels = []
    for curves, name, better, verb in (
        (deletion, "Deletion", "lower", "removed"),
        (insertion, "Insertion", "higher", "restored"),
    ):
        series = []
        for method, values in curves.items():
            curve = _mean_curve(values)
            series.append(
                CurveSeries(
                    label=f"{method} ({curve_auc(curve):.3f})",
                    xs=tuple(float(v) for v in np.linspace(0.0, 1.0, curve.size)),
                    ys=tuple(float(v) for v in curve),
                    colour=method_colour(method),
                    markers=False,
                    dashed=method == BASELINE_METHOD,
                )
            )
        panels.append(
            CurvePanel(
                title=f"{name} ({better} AUC is better)",
                x_label=f"fraction of patches {verb}",
                y_label="probability of the target class",
                series=tuple(series),
                percent=False,
                x_percent=True,
                x_range=(0.0, 1.0),
                y_range=(-0.02, 1.02),
                legend_title=f"{name} AUC",
                empty_text="",
            )
        )
    return CurvesFigure(panels=tuple(panels), title=title, share_y=True)


def describe_sanity_curve(
    randomised: Sequence[str],
    spearman: Mapping[str, Sequence[float | None]],
    *,
    title: str | None = "Sanity check: cascading randomisation",
) -> CurvesFigure:
    """Spearman correlation with the original map after each cascading-randomisation stage, one line per method.

    A stage where a map was constant (NaN or None) leaves a gap.
    """
    if not spearman:
        raise ValueError("no sanity results to draw")
    stages = tuple(randomised)
    series = []
    for method, values in spearman.items():
        ys = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        if ys.size != len(stages):
            raise ValueError(f"{method}: {ys.size} correlations for {len(stages)} stages")
        series.append(
            CurveSeries(
                label=method,
                xs=tuple(float(i) for i in range(len(stages))),
                ys=tuple(float(v) for v in ys),
                colour=method_colour(method),
                markers=True,
                dashed=method == BASELINE_METHOD,
            )
        )
    panel = CurvePanel(
        title="",
        x_label="randomised up to (cumulative, from the head down)",
        y_label="Spearman with the original map",
        series=tuple(series),
        percent=False,
        y_range=(-1.05, 1.05),
        categories=stages,
        zero_line=True,
    )
    return CurvesFigure(panels=(panel,), title=title)


def describe_auc_intervals(
    aucs: Mapping[str, Mapping[str, Mapping[str, tuple[float, float, float]]]],
    *,
    title: str | None = None,
) -> IntervalsFigure:
    """Deletion (left) and insertion (right) AUCs of each method for several models, each with its interval.

    Args:
        aucs: model -> curve ("deletion", "insertion") -> method -> (AUC, interval low, interval high); a method
            a model lacks is left out of that model's series. One colour per model, in order.
    """
    methods = tuple(dict.fromkeys(m for curves in aucs.values() for points in curves.values() for m in points))
    if not methods:
        raise ValueError("no AUCs to draw")
    nan = (math.nan, math.nan, math.nan)
    panels = []
    for curve, better in (("deletion", "lower"), ("insertion", "higher")):
        series = []
        for index, (model, curves) in enumerate(aucs.items()):
            points = [curves.get(curve, {}).get(method, nan) for method in methods]
            series.append(
                IntervalSeries(
                    label=model,
                    values=tuple(float(p[0]) for p in points),
                    lows=tuple(float(p[1]) for p in points),
                    highs=tuple(float(p[2]) for p in points),
                    colour=SERIES_COLOURS[index % len(SERIES_COLOURS)],
                )
            )
        panels.append(IntervalPanel(f"{curve.capitalize()} ({better} AUC is better)", "AUC", tuple(series)))
    return IntervalsFigure(categories=methods, panels=tuple(panels), title=title)
