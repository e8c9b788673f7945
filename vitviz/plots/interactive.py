"""Plotly figures for the app: the paper's figures plus the app's own views (overlays, grids, curves).

Every function takes numpy arrays (never a model) and returns a `plotly.graph_objects.Figure`.
Grids of maps are drawn as ONE heatmap of a mosaic (see `vitviz.plots.tile_mosaic`), never as
hundreds of subplots, so a 24 x 24 grid stays responsive; hover tells which tile and cell is under
the cursor. Colour-scale arguments (`zmin`, `zmax`) let the compare page use one scale for two models.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.colors
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from vitviz.plots import (
    as_rgb_uint8,
    curve_label,
    curve_series,
    is_accuracy,
    minmax_scale,
    mosaic_positions,
    scale_by_max,
    tile_centres,
    tile_mosaic,
)

_FONT = {"size": 12}
_MARGIN = {"l": 60, "r": 20, "t": 50, "b": 50}
GRID_TILE_PX = 64  # screen pixels per tile of the layers x heads view: readable whatever the model's shape
GRID_COLORBAR_PX = 110  # right margin of that view, wide enough for its colour bar and title
GRID_MIN_WIDTH_PX = 560  # that view's narrowest figure (the tiles keep their size; the rest stays blank)


def filters_figure(
    components: np.ndarray,
    explained_variance_ratio: np.ndarray,
    *,
    ncols: int = 7,
    max_components: int = 28,
    title: str | None = None,
) -> go.Figure:
    """Principal components of the patch-embedding filters as one image, each min-max scaled on its own.

    Args:
        components: [k, C, P, P]; C == 3 in colour, anything else in grey (mean over channels).
        explained_variance_ratio: [k], written above each filter.
    """
    components = np.asarray(components, dtype=np.float64)[:max_components]
    if components.ndim != 4:
        raise ValueError(f"expected components [k, C, P, P], got shape {components.shape}")
    ratios = np.asarray(explained_variance_ratio, dtype=np.float64)[: len(components)]
    count, channels, ph, pw = components.shape
    scaled = minmax_scale(components, over=(1, 2, 3))
    pictures = scaled.transpose(0, 2, 3, 1) if channels == 3 else np.repeat(scaled.mean(axis=1)[..., None], 3, axis=3)
    ncols = max(1, min(ncols, count))
    nrows = math.ceil(count / ncols)
    tiles = np.ones((nrows * ncols, ph, pw, 3))
    tiles[:count] = pictures
    gap = max(2, ph // 3)  # room for the labels between rows
    mosaic = tile_mosaic(tiles.reshape(nrows, ncols, ph, pw, 3), gap=gap, fill=1.0)
    fig = go.Figure(go.Image(z=np.rint(mosaic * 255).astype(np.uint8), hoverinfo="skip"))
    # Every label in one layout update: plotly's add_annotation re-validates the whole list on each call
    # (quadratic in the labels; most of the figure's build time with 28 of them).
    labels = []
    for index in range(count):
        row, col = divmod(index, ncols)
        labels.append(
            {
                "x": col * (pw + gap) + (pw - 1) / 2,
                "y": row * (ph + gap) - 0.5,
                "yanchor": "bottom",
                "text": f"{index + 1}: {100 * ratios[index]:.1f}%",
                "showarrow": False,
                "font": {"size": 11},
            }
        )
    if title is None:
        kind = "RGB" if channels == 3 else ("Grey" if channels == 1 else f"{channels}-channel (mean)")
        title = f"{kind} embedding filters (first {count} principal components)"
    fig.update_layout(title=title, font=_FONT, margin={**_MARGIN, "t": 70}, plot_bgcolor="white", annotations=labels)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, range=[mosaic.shape[0] - 0.5, -gap - 0.5])
    return fig


def position_figure(
    similarity: np.ndarray,
    *,
    zmin: float = -1.0,
    zmax: float = 1.0,
    colorscale: str = "Viridis",
    title: str = "Position embedding similarity",
) -> go.Figure:
    """Cosine similarity of position embeddings: one heatmap trace, tile (r, c) = similarity[r, c].

    Hover shows the query patch (the tile), the key patch (the cell inside it) and the similarity,
    all 1-based as on the axes.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 4:
        raise ValueError(f"expected similarity [gh, gw, gh, gw], got shape {similarity.shape}")
    gh, gw = similarity.shape[:2]
    fig = _mosaic_heatmap(
        similarity,
        zmin=zmin,
        zmax=zmax,
        colorscale=colorscale,
        colorbar_title="Cosine similarity",
        hovertemplate=(
            "query patch (%{customdata[0]}, %{customdata[1]})<br>"
            "key patch (%{customdata[2]}, %{customdata[3]})<br>similarity %{z:.3f}<extra></extra>"
        ),
    )
    _tile_axes(fig, (gh, gw), (gh, gw), x_title="Input patch column", y_title="Input patch row")
    fig.update_layout(title=title)
    return fig


