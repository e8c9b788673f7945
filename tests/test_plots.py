"""Figures: built from small arrays, values checked against the inputs, exported as PNG and SVG."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.image import AxesImage
from PIL import Image

from vitviz.plots import figures, interactive, paper, tile_mosaic

RNG = np.random.default_rng(0)


def tile_region(values: np.ndarray, r: int, c: int, h: int, w: int) -> np.ndarray:
    """Tile (r, c) of a mosaic with 1-pixel gaps, located by hand."""
    return values[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w]


def images_of(ax: matplotlib.axes.Axes) -> list[AxesImage]:
    return [child for child in ax.get_children() if isinstance(child, AxesImage)]


def saved_png_size(fig: matplotlib.figure.Figure, path: Path) -> tuple[int, int]:
    paths = paper.save_figure(fig, path)
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert b"<svg" in paths[1].read_bytes()[:2000]
    with Image.open(paths[0]) as png:
        png.load()
        return png.size


def test_tile_mosaic_places_every_tile_and_leaves_gaps() -> None:
    tiles = RNG.normal(size=(2, 3, 4, 5))
    mosaic = tile_mosaic(tiles)
    assert mosaic.shape == (2 * 4 + 1, 3 * 5 + 2)
    for r in range(2):
        for c in range(3):
            np.testing.assert_array_equal(tile_region(mosaic, r, c, 4, 5), tiles[r, c])
    assert np.isnan(mosaic[4]).all() and np.isnan(mosaic[:, 5]).all() and np.isnan(mosaic[:, 11]).all()


# --- matplotlib (paper) ---------------------------------------------------------------------------


def test_paper_position_similarity_is_one_image_with_the_tiles(tmp_path: Path) -> None:
    gh, gw = 3, 5
    sim = RNG.uniform(-1, 1, size=(gh, gw, gh, gw))
    fig = paper.position_similarity_figure(sim)
    main = fig.axes[0]
    (image,) = images_of(main)  # one image however large the grid
    shown = np.ma.filled(image.get_array().astype(float), np.nan)
    for r in range(gh):
        for c in range(gw):
            np.testing.assert_allclose(tile_region(shown, r, c, gh, gw), sim[r, c])
    assert image.get_clim() == (-1.0, 1.0)
    assert main.get_xlabel() == "Input patch column" and main.get_ylabel() == "Input patch row"
    assert [t.get_text() for t in main.get_yticklabels()] == ["1", "2", "3"]
    assert image.colorbar is not None and image.colorbar.ax.get_ylabel() == "Cosine similarity"
    width, height = saved_png_size(fig, tmp_path / "position")
    assert width > 1.5 * height  # the mosaic is 11 x 29 cells: wide, as the grid


def test_paper_position_figure_stays_one_image_for_a_24x24_grid() -> None:
    sim = RNG.uniform(-1, 1, size=(24, 24, 24, 24)).astype(np.float32)
    fig = paper.position_similarity_figure(sim)
    assert len(fig.axes) == 1 and len(images_of(fig.axes[0])) == 1  # not 576 axes


def test_paper_filters_scaled_per_component_with_ratios(tmp_path: Path) -> None:
    components = RNG.normal(size=(28, 3, 4, 4)) * np.arange(1, 29)[:, None, None, None]
    ratios = np.linspace(0.2, 0.001, 28)
    fig = paper.filters_figure(components, ratios)
    shown = [ax for ax in fig.axes if images_of(ax)]
    assert len(shown) == 28
    for index, ax in enumerate(shown):
        picture = images_of(ax)[0].get_array()
        assert picture.shape == (4, 4, 3)
        assert picture.min() == pytest.approx(0.0) and picture.max() == pytest.approx(1.0)
        np.testing.assert_allclose(picture.transpose(2, 0, 1), _minmax(components[index]))
        assert f"{100 * ratios[index]:.1f}%" in ax.get_title()
    width, height = saved_png_size(fig, tmp_path / "filters")
    assert width > height  # 7 columns x 4 rows

    grey = paper.filters_figure(components[:5, :1], ratios[:5])
    grey_images = [images_of(ax)[0] for ax in grey.axes if images_of(ax)]
    assert len(grey_images) == 5 and grey_images[0].get_cmap().name == "gray"
    assert grey_images[0].get_array().ndim == 2


def _minmax(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min())


def test_paper_distance_scatter_has_one_series_per_head_and_the_mean(tmp_path: Path) -> None:
    pixels = RNG.uniform(5, 100, size=(4, 3))
    fig = paper.distance_figure(pixels, std=np.ones((4, 3)))
    ax = fig.axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["Head 1", "Head 2", "Head 3", "Mean"]
    (mean_line,) = [line for line in ax.get_lines() if line.get_label() == "Mean"]
    np.testing.assert_array_equal(mean_line.get_xdata(), [1, 2, 3, 4])  # depth is 1-based
    np.testing.assert_allclose(mean_line.get_ydata(), pixels.mean(axis=1))
    assert ax.get_xlabel() == "Network depth (layer)"
    assert ax.get_ylabel() == "Mean attention distance (pixels)"
    assert ax.get_ylim()[0] == 0
    assert paper.distance_figure(pixels, ymax=250).axes[0].get_ylim()[1] == 250
    saved_png_size(fig, tmp_path / "distance")


def test_overlay_divides_the_map_by_its_max() -> None:
    image = RNG.integers(0, 256, size=(12, 18, 3), dtype=np.uint8)
    relevance = RNG.uniform(0, 0.01, size=(2, 3))
    np.testing.assert_array_equal(paper.overlay_image(image, relevance), paper.overlay_image(image, relevance * 700.0))
    # Fully opaque grey colour map over a 1 x 2 map at the map's own size: pixels are map / max.
    black = np.zeros((1, 2, 3), np.uint8)
    shown = paper.overlay_image(black, np.array([[0.0, 0.004]]), cmap="gray", alpha=1.0)
    np.testing.assert_array_equal(shown[0, :, 0], [0, 255])


def test_paper_rollout_overlay_side_by_side(tmp_path: Path) -> None:
    image = RNG.integers(0, 256, size=(40, 80, 3), dtype=np.uint8)
    relevance = RNG.uniform(size=(2, 4))
    fig = paper.rollout_overlay_figure(image, relevance, title="Rollout")
    left, right = [ax for ax in fig.axes if images_of(ax)]
    np.testing.assert_array_equal(images_of(left)[0].get_array(), image)
    under, heat = images_of(right)  # the picture, then the map laid over it at token resolution
    np.testing.assert_array_equal(under.get_array(), image)
    np.testing.assert_allclose(heat.get_array(), relevance / relevance.max())
    assert heat.get_alpha() == 0.5 and heat.get_interpolation() == "nearest"
    assert heat.get_extent() == [-0.5, 79.5, 39.5, -0.5]  # stretched over the picture's pixels
    width, height = saved_png_size(fig, tmp_path / "rollout")
    assert width > 2.5 * height  # two 2:1 panels side by side


def test_paper_attention_grid_is_one_image_layers_by_heads(tmp_path: Path) -> None:
    attention = RNG.dirichlet(np.ones(6), size=(2, 4)).reshape(2, 4, 2, 3)
    fig = paper.attention_grid_figure(attention, query=(1, 2))
    (image,) = images_of(fig.axes[0])
    shown = np.ma.filled(image.get_array().astype(float), np.nan)
    np.testing.assert_allclose(tile_region(shown, 1, 3, 2, 3), attention[1, 3])
    assert image.get_clim() == (0.0, pytest.approx(attention.max()))
    per_tile = paper.attention_grid_figure(attention, per_tile=True)
    shown = np.ma.filled(images_of(per_tile.axes[0])[0].get_array().astype(float), np.nan)
    np.testing.assert_allclose(tile_region(shown, 0, 2, 2, 3), attention[0, 2] / attention[0, 2].max())
    width, height = saved_png_size(fig, tmp_path / "grid")
    assert width > height  # 4 heads wide, 2 layers high


def test_save_figure_keeps_dots_in_names_and_builds_no_pyplot_state(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = paper.distance_figure(np.ones((2, 2)))
    paths = paper.save_figure(fig, tmp_path / "nested" / "vit-b.16")
    assert [p.name for p in paths] == ["vit-b.16.png", "vit-b.16.svg"]
    assert plt.get_fignums() == []


# --- plotly (app) ---------------------------------------------------------------------------------


def test_interactive_position_is_one_heatmap_with_hover_coordinates() -> None:
    gh, gw = 3, 4
    sim = RNG.uniform(-1, 1, size=(gh, gw, gh, gw))
    fig = interactive.position_figure(sim, zmin=-0.5, zmax=0.5)
    (trace,) = fig.data
    assert trace.type == "heatmap" and (trace.zmin, trace.zmax) == (-0.5, 0.5)
    z = np.asarray(trace.z, dtype=float)
    custom = np.asarray(trace.customdata)
    for r in range(gh):
        for c in range(gw):
            np.testing.assert_allclose(tile_region(z, r, c, gh, gw), sim[r, c], atol=1e-6)
    # Mosaic cell of query patch (2, 1) and key patch (0, 3), 0-based: hover says 1-based.
    row, col = 2 * (gh + 1) + 0, 1 * (gw + 1) + 3
    assert z[row, col] == pytest.approx(sim[2, 1, 0, 3], abs=1e-6)
    np.testing.assert_array_equal(custom[row, col], [3, 2, 1, 4])
    assert "query patch" in trace.hovertemplate and "key patch" in trace.hovertemplate
    assert list(fig.layout.yaxis.ticktext) == ["1", "2", "3"]


def test_interactive_position_patch_map() -> None:
    sim = RNG.uniform(-1, 1, size=(3, 4, 3, 4))
    fig = interactive.position_patch_figure(sim, 1, 2)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), sim[1, 2])
    assert (fig.data[1].x[0], fig.data[1].y[0]) == (2, 1)


def test_interactive_filters_one_image_scaled_per_component() -> None:
    components = RNG.normal(size=(9, 3, 4, 4))
    fig = interactive.filters_figure(components, np.full(9, 0.05))
    (trace,) = fig.data
    assert trace.type == "image"
    picture = np.asarray(trace.z)
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    first = picture[:4, :4].transpose(2, 0, 1).astype(float)
    np.testing.assert_allclose(first, np.rint(_minmax(components[0]) * 255))
    assert len(fig.layout.annotations) == 9 and "5.0%" in fig.layout.annotations[0].text


def test_interactive_distance_heads_and_mean_line() -> None:
    pixels = RNG.uniform(5, 100, size=(5, 2))
    fig = interactive.distance_figure(pixels, ymax=224)
    assert [trace.name for trace in fig.data] == ["Head 1", "Head 2", "Mean"]
    np.testing.assert_allclose(fig.data[-1].y, pixels.mean(axis=1))
    np.testing.assert_array_equal(fig.data[0].x, [1, 2, 3, 4, 5])
    assert tuple(fig.layout.yaxis.range) == (0, 224)


def test_interactive_explained_variance_curve() -> None:
    ratios = np.array([0.5, 0.2, 0.1])
    fig = interactive.explained_variance_figure(ratios)
    np.testing.assert_allclose(fig.data[1].y, [0.5, 0.7, 0.8])


def test_interactive_rollout_normalises_by_max_and_covers_the_image() -> None:
    image = RNG.integers(0, 256, size=(32, 64, 3), dtype=np.uint8)
    relevance = RNG.uniform(0, 0.02, size=(2, 4))
    fig = interactive.rollout_figure(image, relevance, opacity=0.4)
    picture, heat = fig.data
    assert picture.type == "image" and heat.type == "heatmap" and heat.opacity == 0.4
    assert picture.source.startswith("data:image/png;base64,") and picture.z is None  # pixels as one PNG
    with Image.open(io.BytesIO(base64.b64decode(picture.source.split(",", 1)[1]))) as png:
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), image)
    np.testing.assert_allclose(np.asarray(heat.z), relevance / relevance.max())
    assert (heat.zmin, heat.zmax) == (0.0, 1.0)
    # Cell j spans pixels [16 j, 16 j + 16): its centre is at 16 j + 7.5 in pixel coordinates.
    assert heat.x0 == pytest.approx(7.5) and heat.dx == pytest.approx(16)
    assert heat.y0 == pytest.approx(7.5) and heat.dy == pytest.approx(16)


def test_interactive_attention_grid_is_one_heatmap() -> None:
    attention = RNG.dirichlet(np.ones(4), size=(3, 2)).reshape(3, 2, 2, 2)
    fig = interactive.attention_grid_figure(attention, zmax=0.9)
    (trace,) = fig.data
    z = np.asarray(trace.z, dtype=float)
    np.testing.assert_allclose(tile_region(z, 2, 1, 2, 2), attention[2, 1], atol=1e-6)
    assert trace.zmax == 0.9
    np.testing.assert_array_equal(np.asarray(trace.customdata)[2 * 3 + 1, 1 * 3 + 0], [3, 2, 2, 1])


def test_difference_map_is_centred_at_zero() -> None:
    diff = np.array([[-0.2, 0.1], [0.05, 0.0]])
    trace = interactive.difference_figure(diff).data[0]
    assert (trace.zmin, trace.zmax) == (pytest.approx(-0.2), pytest.approx(0.2))
    shared = interactive.difference_figure(diff, zmax=1.0).data[0]
    assert (shared.zmin, shared.zmax) == (-1.0, 1.0)
    tiles = interactive.difference_figure(RNG.normal(size=(2, 2, 2, 2)))
    assert len(tiles.data) == 1 and tiles.data[0].zmin == -tiles.data[0].zmax


def test_training_curves_split_loss_and_accuracy() -> None:
    records = [
        {"step": 0, "train_loss": 2.0, "lr": 0.1},
        {"step": 10, "train_loss": 1.5, "val_accuracy": 0.4},
        {"epoch": 1, "val_accuracy": 0.5},  # no step: skipped
        {"step": 20, "train_loss": 1.0, "val_accuracy": 0.6},
    ]
    fig = interactive.training_curves_figure(records)
    by_name = {trace.name: trace for trace in fig.data}
    assert set(by_name) == {"train loss (epoch)", "val accuracy"}  # the backend's keys spelled out, others as written
    assert list(by_name["train loss (epoch)"].x) == [0, 10, 20] and list(by_name["val accuracy"].y) == [0.4, 0.6]
    assert by_name["train loss (epoch)"].xaxis != by_name["val accuracy"].xaxis  # separate panels


def test_paper_training_curves_match_the_interactive_series(tmp_path: Path) -> None:
    records = [
        {"kind": "step", "step": 20, "loss": 2.3, "accuracy": 0.1, "lr": 0.001},
        {"kind": "step", "step": 40, "loss": float("nan"), "accuracy": 0.2},  # NaN loss: skipped, accuracy kept
        {"kind": "epoch", "step": 40, "train_loss": 1.9, "eval_accuracy": 0.45},
        {"kind": "step", "step": 60, "loss": 1.7, "accuracy": 0.5},
    ]
    fig = paper.training_curves_figure(records, title="run")
    loss_ax, _ = fig.axes
    lines = {line.get_label(): line for ax in fig.axes for line in ax.lines}
    steps_loss, steps_acc = "train loss (steps)", "train accuracy (steps)"
    assert set(lines) == {steps_loss, steps_acc, "train loss (epoch)", "eval accuracy (epoch)"}  # lr: neither
    assert {line.get_label() for line in loss_ax.lines} == {steps_loss, "train loss (epoch)"}
    assert list(lines[steps_loss].get_xdata()) == [20, 60] and list(lines[steps_loss].get_ydata()) == [2.3, 1.7]
    assert list(lines[steps_acc].get_ydata()) == pytest.approx([0.1, 0.2, 0.5])  # fractions, as in the app...
    assert fig.axes[1].yaxis.get_major_formatter()(0.5, 0) == "50%"  # ...written as percent on the axis
    assert list(lines["eval accuracy (epoch)"].get_xdata()) == [40]
    plotly_fig = interactive.training_curves_figure(records)
    assert {trace.name: list(trace.y) for trace in plotly_fig.data}[steps_acc] == [0.1, 0.2, 0.5]
    assert saved_png_size(fig, tmp_path / "curves")[0] > 600
    empty = paper.training_curves_figure([{"step": 1, "lr": 0.1}])
    assert not any(ax.lines for ax in empty.axes)


def test_training_curves_mark_a_step_in_both_panels_in_both_renderers() -> None:
    """The checkpoint's step (the overview's dotted line) is one vertical line per panel, labelled once, whether
    the curves are drawn with matplotlib (the overview's picture) or with plotly (its interactive chart)."""
    records = [{"step": s, "loss": 2.0 / s, "accuracy": s / 100} for s in range(10, 60, 10)]
    fig = paper.training_curves_figure(records, marker=(30.0, "this checkpoint"))
    for ax in fig.axes:
        verticals = [line for line in ax.lines if list(line.get_xdata()) == [30.0, 30.0]]
        assert len(verticals) == 1 and verticals[0].get_linestyle() == ":"
    assert [t.get_text().strip() for ax in fig.axes for t in ax.texts] == ["this checkpoint"]
    plotly_fig = interactive.training_curves_figure(records, marker=(30.0, "this checkpoint"))
    shapes = [s for s in plotly_fig.layout.shapes if s.x0 == s.x1 == 30.0]
    assert sorted(s.xref for s in shapes) == ["x", "x2"] and all(s.line.dash == "dot" for s in shapes)
    assert [a.text for a in plotly_fig.layout.annotations if a.text == "this checkpoint"] == ["this checkpoint"]
    unmarked = paper.training_curves_figure(records)
    assert not any(list(line.get_xdata()) == [30.0, 30.0] for ax in unmarked.axes for line in ax.lines)


def test_interactive_figures_avoid_streamlits_placeholder_colours() -> None:
    """Streamlit's plotly theme swaps #000001-#000040 for theme colours in the browser; Inferno starts at #000004."""
    import json
    import re

    attention = RNG.dirichlet(np.ones(4), size=(3, 2)).reshape(3, 2, 2, 2)
    figures = [
        interactive.attention_grid_figure(attention, colorscale="Inferno"),
        interactive.position_figure(RNG.uniform(-1, 1, size=(2, 2, 2, 2)), colorscale="Inferno"),
        interactive.rollout_figure(np.zeros((8, 8, 3), np.uint8), RNG.uniform(size=(2, 2)), colorscale="Inferno"),
        interactive.difference_figure(RNG.normal(size=(2, 2))),
    ]
    for fig in figures:
        text = json.dumps(fig.to_plotly_json()["data"], default=str)
        assert not re.search(r"#0000(?!00)[0-9a-fA-F]{2}\b", text)
    assert tuple(figures[0].data[0].colorscale[0]) == (
        0.0,
        "rgb(0, 0, 4)",
    )  # the same colour, written so the theme leaves it alone


# --- one description, two renderers ------------------------------------------------------------------


def _mpl_title(fig: matplotlib.figure.Figure, ax: matplotlib.axes.Axes) -> str:
    return ax.get_title() or (fig._suptitle.get_text() if fig._suptitle else "")


def _colorbar_label(image: AxesImage) -> str:
    return image.colorbar.ax.get_ylabel()


@pytest.mark.parametrize(
    "description",
    [
        figures.describe_position_similarity(RNG.uniform(-1, 1, size=(3, 4, 3, 4)), vmin=-0.5, colormap="cividis"),
        figures.describe_attention_grid(
            RNG.dirichlet(np.ones(4), size=(3, 2)).reshape(3, 2, 2, 2), query=(1, 0), first_layer=2
        ),
        figures.describe_attention_grid(RNG.dirichlet(np.ones(4), size=(2, 2)).reshape(2, 2, 2, 2), per_tile=True),
    ],
    ids=["position", "attention-grid", "attention-grid-per-tile"],
)
def test_a_mosaic_description_is_drawn_alike_by_both_renderers(description: figures.MosaicFigure) -> None:
    drawn, shown = paper.render_matplotlib(description), interactive.render_plotly(description)
    ax = drawn.axes[0]
    (image,) = images_of(ax)
    heat = shown.data[0]
    assert shown.layout.title.text == ax.get_title() == description.title
    assert shown.layout.xaxis.title.text == ax.get_xlabel() == description.x_label
    assert shown.layout.yaxis.title.text == ax.get_ylabel() == description.y_label
    assert (heat.zmin, heat.zmax) == image.get_clim() == (description.vmin, description.vmax)
    assert list(shown.layout.xaxis.ticktext) == [t.get_text() for t in ax.get_xticklabels()]
    assert list(shown.layout.yaxis.ticktext) == [t.get_text() for t in ax.get_yticklabels()]
    np.testing.assert_allclose(shown.layout.yaxis.tickvals, ax.get_yticks())
    assert heat.colorbar.title.text == _colorbar_label(image) == description.colorbar_label
    assert image.get_cmap().name.startswith(description.colormap)
    assert [list(stop) for stop in heat.colorscale] == interactive.rgb_colorscale(description.colormap)
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), description.mosaic, atol=1e-6)
    np.testing.assert_allclose(np.ma.filled(image.get_array().astype(float), np.nan), description.mosaic)
    if description.marks:
        marks = shown.data[1]
        (outline,) = ax.collections
        np.testing.assert_allclose(outline.get_offsets(), np.column_stack([marks.x, marks.y]))
    assert shown.layout.yaxis.ticktext[0] == str(description.row_offset + 1)


