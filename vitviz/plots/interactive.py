"""Plotly figures for the app: the paper's figures plus the app's own views (overlays, grids, curves).

Every function takes numpy arrays (never a model) and returns a `plotly.graph_objects.Figure`.
Grids of maps are drawn as ONE heatmap of a mosaic (see `vitviz.plots.tile_mosaic`), never as
hundreds of subplots, so a 24 x 24 grid stays responsive; hover tells which tile and cell is under
the cursor. Colour-scale arguments (`zmin`, `zmax`) let the compare page use one scale for two models.

The figures the exports also draw are described once in `vitviz.plots.figures`; each of them here is
`render_plotly(describe_*(...))`, and `vitviz.plots.paper` draws the same description with matplotlib.
"""

from __future__ import annotations

import base64
import functools
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.colors
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from vitviz.plots import as_rgb_uint8, mosaic_positions, tile_centres, tile_mosaic
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
    describe_attention_grid,
    describe_distance,
    describe_faithfulness_curves,
    describe_filters,
    describe_position_similarity,
    describe_rollout,
    describe_sanity_curve,
    describe_training_curves,
)

_FONT = {"size": 12}
_MARGIN = {"l": 60, "r": 20, "t": 50, "b": 50}
GRID_TILE_PX = 64  # screen pixels per tile of the layers x heads view: readable whatever the model's shape
GRID_COLORBAR_PX = 110  # right margin of that view, wide enough for its colour bar and title
FAITHFULNESS_PLOT_PX = 380  # the faithfulness curves' height above their legend (title, panels, x titles)
FAITHFULNESS_ROW_PX = 19  # one legend row below those curves (one method of each group side by side)
GRID_MIN_WIDTH_PX = 560  # that view's narrowest figure (the tiles keep their size; the rest stays blank)


def filters_figure(
    components: np.ndarray,
    explained_variance_ratio: np.ndarray,
    *,
    ncols: int = 7,
    max_components: int = 28,
    title: str | None = None,
) -> go.Figure:
    """Principal components of the patch-embedding filters as one image; see `describe_filters`."""
    return render_plotly(
        describe_filters(components, explained_variance_ratio, ncols=ncols, max_components=max_components, title=title)
    )


def position_figure(
    similarity: np.ndarray,
    *,
    zmin: float = -1.0,
    zmax: float = 1.0,
    colorscale: str = DEFAULT_COLORMAP,
    title: str = "Position embedding similarity",
) -> go.Figure:
    """Cosine similarity of position embeddings: one heatmap trace, tile (r, c) = similarity[r, c].

    Hover shows the query patch (the tile), the key patch (the cell inside it) and the similarity,
    all 1-based as on the axes.
    """
    return render_plotly(
        describe_position_similarity(similarity, vmin=zmin, vmax=zmax, colormap=colorscale, title=title)
    )


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
        constrain="domain",  # the square shrinks its axes, not its range: the ticks stay against the map
        showgrid=False,
    )
    fig.update_xaxes(constrain="domain")
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
    return render_plotly(describe_distance(pixels, std=std, show_mean=show_mean, ymax=ymax, title=title))


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
    colorscale: str = DEFAULT_COLORMAP,
    zmin: float = 0.0,
    zmax: float | None = None,
    absolute: bool = False,
    smooth: bool = False,
    title: str | None = None,
) -> go.Figure:
    """An image with a patch map laid over it as blocks, one per token; see `describe_rollout`.

    By default the map is divided by its max and drawn on 0..1 (each map fills the colour scale). With
    `absolute` the raw values are drawn on zmin..zmax (zmax default: the map's max), so several figures can
    share one scale. Hover always shows the raw value.

    Args:
        image: uint8 [H, W, 3]; any aspect ratio (the patch grid is stretched over it).
        relevance: [gh, gw] non-negative map; cell (i, j) covers its patch's pixels.
        smooth: interpolate between patch centres instead of drawing blocks.
    """
    description = describe_rollout(
        image,
        relevance,
        title=title,
        colormap=colorscale,
        opacity=opacity,
        vmin=zmin,
        vmax=zmax,
        absolute=absolute,
        smooth=smooth,
    )
    return render_plotly(description)


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
    colorscale: str = GRID_COLORMAP,
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
    description = describe_attention_grid(
        attention,
        query=query,
        per_tile=per_tile,
        vmin=zmin,
        vmax=zmax,
        colormap=colorscale,
        title=title,
        first_layer=first_layer,
    )
    fig = render_plotly(description)
    depth, heads, gh, gw = description.tiles.shape
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