def position_patch_figure(
    similarity: np.ndarray,
    row: int,
    col: int,
    *,
    zmin: float = -1.0,
    zmax: float = 1.0,
    colorscale: str = "Viridis",
) -> go.Figure:
    """Similarity of one patch's position embedding (0-based `row`, `col`) with every other patch."""
    similarity = np.asarray(similarity, dtype=np.float64)
    gh, gw = similarity.shape[:2]
    values = similarity[row, col]
    ticks_y, ticks_x = np.arange(gh), np.arange(gw)
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=ticks_x,
            y=ticks_y,
            zmin=zmin,
            zmax=zmax,
            colorscale=rgb_colorscale(colorscale),
            colorbar={"title": {"text": "Cosine similarity", "side": "right"}},
            customdata=np.stack(np.meshgrid(ticks_y + 1, ticks_x + 1, indexing="ij"), axis=-1),
            hovertemplate="patch (%{customdata[0]}, %{customdata[1]})<br>similarity %{z:.3f}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[col],
            y=[row],
            mode="markers",
            hoverinfo="skip",
            showlegend=False,
            marker={"symbol": "square-open", "size": 14, "color": "red", "line": {"width": 2}},
        )
    )
    fig.update_xaxes(
        title="Input patch column", tickvals=ticks_x, ticktext=[str(i + 1) for i in ticks_x], showgrid=False
    )
    fig.update_yaxes(
        title="Input patch row",
        tickvals=ticks_y,
        ticktext=[str(i + 1) for i in ticks_y],
        autorange="reversed",
        scaleanchor="x",
        showgrid=False,
    )
    fig.update_layout(
        title=f"Similarity with patch ({row + 1}, {col + 1})", font=_FONT, margin=_MARGIN, plot_bgcolor="white"
    )
    return fig