@pytest.mark.parametrize("input_title", [None, "Input"])
def test_an_overlay_description_is_drawn_alike_by_both_renderers(input_title: str | None) -> None:
    image = RNG.integers(0, 256, size=(32, 64, 3), dtype=np.uint8)
    description = figures.describe_rollout(
        image, RNG.uniform(size=(2, 4)), title="Rollout: a.png", opacity=0.3, input_title=input_title
    )
    drawn, shown = paper.render_matplotlib(description), interactive.render_plotly(description)
    axes = [ax for ax in drawn.axes if images_of(ax)]
    assert len(axes) == (2 if input_title else 1)
    under, over = images_of(axes[-1])
    heat = next(trace for trace in shown.data if trace.type == "heatmap")
    np.testing.assert_array_equal(under.get_array(), image)
    assert shown.layout.title.text == axes[-1].get_title() == "Rollout: a.png"
    assert (heat.zmin, heat.zmax) == over.get_clim() == (0.0, 1.0)
    assert heat.opacity == over.get_alpha() == 0.3
    assert heat.zsmooth is False and over.get_interpolation() == "nearest"  # token resolution in both
    assert heat.colorbar.title.text == _colorbar_label(over) == "Relevance (÷ max)"
    assert over.get_cmap().name == "viridis" and heat.colorscale[0][1] == "rgb(68, 1, 84)"  # viridis' first stop
    np.testing.assert_allclose(np.asarray(heat.z), over.get_array())
    assert [trace.type for trace in shown.data].count("image") == len(axes)
    if input_title:
        assert axes[0].get_title() == input_title == shown.layout.annotations[0].text
    smooth = figures.describe_rollout(image, RNG.uniform(size=(2, 4)), smooth=True)
    assert interactive.render_plotly(smooth).data[-1].zsmooth == "best"
    assert images_of(paper.render_matplotlib(smooth).axes[0])[1].get_interpolation() == "bilinear"