def training_curves_figure(
    records: Sequence[Mapping[str, object]],
    *,
    x: str = "step",
    metrics: Sequence[str] | None = None,
    smoothing: float = 0.0,
    marker: tuple[float, str] | None = None,
) -> go.Figure:
    """Loss (left) and accuracy (right) against `x` from logged records, e.g. metrics.jsonl rows; `marker` (x,
    label) a dotted vertical line across both.

    Args:
        records: one mapping per logged point; records without `x` or a metric are skipped for it.
        metrics: keys to draw; default every numeric key whose name contains "loss" or "acc".
            Keys containing "acc" go to the right panel, all others to the left.
        smoothing: weight of an exponential moving average (0 <= w < 1, see `vitviz.plots.figures.smoothed`); above 0 the raw
            values stay as a faint line of the same colour under the smoothed one.
    """
    return render_plotly(describe_training_curves(records, x=x, metrics=metrics, smoothing=smoothing, marker=marker))


# --- the renderer -----------------------------------------------------------------------------------


@functools.singledispatch
def render_plotly(description: object) -> go.Figure:
    """Draw a figure description of `vitviz.plots.figures` with plotly."""
    raise TypeError(f"no plotly renderer for {type(description).__name__}")


@render_plotly.register
def _(description: MosaicFigure) -> go.Figure:
    tile = description.hover_tile.format(row="%{customdata[0]}", col="%{customdata[1]}")
    value = f"{description.hover_value}%{{z:{description.value_format}}}"
    fig = _mosaic_heatmap(
        description.tiles,
        zmin=description.vmin,
        zmax=description.vmax,
        colorscale=description.colormap,
        colorbar_title=description.colorbar_label,
        hovertemplate=f"{tile}<br>key patch (%{{customdata[2]}}, %{{customdata[3]}})<br>{value}<extra></extra>",
        row_offset=description.row_offset,
    )
    for update, ticks, axis_title in (
        (fig.update_xaxes, description.x_ticks, description.x_label),
        (fig.update_yaxes, description.y_ticks, description.y_label),
    ):
        update(
            title=axis_title,
            tickvals=list(ticks.positions),
            ticktext=list(ticks.labels),
            showgrid=False,
            zeroline=False,
            ticks="",
        )
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain")
    fig.update_xaxes(constrain="domain")
    if description.marks:
        xs, ys = zip(*description.marks)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                name="query patch",
                hoverinfo="skip",
                showlegend=False,
                marker={"symbol": "square-open", "size": 9, "color": MARK_COLOUR, "line": {"width": 2}},
            )
        )
    fig.update_layout(title=description.title)
    return fig


@render_plotly.register
def _(description: OverlayFigure) -> go.Figure:
    image = description.image
    height, width = image.shape[:2]
    gh, gw = description.values.shape
    dy, dx = height / gh, width / gw
    rows, cols = np.meshgrid(np.arange(1, gh + 1), np.arange(1, gw + 1), indexing="ij")
    panels = 2 if description.input_title is not None else 1
    if panels == 2:
        fig = make_subplots(rows=1, cols=2, subplot_titles=(description.input_title, ""), horizontal_spacing=0.02)
        fig.add_trace(picture_trace(image), row=1, col=1)
    else:
        fig = go.Figure()
    heat = go.Heatmap(
        z=description.values,
        x0=(dx - 1) / 2,
        dx=dx,
        y0=(dy - 1) / 2,
        dy=dy,
        zmin=description.vmin,
        zmax=description.vmax,
        colorscale=rgb_colorscale(description.colormap),
        opacity=description.opacity,
        zsmooth="best" if description.smooth else False,
        colorbar={"title": {"text": description.colorbar_label, "side": "right"}},
        customdata=np.stack([rows, cols, description.raw], axis=-1),
        hovertemplate="patch (%{customdata[0]}, %{customdata[1]})<br>value %{customdata[2]:.4g}<extra></extra>",
    )
    where = {"row": 1, "col": 2} if panels == 2 else {}
    for trace in (picture_trace(image), heat):
        fig.add_trace(trace, **where)
    fig.update_xaxes(visible=False, range=[-0.5, width - 0.5])
    fig.update_yaxes(visible=False, range=[height - 0.5, -0.5])
    fig.update_yaxes(scaleanchor="x")
    if panels == 2:
        fig.update_yaxes(scaleanchor="x2", row=1, col=2)
    fig.update_layout(title=description.title, font=_FONT, margin={**_MARGIN, "l": 10})
    return fig