def distance_figure(
    pixels: np.ndarray,
    *,
    std: np.ndarray | None = None,
    show_mean: bool = True,
    ymax: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Mean attention distance (pixels) of every head against depth, with the per-layer mean line."""
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.ndim != 2:
        raise ValueError(f"expected pixels [L, H], got shape {pixels.shape}")
    depth, heads = pixels.shape
    layers = np.arange(1, depth + 1)
    fig = go.Figure()
    for head in range(heads):
        error = None if std is None else {"type": "data", "array": np.asarray(std)[:, head], "thickness": 1, "width": 0}
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=pixels[:, head],
                mode="markers",
                name=f"Head {head + 1}",
                error_y=error,
                marker={"size": 7},
                hovertemplate=f"layer %{{x}}, head {head + 1}<br>%{{y:.1f}} px<extra></extra>",
            )
        )
    if show_mean:
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=pixels.mean(axis=1),
                mode="lines",
                name="Mean",
                line={"color": "black", "width": 2},
                hovertemplate="layer %{x}<br>mean %{y:.1f} px<extra></extra>",
            )
        )
    top = ymax if ymax is not None else max(1.0, float(np.nanmax(pixels)) * 1.08)
    tick_step = 1 if depth <= 16 else math.ceil(depth / 12)
    fig.update_xaxes(title="Network depth (layer)", tickmode="linear", dtick=tick_step)
    fig.update_yaxes(title="Mean attention distance (pixels)", range=[0, top])
    fig.update_layout(title=title, font=_FONT, margin=_MARGIN, legend={"font": {"size": 10}})
    return fig


def explained_variance_figure(explained_variance_ratio: np.ndarray) -> go.Figure:
    """Explained-variance ratio of each principal component, and the cumulative total."""
    ratios = np.asarray(explained_variance_ratio, dtype=np.float64)
    components = np.arange(1, len(ratios) + 1)
    fig = go.Figure(
        [
            go.Bar(x=components, y=ratios, name="Per component", hovertemplate="PC %{x}: %{y:.1%}<extra></extra>"),
            go.Scatter(
                x=components,
                y=np.cumsum(ratios),
                mode="lines+markers",
                name="Cumulative",
                hovertemplate="first %{x}: %{y:.1%}<extra></extra>",
            ),
        ]
    )
    fig.update_xaxes(title="Principal component")
    fig.update_yaxes(title="Explained variance", tickformat=".0%", range=[0, 1.02])
    fig.update_layout(font=_FONT, margin=_MARGIN, legend={"x": 0.98, "xanchor": "right", "y": 0.5})
    return fig


ROLLOUT_COLOURSCALES = ("Viridis", "Inferno", "Cividis", "Jet")  # perceptually uniform first; Jet on request
FLAT_SPREAD = 0.05  # a map whose (max - min) / max is below this is "nearly flat"


def relative_spread(values: np.ndarray) -> float:
    """(max - min) / max of a non-negative map: 0 for a uniform map, 1 when its smallest value is 0.

    A map below `FLAT_SPREAD` is nearly flat: divided by its maximum it would look saturated everywhere,
    although its values differ by less than 5 % of the largest one. An all-zero map counts as flat (0).
    """
    values = np.asarray(values, dtype=np.float64)
    top = float(np.nanmax(values)) if values.size else 0.0
    if top <= 0.0:
        return 0.0
    return float((top - np.nanmin(values)) / top)


def rollout_figure(
    image: np.ndarray,
    relevance: np.ndarray,
    *,
    opacity: float = 0.5,
    colorscale: str = "Viridis",
    zmin: float = 0.0,
    zmax: float | None = None,
    absolute: bool = False,
    smooth: bool = False,
    title: str | None = None,
) -> go.Figure:
    """An image with a patch map laid over it as blocks, one per token.

    By default the map is divided by its max and drawn on 0..1 (each map fills the colour scale). With
    `absolute` the raw values are drawn on zmin..zmax (zmax default: the map's max), so several figures can
    share one scale. Hover always shows the raw value.

    Args:
        image: uint8 [H, W, 3]; any aspect ratio (the patch grid is stretched over it).
        relevance: [gh, gw] non-negative map; cell (i, j) covers its patch's pixels.
        smooth: interpolate between patch centres instead of drawing blocks.
    """
    image = as_rgb_uint8(image)
    relevance = np.asarray(relevance, dtype=np.float64)
    height, width = image.shape[:2]
    gh, gw = relevance.shape
    dy, dx = height / gh, width / gw
    if absolute:
        shown, top, bar_title = (
            relevance,
            (zmax if zmax is not None else max(float(np.nanmax(relevance)), 1e-12)),
            "Relevance",
        )
    else:
        shown, top, bar_title = scale_by_max(relevance), 1.0 if zmax is None else zmax, "Relevance (÷ max)"
    rows, cols = np.meshgrid(np.arange(1, gh + 1), np.arange(1, gw + 1), indexing="ij")
    fig = go.Figure(picture_trace(image))
    fig.add_trace(
        go.Heatmap(
            z=shown,
            x0=(dx - 1) / 2,
            dx=dx,
            y0=(dy - 1) / 2,
            dy=dy,
            zmin=zmin,
            zmax=top,
            colorscale=rgb_colorscale(colorscale),
            opacity=opacity,
            zsmooth="best" if smooth else False,
            colorbar={"title": {"text": bar_title, "side": "right"}},
            customdata=np.stack([rows, cols, relevance], axis=-1),
            hovertemplate="patch (%{customdata[0]}, %{customdata[1]})<br>value %{customdata[2]:.4g}<extra></extra>",
        )
    )
    fig.update_xaxes(visible=False, range=[-0.5, width - 0.5])
    fig.update_yaxes(visible=False, range=[height - 0.5, -0.5], scaleanchor="x")
    fig.update_layout(title=title, font=_FONT, margin={**_MARGIN, "l": 10})
    return fig


def image_figure(image: np.ndarray, *, title: str | None = None) -> go.Figure:
    """The plain picture, on the same axes as `rollout_figure`, to show beside an overlay."""
    image = as_rgb_uint8(image)
    height, width = image.shape[:2]
    fig = go.Figure(picture_trace(image))
    fig.update_xaxes(visible=False, range=[-0.5, width - 0.5])
    fig.update_yaxes(visible=False, range=[height - 0.5, -0.5], scaleanchor="x")
    fig.update_layout(title=title, font=_FONT, margin={**_MARGIN, "l": 10})
    return fig


def rgb_colorscale(name: str) -> list[list[object]]:
    """A named plotly colour scale as explicit (position, "rgb(r, g, b)") stops.

    Streamlit's plotly theme uses the colours #000001 to #000040 as placeholders and swaps them for theme
    colours in the browser; Inferno starts at #000004, so its lowest values were drawn pink. Written as
    rgb() the same colours pass through untouched.
    """
    stops = []
    for position, colour in plotly.colors.get_colorscale(name):
        if colour.startswith("#"):
            red, green, blue = plotly.colors.hex_to_rgb(colour)
            colour = f"rgb({red}, {green}, {blue})"
        stops.append([position, colour])
    return stops


def picture_trace(image: np.ndarray) -> go.Image:
    """An RGB picture as a plotly image trace whose pixels travel as one PNG (a data URI), not as a `z` array.

    For a 224 x 224 photo-like picture `z` is 0.22 MB of base64 pixel data that Plotly paints pixel by pixel;
    the PNG is 0.11 MB and the browser decodes it natively. Pixel (x, y) still covers [x - 0.5, x + 0.5].
    """
    buffer = io.BytesIO()
    Image.fromarray(as_rgb_uint8(image)).save(buffer, format="PNG", compress_level=1)
    source = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return go.Image(source=source, hoverinfo="skip")


def attention_grid_figure(
    attention: np.ndarray,
    *,
    zmin: float = 0.0,
    zmax: float | None = None,
    per_tile: bool = False,
    colorscale: str = "Inferno",
    title: str | None = None,
    query: tuple[int, int] | None = None,
    first_layer: int = 0,
    tile_px: int = GRID_TILE_PX,
) -> go.Figure:
    """Attention of one query over the patches, layers (rows) x heads (columns), as one heatmap.

    The figure has a fixed size of `tile_px` screen pixels per tile (plus margins and colour bar), so a
    12 x 3 model is not squeezed into thin strips by the page's column width; draw it at its own width.

    Args:
        attention: [L, H, gh, gw].
        per_tile: divide each tile by its own max (shape, not strength); else one scale for all.
        query: 0-based (row, column) of the query patch, outlined in every tile.
        first_layer: 0-based index of the first layer in `attention` (labels when showing a slice of layers).
        tile_px: screen pixels per tile side.
    """
    attention = np.asarray(attention, dtype=np.float64)
    if attention.ndim != 4:
        raise ValueError(f"expected attention [L, H, gh, gw], got shape {attention.shape}")
    depth, heads, gh, gw = attention.shape
    values = np.stack([[scale_by_max(tile) for tile in layer] for layer in attention]) if per_tile else attention
    top = 1.0 if per_tile else (zmax if zmax is not None else max(float(np.nanmax(values)), 1e-12))
    fig = _mosaic_heatmap(
        values,
        zmin=zmin,
        zmax=top,
        colorscale=colorscale,
        colorbar_title="Attention (÷ tile max)" if per_tile else "Attention probability",
        hovertemplate=(
            "layer %{customdata[0]}, head %{customdata[1]}<br>"
            "key patch (%{customdata[2]}, %{customdata[3]})<br>%{z:.4f}<extra></extra>"
        ),
        row_offset=first_layer,
    )
    _tile_axes(fig, (depth, heads), (gh, gw), x_title="Head", y_title="Layer", row_offset=first_layer)
    # Mosaic cells per tile (gap included) scale to tile_px screen pixels; the colour bar sits in the right margin.
    cell_px = tile_px / max(gh + 1, gw + 1)
    margin = {**_MARGIN, "r": GRID_COLORBAR_PX}
    fig.update_layout(
        # at least GRID_MIN_WIDTH_PX wide, so the toolbar does not cover the title of a 2- or 3-head model
        width=max(GRID_MIN_WIDTH_PX, round(margin["l"] + margin["r"] + cell_px * (heads * (gw + 1) - 1))),
        height=round(margin["t"] + margin["b"] + cell_px * (depth * (gh + 1) - 1)),
        margin=margin,
    )
    fig.update_traces(selector={"type": "heatmap"}, colorbar={"thickness": 16, "len": 1.0, "lenmode": "fraction"})
    if query is not None:
        layer_index, head_index = np.meshgrid(np.arange(depth), np.arange(heads), indexing="ij")
        fig.add_trace(
            go.Scatter(
                x=(head_index * (gw + 1) + query[1]).ravel(),
                y=(layer_index * (gh + 1) + query[0]).ravel(),
                mode="markers",
                name="query patch",
                hoverinfo="skip",
                showlegend=False,
                marker={"symbol": "square-open", "size": 9, "color": "#00e5ff", "line": {"width": 2}},
            )
        )
    fig.update_layout(title=title)
    return fig


def difference_figure(
    difference: np.ndarray,
    *,
    zmax: float | None = None,
    colorscale: str = "RdBu_r",
    title: str | None = None,
    colorbar_title: str = "Difference",
) -> go.Figure:
    """A difference map (model A minus model B) on a diverging scale centred at 0 (-zmax..zmax).

    Args:
        difference: [h, w], or [gh, gw, gh, gw] (e.g. two position-similarity tables) drawn as a mosaic.
        zmax: half-width of the scale, default the largest absolute difference.
    """
    difference = np.asarray(difference, dtype=np.float64)
    limit = zmax if zmax is not None else max(float(np.nanmax(np.abs(difference))), 1e-12)
    if difference.ndim == 4:
        gh, gw = difference.shape[:2]
        fig = _mosaic_heatmap(
            difference,
            zmin=-limit,
            zmax=limit,
            colorscale=colorscale,
            colorbar_title=colorbar_title,
            hovertemplate=(
                "query patch (%{customdata[0]}, %{customdata[1]})<br>"
                "key patch (%{customdata[2]}, %{customdata[3]})<br>difference %{z:.3f}<extra></extra>"
            ),
        )
        _tile_axes(fig, (gh, gw), (gh, gw), x_title="Input patch column", y_title="Input patch row")
        fig.update_layout(plot_bgcolor="#bbbbbb")  # gaps in grey: white means "no difference" here
    elif difference.ndim == 2:
        rows, cols = difference.shape
        fig = go.Figure(
            go.Heatmap(
                z=difference,
                zmin=-limit,
                zmax=limit,
                colorscale=rgb_colorscale(colorscale),
                x=np.arange(1, cols + 1),
                y=np.arange(1, rows + 1),
                colorbar={"title": {"text": colorbar_title, "side": "right"}},
                hovertemplate="(%{y}, %{x})<br>difference %{z:.3f}<extra></extra>",
            )
        )
        # Explicit ranges on the grid (1-based, row 1 at the top); constrain="domain" keeps the cells square
        # without widening the y range beyond the grid.
        fig.update_yaxes(
            title="Patch row",
            range=[rows + 0.5, 0.5],
            scaleanchor="x",
            constrain="domain",
            showgrid=False,
            zeroline=False,
        )
        fig.update_xaxes(
            title="Patch column", range=[0.5, cols + 0.5], constrain="domain", showgrid=False, zeroline=False
        )
        fig.update_layout(font=_FONT, margin=_MARGIN, plot_bgcolor="white")
    else:
        raise ValueError(f"expected a [h, w] or [gh, gw, gh, gw] difference, got shape {difference.shape}")
    fig.update_layout(title=title)
    return fig


MODEL_COLOURS = plotly.colors.qualitative.D3  # one distinguishable hue per model
MODEL_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def comparison_curves_figure(
    curves: Mapping[str, np.ndarray], *, x_title: str, y_title: str, x_start: int = 1, y_format: str | None = None
) -> go.Figure:
    """One line per model on shared axes: a qualitative colour and a dash style of its own for each model."""
    fig = go.Figure()
    for index, (name, values) in enumerate(curves.items()):
        values = np.asarray(values, dtype=np.float64)
        fig.add_trace(
            go.Scatter(
                x=np.arange(x_start, x_start + len(values)),
                y=values,
                mode="lines+markers" if len(values) <= 32 else "lines",
                name=name,
                line={
                    "color": MODEL_COLOURS[index % len(MODEL_COLOURS)],
                    "dash": MODEL_DASHES[index % len(MODEL_DASHES)],
                    "width": 2.5,
                },
                marker={"size": 6},
            )
        )
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(title=y_title, tickformat=y_format)
    fig.update_layout(font=_FONT, margin={**_MARGIN, "t": 20}, hovermode="x unified")
    return fig


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


def training_curves_figure(
    records: Sequence[Mapping[str, object]],
    *,
    x: str = "step",
    metrics: Sequence[str] | None = None,
    smoothing: float = 0.0,
) -> go.Figure:
    """Loss (left) and accuracy (right) against `x` from logged records, e.g. metrics.jsonl rows.

    Args:
        records: one mapping per logged point; records without `x` or a metric are skipped for it.
        metrics: keys to draw; default every numeric key whose name contains "loss" or "acc".
            Keys containing "acc" go to the right panel, all others to the left.
        smoothing: weight of an exponential moving average (0 <= w < 1, see `smoothed`); above 0 the raw
            values stay as a faint line of the same colour under the smoothed one.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Accuracy"), horizontal_spacing=0.12)
    palette = plotly.colors.qualitative.Plotly
    for index, (key, (xs, ys)) in enumerate(curve_series(records, x=x, metrics=metrics).items()):
        colour = palette[index % len(palette)]
        col = 2 if is_accuracy(key) else 1
        mode = "lines+markers" if len(xs) < 30 else "lines"
        if smoothing > 0.0:
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode=mode,
                    name=f"{curve_label(key)} (raw)",
                    line={"color": colour, "width": 1},
                    opacity=0.3,
                    showlegend=False,
                    hoverinfo="skip",
                ),
                row=1,
                col=col,
            )
            ys = smoothed(ys, smoothing)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode=mode, name=curve_label(key), line={"color": colour}), row=1, col=col)
    fig.update_xaxes(title=x.capitalize())
    fig.update_yaxes(tickformat=".0%", row=1, col=2)
    fig.update_layout(font=_FONT, margin=_MARGIN, hovermode="x unified")
    return fig