def test_a_distance_description_is_drawn_alike_by_both_renderers() -> None:
    description = figures.describe_distance(RNG.uniform(5, 100, size=(20, 12)), std=np.ones((20, 12)), title="d")
    drawn, shown = paper.render_matplotlib(description), interactive.render_plotly(description)
    ax = drawn.axes[0]
    assert shown.layout.title.text == ax.get_title() == "d"
    assert shown.layout.xaxis.title.text == ax.get_xlabel() and shown.layout.yaxis.title.text == ax.get_ylabel()
    assert tuple(shown.layout.yaxis.range) == ax.get_ylim() == description.y_range
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert list(shown.layout.xaxis.ticktext) == ticks == [str(i) for i in range(1, 21, 2)]  # 20 layers: thinned
    assert [trace.name for trace in shown.data] == [t.get_text() for t in ax.get_legend().get_texts()]
    colours = [matplotlib.colors.to_hex(c.get_facecolor()[0]) for c in ax.collections if c.get_label().startswith("H")]
    assert colours == [trace.marker.color for trace in shown.data[:-1]] == list(description.head_colours)
    assert len(set(colours)) == 12  # more heads than tab10 has colours: still one each


def test_a_filters_description_is_drawn_alike_by_both_renderers() -> None:
    description = figures.describe_filters(RNG.normal(size=(9, 1, 4, 4)), np.full(9, 0.05), ncols=4)
    drawn, shown = paper.render_matplotlib(description), interactive.render_plotly(description)
    assert (
        shown.layout.title.text == drawn._suptitle.get_text() == "Grey embedding filters (first 9 principal components)"
    )
    titles = [ax.get_title() for ax in drawn.axes if images_of(ax)]
    assert titles == [note.text for note in shown.layout.annotations] == list(description.labels)
    picture = np.asarray(shown.data[0].z)
    np.testing.assert_array_equal(picture[:4, :4, 0], np.rint(description.pictures[0] * 255))
    np.testing.assert_array_equal(images_of(drawn.axes[0])[0].get_array(), description.pictures[0])