@render_plotly.register
def _(description: DistanceFigure) -> go.Figure:
    pixels = description.pixels
    layers = np.arange(1, pixels.shape[0] + 1)
    fig = go.Figure()
    for head, (label, colour) in enumerate(zip(description.head_labels, description.head_colours)):
        error = None
        if description.std is not None:
            error = {"type": "data", "array": description.std[:, head], "thickness": 1, "width": 0}
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=pixels[:, head],
                mode="markers",
                name=label,
                error_y=error,
                marker={"size": 7, "color": colour},
                hovertemplate=f"layer %{{x}}, {label.lower()}<br>%{{y:.1f}} px<extra></extra>",
            )
        )
    if description.show_mean:
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=pixels.mean(axis=1),
                mode="lines",
                name=description.mean_label,
                line={"color": "black", "width": 2},
                hovertemplate="layer %{x}<br>mean %{y:.1f} px<extra></extra>",
            )
        )
    fig.update_xaxes(
        title=description.x_label,
        tickvals=list(description.x_ticks.positions),
        ticktext=list(description.x_ticks.labels),
        range=[0.4, len(layers) + 0.6],
    )
    fig.update_yaxes(title=description.y_label, range=list(description.y_range))
    fig.update_layout(title=description.title, font=_FONT, margin=_MARGIN, legend={"font": {"size": 10}})
    return fig


@render_plotly.register
def _(description: FiltersFigure) -> go.Figure:
    pictures = description.pictures
    if description.grey:
        pictures = np.repeat(pictures[..., None], 3, axis=3)
    count, ph, pw = pictures.shape[:3]
    ncols = description.ncols
    nrows = math.ceil(count / ncols)
    tiles = np.ones((nrows * ncols, ph, pw, 3))
    tiles[:count] = pictures
    gap = max(2, ph // 3)  # room for the labels between rows
    mosaic = tile_mosaic(tiles.reshape(nrows, ncols, ph, pw, 3), gap=gap, fill=1.0)
    fig = go.Figure(go.Image(z=np.rint(mosaic * 255).astype(np.uint8), hoverinfo="skip"))
    # Every label in one layout update: plotly's add_annotation re-validates the whole list on each call
    # (quadratic in the labels; most of the figure's build time with 28 of them).
    labels = []
    for index, text in enumerate(description.labels):
        row, col = divmod(index, ncols)
        labels.append(
            {
                "x": col * (pw + gap) + (pw - 1) / 2,
                "y": row * (ph + gap) - 0.5,
                "yanchor": "bottom",
                "text": text,
                "showarrow": False,
                "font": {"size": 11},
            }
        )
    fig.update_layout(
        title=description.title, font=_FONT, margin={**_MARGIN, "t": 70}, plot_bgcolor="white", annotations=labels
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, range=[mosaic.shape[0] - 0.5, -gap - 0.5])
    return fig


@render_plotly.register
def _(description: CurvesFigure) -> go.Figure:
    panels = description.panels
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        subplot_titles=[panel.title for panel in panels],
        shared_yaxes=description.share_y,
        horizontal_spacing=0.06 if description.share_y else 0.12,
    )
    for col, panel in enumerate(panels, start=1):
        for series in panel.series:
            mode = "lines+markers" if series.markers else "lines"
            xs = [panel.categories[int(x)] for x in series.xs] if panel.categories is not None else series.xs
            line = {"color": series.colour, "dash": "dash" if series.dashed else "solid"}
            group = {"legendgroup": panel.legend_title, "legendgrouptitle_text": panel.legend_title}
            if series.raw is not None:
                fig.add_trace(
                    go.Scatter(
                        x=xs,
                        y=series.raw,
                        mode=mode,
                        name=f"{series.label} (raw)",
                        line={**line, "width": 1},
                        opacity=0.3,
                        showlegend=False,
                        hoverinfo="skip",
                    ),
                    row=1,
                    col=col,
                )
            scatter = go.Scatter(x=xs, y=series.ys, mode=mode, name=series.label, line=line)
            fig.add_trace(scatter.update(**group) if panel.legend_title else scatter, row=1, col=col)
        fig.update_xaxes(
            title=panel.x_label,
            tickformat=".0%" if panel.x_percent else None,
            range=list(panel.x_range) if panel.x_range else None,
            type="category" if panel.categories is not None else None,
            row=1,
            col=col,
        )
        if col == 1 or not description.share_y:
            fig.update_yaxes(title=panel.y_label, row=1, col=col)
        fig.update_yaxes(
            tickformat=".0%" if panel.percent else None,
            range=list(panel.y_range) if panel.y_range else None,
            row=1,
            col=col,
        )
        if panel.zero_line:
            fig.add_hline(y=0.0, line={"color": "rgb(180, 180, 180)", "width": 1}, row=1, col=col)
        if not panel.series and panel.empty_text:
            axis = "" if col == 1 else str(col)
            fig.add_annotation(
                text=panel.empty_text, x=0.5, y=0.5, xref=f"x{axis} domain", yref=f"y{axis} domain", showarrow=False
            )
        if description.marker is not None:
            fig.add_vline(x=description.marker[0], line=_MARKER_LINE, row=1, col=col)
    if description.marker is not None:  # labelled once, in the first panel
        fig.add_annotation(
            text=description.marker[1],
            x=description.marker[0],
            y=1.0,
            xref="x",
            yref="y domain",
            xanchor="right",
            yanchor="top",
            showarrow=False,
            font={"size": 11, "color": "#555"},
        )
    legend = {"groupclick": "toggleitem", "tracegroupgap": 12} if any(p.legend_title for p in panels) else {}
    fig.update_layout(title=description.title, font=_FONT, margin=_MARGIN, hovermode="x unified", legend=legend)
    return fig