def _mosaic_heatmap(
    tiles: np.ndarray,
    *,
    zmin: float,
    zmax: float,
    colorscale: str,
    colorbar_title: str,
    hovertemplate: str,
    row_offset: int = 0,
) -> go.Figure:
    """One heatmap of a [R, C, h, w] tile array; customdata holds 1-based (tile r, tile c, cell r, cell c).

    `row_offset` is added to the tile row numbers (a slice of rows keeps its original numbers)."""
    rows, cols, h, w = tiles.shape
    mosaic = tile_mosaic(tiles, gap=1).astype(np.float32)  # float32 halves what the browser receives
    tile_row, cell_row = mosaic_positions(rows, h)
    tile_col, cell_col = mosaic_positions(cols, w)
    dtype = np.uint8 if max(rows + row_offset, cols, h, w) < 255 else np.uint16  # sent as compact typed arrays
    shape = mosaic.shape
    customdata = np.stack(
        [
            np.broadcast_to(np.where(tile_row < 0, -1, tile_row + row_offset)[:, None] + 1, shape),
            np.broadcast_to(tile_col[None, :] + 1, shape),
            np.broadcast_to(cell_row[:, None] + 1, shape),
            np.broadcast_to(cell_col[None, :] + 1, shape),
        ],
        axis=-1,
    ).astype(dtype)  # gaps (index -1) become 0; they are not hoverable anyway
    fig = go.Figure(
        go.Heatmap(
            z=mosaic,
            zmin=zmin,
            zmax=zmax,
            colorscale=rgb_colorscale(colorscale),
            customdata=customdata,
            hovertemplate=hovertemplate,
            hoverongaps=False,
            colorbar={"title": {"text": colorbar_title, "side": "right"}},
        )
    )
    fig.update_layout(font=_FONT, margin=_MARGIN, plot_bgcolor="white")
    return fig