def test_a_curves_description_is_drawn_alike_by_both_renderers() -> None:
    records = [{"step": s, "loss": 2.0 / (s + 1), "accuracy": s / 10} for s in range(5)]
    description = figures.describe_training_curves(records, smoothing=0.5, title="run")
    drawn, shown = paper.render_matplotlib(description), interactive.render_plotly(description)
    assert [ax.get_title() for ax in drawn.axes] == [note.text for note in shown.layout.annotations][:2]
    assert drawn._suptitle.get_text() == shown.layout.title.text == "run"
    assert [ax.get_xlabel() for ax in drawn.axes] == [shown.layout.xaxis.title.text, shown.layout.xaxis2.title.text]
    assert [ax.get_ylabel() for ax in drawn.axes] == [shown.layout.yaxis.title.text, shown.layout.yaxis2.title.text]
    assert shown.layout.yaxis2.tickformat == ".0%" and drawn.axes[1].yaxis.get_major_formatter()(0.25, 0) == "25%"
    lines = {line.get_label(): line for ax in drawn.axes for line in ax.lines if not line.get_label().startswith("_")}
    traces = {trace.name: trace for trace in shown.data}
    for label, line in lines.items():
        np.testing.assert_allclose(line.get_ydata(), traces[label].y)  # smoothed the same
        assert matplotlib.colors.to_hex(line.get_color()) == traces[label].line.color
    assert set(traces) - set(lines) == {f"{label} (raw)" for label in lines}  # raw lines drawn faintly in both
    assert sum(len(ax.lines) for ax in drawn.axes) == len(shown.data)