_MARKER_LINE = {"dash": "dot", "color": "#555", "width": 1.5}


@render_plotly.register
def _(description: IntervalsFigure) -> go.Figure:
    panels, count = description.panels, len(description.categories)
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[panel.title for panel in panels])
    positions = np.arange(count, dtype=np.float64)
    for col, panel in enumerate(panels, start=1):
        for offset, series in zip(description.offsets(), panel.series):
            values, lows, highs = (np.asarray(v, dtype=np.float64) for v in (series.values, series.lows, series.highs))
            fig.add_trace(
                go.Scatter(
                    x=positions + offset,
                    y=values,
                    mode="markers",
                    name=series.label,
                    legendgroup=series.label,
                    showlegend=col == 1,
                    marker={"color": series.colour, "size": 8},
                    error_y={
                        "type": "data",
                        "symmetric": False,
                        "array": highs - values,
                        "arrayminus": values - lows,
                        "color": series.colour,
                    },
                    customdata=np.stack([lows, highs], axis=-1),
                    text=list(description.categories),
                    hovertemplate=f"{series.label}, %{{text}}: %{{y:.4f}} "
                    "[%{customdata[0]:.4f}, %{customdata[1]:.4f}]<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(
            tickvals=list(positions), ticktext=list(description.categories), range=[-0.5, count - 0.5], row=1, col=col
        )
        fig.update_yaxes(title=panel.y_label, row=1, col=col)
    fig.update_layout(title=description.title, font=_FONT, margin=_MARGIN)
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

    The same description as `vitviz.plots.faithfulness.curves_figure` draws (`describe_faithfulness_curves`).

    Args:
        deletion, insertion: {method: curve [S+1] or curves [images, S+1]}; several images are averaged. Point i
            is drawn at i/S, the share of patches removed (deletion) or restored (insertion).
    """
    fig = render_plotly(describe_faithfulness_curves(deletion, insertion, title=title))
    # The legend (a deletion and an insertion group, side by side) goes below the axes, across the whole width:
    # on the right it took most of a half-page column and left each panel a few dozen pixels wide. The figure
    # grows with its legend, so that the panels keep their height whatever the number of methods.
    legend_px = 100 + FAITHFULNESS_ROW_PX * max(len(deletion), len(insertion))
    fig.update_layout(
        legend={
            "orientation": "h",
            "x": 0.0,
            "xanchor": "left",
            "yref": "container",
            "y": 0.0,
            "yanchor": "bottom",
            "groupclick": "toggleitem",
            "tracegroupgap": 24,
        },
        margin={**_MARGIN, "b": legend_px},
        height=FAITHFULNESS_PLOT_PX + legend_px,
    )
    return fig


def sanity_curve_figure(
    randomised: Sequence[str],
    spearman: Mapping[str, Sequence[float | None]],
    *,
    title: str | None = "Sanity check: cascading randomisation",
) -> go.Figure:
    """Spearman correlation with the original map after each cascading-randomisation stage, one line per method.

    The same description as `vitviz.plots.faithfulness.sanity_figure` draws; a stage where a map was constant
    (NaN or None) leaves a gap.
    """
    fig = render_plotly(describe_sanity_curve(randomised, spearman, title=title))
    if not title:
        fig.update_layout(margin={**_MARGIN, "t": 20})
    return fig