def _tile_axes(
    fig: go.Figure,
    counts: tuple[int, int],
    tile: tuple[int, int],
    *,
    x_title: str,
    y_title: str,
    row_offset: int = 0,
) -> None:
    """1-based tick labels at tile centres (rows numbered from row_offset + 1), row 1 at the top, square cells."""
    for update, count, tile_len, axis_title, offset in (
        (fig.update_yaxes, counts[0], tile[0], y_title, row_offset),
        (fig.update_xaxes, counts[1], tile[1], x_title, 0),
    ):
        step = 1 if count <= 16 else math.ceil(count / 12)
        picked = np.arange(0, count, step)
        update(
            title=axis_title,
            tickvals=tile_centres(count, tile_len)[picked],
            ticktext=[str(i + 1 + offset) for i in picked],
            showgrid=False,
            zeroline=False,
            ticks="",
        )
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain")
    fig.update_xaxes(constrain="domain")


def faithfulness_curves_figure(
    deletion: Mapping[str, np.ndarray],
    insertion: Mapping[str, np.ndarray],
    *,
    title: str | None = None,
) -> go.Figure:
    """Deletion (left) and insertion (right) curves, one colour per method and `random` dashed, AUC in the legend.

    The same curves, colours and AUCs as `vitviz.plots.faithfulness.curves_figure`.

    Args:
        deletion, insertion: {method: curve [S+1] or curves [images, S+1]}; several images are averaged. Point i
            is drawn at i/S, the share of patches removed (deletion) or restored (insertion).
    """
    from vitviz.faithfulness import curve_auc
    from vitviz.plots.faithfulness import BASELINE_METHOD, method_colour

    if not deletion and not insertion:
        raise ValueError("no curves to draw")
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.06,
        subplot_titles=("Deletion (lower AUC is better)", "Insertion (higher AUC is better)"),
    )
    for col, (curves, kind, verb) in enumerate(
        ((deletion, "deletion", "removed"), (insertion, "insertion", "restored")), start=1
    ):
        for method, values in curves.items():
            values = np.asarray(values, dtype=np.float64)
            curve = values.mean(axis=0) if values.ndim == 2 else values
            xs = np.linspace(0.0, 1.0, curve.size)
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=curve,
                    mode="lines",
                    name=f"{method} ({curve_auc(curve):.3f})",
                    legendgroup=kind,
                    legendgrouptitle_text=f"{kind.capitalize()} AUC",
                    line={
                        "color": method_colour(method),
                        "width": 2.2,
                        "dash": "dash" if method == BASELINE_METHOD else "solid",
                    },
                    hovertemplate=f"{method}<br>%{{x:.0%}} of patches {verb}<br>p = %{{y:.3f}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title=f"fraction of patches {verb}", range=[0, 1], tickformat=".0%", row=1, col=col)
    fig.update_yaxes(title="probability of the target class", range=[-0.02, 1.02], row=1, col=1)
    fig.update_layout(
        title=title,
        font=_FONT,
        margin=_MARGIN,
        legend={"groupclick": "toggleitem", "tracegroupgap": 12},
        hovermode="closest",
    )
    return fig