def test_paper_and_app_maps_share_colour_map_and_resolution() -> None:
    """The exports used jet with bilinear smoothing while the app drew viridis blocks: both now draw the latter."""
    image = RNG.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    relevance = RNG.uniform(size=(4, 4))
    exported = images_of(paper.rollout_overlay_figure(image, relevance).axes[1])[1]
    app = interactive.rollout_figure(image, relevance).data[1]
    assert (
        exported.get_cmap().name == "viridis"
        and app.colorscale
        == interactive.render_plotly(figures.describe_rollout(image, relevance, colormap="viridis")).data[1].colorscale
    )
    assert exported.get_interpolation() == "nearest" and app.zsmooth is False
    np.testing.assert_array_equal(  # the blended picture (gallery, faithfulness maps) too: viridis blocks
        paper.overlay_image(image, relevance),
        paper.overlay_image(image, relevance, cmap="viridis", blocks=True),
    )
    assert exported.get_alpha() == app.opacity == 0.5
    # The colour map is a keyword of every exported map (a command-line flag only has to pass it on).
    jet = paper.rollout_overlay_figure(image, relevance, colormap="jet")
    assert images_of(jet.axes[1])[1].get_cmap().name == "jet"
    grid = paper.attention_grid_figure(RNG.uniform(size=(2, 2, 2, 2)), colormap="magma")
    assert images_of(grid.axes[0])[0].get_cmap().name.startswith("magma")
    position = paper.position_similarity_figure(RNG.uniform(size=(2, 2, 2, 2)), colormap="plasma")
    assert images_of(position.axes[0])[0].get_cmap().name.startswith("plasma")
    assert images_of(paper.rollout_overlay_figure(image, relevance, cmap="cividis").axes[1])[1].get_cmap().name == (
        "cividis"
    )


def test_renderers_refuse_what_they_do_not_know() -> None:
    with pytest.raises(TypeError, match="no matplotlib renderer"):
        paper.render_matplotlib(object())
    with pytest.raises(TypeError, match="no plotly renderer"):
        interactive.render_plotly(object())


def test_faithfulness_and_sanity_curves_are_drawn_alike_by_both_renderers() -> None:
    deletion = {"rollout": np.array([[1.0, 0.5, 0.0], [0.8, 0.4, 0.2]]), "random": np.array([1.0, 0.9, 0.5])}
    insertion = {name: curves[..., ::-1] for name, curves in deletion.items()}
    description = figures.describe_faithfulness_curves(deletion, insertion, title="shapes")
    drawn, shown = paper.render_matplotlib(description), interactive.render_plotly(description)
    assert drawn._suptitle.get_text() == shown.layout.title.text == "shapes"
    assert [ax.get_title() for ax in drawn.axes] == [note.text for note in shown.layout.annotations]
    assert [ax.get_xlabel() for ax in drawn.axes] == [shown.layout.xaxis.title.text, shown.layout.xaxis2.title.text]
    assert drawn.axes[0].get_ylabel() == shown.layout.yaxis.title.text == "probability of the target class"
    assert drawn.axes[0].get_ylim() == tuple(shown.layout.yaxis.range) == (-0.02, 1.02)
    assert [ax.get_legend().get_title().get_text() for ax in drawn.axes] == ["Deletion AUC", "Insertion AUC"]
    assert [trace.legendgrouptitle.text for trace in shown.data] == ["Deletion AUC"] * 2 + ["Insertion AUC"] * 2
    drawn_lines = [line for ax in drawn.axes for line in ax.lines]
    assert [line.get_label() for line in drawn_lines] == [trace.name for trace in shown.data]
    assert [line.get_linestyle() == "--" for line in drawn_lines] == [t.line.dash == "dash" for t in shown.data]
    assert [matplotlib.colors.to_hex(line.get_color()) for line in drawn_lines] == [t.line.color for t in shown.data]

    sanity = figures.describe_sanity_curve(["head", "block 1"], {"rollout": [1.0, None], "random": [1.0, 0.9]})
    drawn, shown = paper.render_matplotlib(sanity), interactive.render_plotly(sanity)
    ax = drawn.axes[0]
    assert drawn._suptitle.get_text() == shown.layout.title.text == "Sanity check: cascading randomisation"
    assert [t.get_text() for t in ax.get_xticklabels()] == list(shown.data[0].x) == ["head", "block 1"]
    assert ax.get_ylim() == tuple(shown.layout.yaxis.range) == (-1.05, 1.05)
    assert ax.get_ylabel() == shown.layout.yaxis.title.text and ax.get_xlabel() == shown.layout.xaxis.title.text
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), np.asarray(shown.data[0].y, dtype=float))  # NaN gap