def sanity_curve_figure(
    randomised: Sequence[str],
    spearman: Mapping[str, Sequence[float | None]],
    *,
    title: str | None = "Sanity check: cascading randomisation",
) -> go.Figure:
    """Spearman correlation with the original map after each cascading-randomisation stage, one line per method.

    The same lines as `vitviz.plots.faithfulness.sanity_figure`; a stage where a map was constant (NaN or None)
    leaves a gap.
    """
    from vitviz.plots.faithfulness import BASELINE_METHOD, method_colour

    if not spearman:
        raise ValueError("no sanity results to draw")
    stages = list(randomised)
    fig = go.Figure()
    for method, values in spearman.items():
        ys = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        if ys.size != len(stages):
            raise ValueError(f"{method}: {ys.size} correlations for {len(stages)} stages")
        fig.add_trace(
            go.Scatter(
                x=stages,
                y=ys,
                mode="lines+markers",
                name=method,
                line={
                    "color": method_colour(method),
                    "width": 2.2,
                    "dash": "dash" if method == BASELINE_METHOD else "solid",
                },
                hovertemplate=f"{method}<br>randomised up to %{{x}}<br>Spearman %{{y:.3f}}<extra></extra>",
            )
        )
    fig.add_hline(y=0.0, line={"color": "rgb(180, 180, 180)", "width": 1})
    fig.update_xaxes(title="randomised up to (cumulative, from the head down)", type="category")
    fig.update_yaxes(title="Spearman with the original map", range=[-1.05, 1.05])
    fig.update_layout(title=title, font=_FONT, margin=_MARGIN if title else {**_MARGIN, "t": 20})
    return fig
