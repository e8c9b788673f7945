"""Page `/rollout`: attention rollout and gradient rollout on the user's images, the top-5 predictions,
and where one query token attends in every layer and head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import streamlit as st
from PIL import Image

from vitviz.errors import VitvizError
from vitviz.models import LoadedModel
from vitviz.pipeline import HEAD_FUSIONS, AnalysisOptions, GradientRolloutResult, QueryAttentionResult, TopK
from vitviz.plots import interactive
from vitviz.tokens import token_layout
from vitviz.ui import exports, widgets
from vitviz.ui.analyses import InputImage, display_picture, gradient_map, image_attention

if TYPE_CHECKING:
    from streamlit.delta_generator import DeltaGenerator

GALLERY_MAX = 8  # uploads shown as small overlays side by side
CLASS_TOKEN = "class token"
OVERLAY_HEIGHT = 380  # pixels: the overlays are square, so the default plotly height leaves a gap above
INPUT_HEIGHT = 330  # the input has no colour bar, so it is drawn a little smaller to line up with the overlays
THUMBNAIL_SIDE = 320  # longer side of a gallery picture, in pixels
SCALE_MAX = "own maximum"  # each map ÷ its maximum
SCALE_SHARED = "shared"  # one absolute scale for every map
GRID_MAX_LAYERS = 12  # the layers x heads view draws at most this many layers at once (a slider picks which)


@dataclass(frozen=True)
class Controls:
    """What the page's controls ask for: the rollout's options and how its maps are drawn."""

    options: AnalysisOptions
    colorscale: str
    opacity: float
    absolute: bool  # one shared absolute colour scale instead of each map ÷ its maximum


@dataclass(frozen=True)
class QueryView:
    """The layers x heads attention of one query token, as drawn."""

    grid: np.ndarray
    index: int
    label: str
    patch: tuple[int, int] | None
    per_tile: bool


def render() -> None:
    selection = widgets.model_sidebar()
    loaded = selection.loaded
    class_names = loaded.meta.class_names
    st.title("Attention rollout")
    st.caption(
        "Rollout multiplies the attention of every layer (with the residual path) to see which patches the "
        "class token draws on (Abnar & Zuidema 2020). Gradient rollout weights attention by its effect on one "
        "class's score (Chefer et al. 2021)."
    )
    images, from_uploads = widgets.image_picker(key="rollout.images")
    if not images:
        return
    image = _chosen_image(images)
    controls, class_col = _controls(loaded)
    try:
        with st.spinner("Running the model…"):
            attention = image_attention(loaded, image, controls.options, query_index=0)
    except VitvizError as exc:
        widgets.show_error(exc)
        return
    picture = display_picture(loaded, image)
    rollout_map = attention.rollout.map
    gallery = _gallery_maps(loaded, images, controls.options) if from_uploads and len(images) > 1 else {}
    shared_top = max([float(rollout_map.max())] + [float(m.max()) for m in gallery.values() if m is not None])
    top5 = attention.top5
    target = _target_class(class_col, loaded, top5[0].index if class_names else 0, image)

    gradient = _maps_row(loaded, image, picture, rollout_map, target, controls, shared_top)
    _top5_table(top5)
    widgets.prediction_context(loaded, image)
    if from_uploads and len(images) > 1:
        _gallery(
            images,
            gallery,
            colorscale=controls.colorscale,
            opacity=controls.opacity,
            vmax=shared_top if controls.absolute else None,
        )
    query = _query_view(loaded, image, controls.options, attention.query)
    if query is None:
        return
    _downloads(
        selection.entry.key, image, picture, rollout_map, attention.probabilities, top5, gradient, query, controls
    )


def _chosen_image(images: list[InputImage]) -> InputImage:
    """The image to explain: the only one, or the one picked from several."""
    if len(images) == 1:
        return images[0]
    index = st.selectbox(
        "Image to explain", range(len(images)), format_func=lambda i: images[i].name, key="rollout.which"
    )
    return images[index]


def _controls(loaded: LoadedModel) -> tuple[Controls, DeltaGenerator]:
    """The rollout's options and drawing controls, in two rows; also the column kept for the gradient's class."""
    depth = len(loaded.model.blocks)
    fusion_col, discard_col, start_col, class_col = st.columns([2, 2, 2, 3])
    head_fusion = fusion_col.selectbox("Head fusion", HEAD_FUSIONS, key="rollout.fusion")
    discard_ratio = discard_col.slider(
        "Discard ratio",
        0.0,
        0.95,
        0.0,
        0.05,
        key="rollout.discard",
        help="Share of the weakest attention links set to zero in each layer before rolling out.",
    )
    start_layer = (
        start_col.slider(
            "Start layer",
            1,
            depth,
            1,
            key=widgets.model_key("rollout.start", loaded),
            help="First layer multiplied in.",
        )
        - 1
        if depth > 1
        else 0
    )
    cmap_col, scale_col, opacity_col = st.columns([2, 4, 3])
    colorscale = cmap_col.selectbox(
        "Colour map",
        interactive.ROLLOUT_COLOURSCALES,
        key="rollout.cmap",
        help="Viridis, Inferno and Cividis are perceptually uniform: equal steps in value look like equal steps "
        "in colour. Jet is offered for comparison with older papers.",
    )
    scale = (
        scale_col.segmented_control(
            "Colour scale",
            (SCALE_MAX, SCALE_SHARED),
            default=SCALE_MAX,
            key="rollout.scale",
            help="Each map ÷ its own maximum shows where it is highest. The shared absolute scale draws the raw "
            "values of every rollout map on this page on one scale, 0 to the largest of them, so maps can be compared.",
        )
        or SCALE_MAX
    )
    opacity = opacity_col.slider("Overlay opacity", 0.1, 1.0, 0.6, 0.05, key="rollout.opacity")
    options = AnalysisOptions(head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer)
    return Controls(options, colorscale, opacity, absolute=scale == SCALE_SHARED), class_col


def _target_class(class_col: DeltaGenerator, loaded: LoadedModel, predicted: int, image: InputImage) -> int | None:
    """The class gradient rollout explains, the prediction unless another is picked; None without a head.

    Keyed by the model and the image: a choice made for one model's classes never carries over to another's."""
    class_names = loaded.meta.class_names
    if not class_names:
        return None
    return class_col.selectbox(
        "Gradient rollout for class",
        range(len(class_names)),
        index=predicted,
        format_func=lambda i: f"{class_names[i]}{' (predicted)' if i == predicted else ''}",
        key=widgets.model_key(f"rollout.target.{image.digest[:12]}", loaded),
        help="Chefer et al.'s rollout weights attention by the gradient of this class's score.",
    )


def _maps_row(
    loaded: LoadedModel,
    image: InputImage,
    picture: np.ndarray,
    rollout_map: np.ndarray,
    target: int | None,
    controls: Controls,
    shared_top: float,
) -> GradientRolloutResult | None:
    """The input, its rollout overlay and its gradient rollout side by side; the gradient rollout, if made.

    The rollout overlay and the predictions go to the browser first; the backward pass of gradient rollout
    runs after them, so a new upload shows its overlay without waiting for the gradient."""
    opacity, colorscale, absolute = controls.opacity, controls.colorscale, controls.absolute
    input_col, overlay_col, gradient_col = st.columns([3, 4, 4])
    with input_col:
        st.markdown("##### Input")
        widgets.plotly(interactive.image_figure(picture), key="rollout.input", height=INPUT_HEIGHT)
        st.caption(
            f"Input: {widgets.plain(image.name)}, as the model sees it ({picture.shape[1]}×{picture.shape[0]} px)"
        )
    with overlay_col:
        st.markdown("##### Attention rollout")
        widgets.plotly(
            interactive.rollout_figure(
                picture,
                rollout_map,
                opacity=opacity,
                colorscale=colorscale,
                absolute=absolute,
                zmax=shared_top if absolute else None,
            ),
            key="rollout.overlay",
            height=OVERLAY_HEIGHT,
        )
        _range_note(rollout_map, absolute)
    gradient: GradientRolloutResult | None = None
    with gradient_col:
        st.markdown("##### Gradient rollout")
        if target is None:
            st.caption("Not available: the model has no classifier head.")
        else:
            try:
                with st.spinner("Back-propagating…"):
                    gradient = gradient_map(loaded, image, int(target))
            except VitvizError as exc:
                widgets.show_error(exc)
        if gradient is not None:
            widgets.plotly(
                interactive.rollout_figure(
                    picture, gradient.map, opacity=opacity, colorscale=colorscale, absolute=absolute
                ),
                key="rollout.gradient",
                height=OVERLAY_HEIGHT,
            )
            _range_note(gradient.map, absolute)
    return gradient


def _top5_table(top5: TopK) -> None:
    st.markdown("##### Top-5 predictions")
    widgets.table(
        [{"probability": p.probability, "class": p.name} for p in top5],
        column_config={
            "probability": st.column_config.NumberColumn("probability", format="percent", width="small"),
            "class": st.column_config.TextColumn("class", width="large"),
        },
    )


def _query_view(
    loaded: LoadedModel, image: InputImage, options: AnalysisOptions, query: QueryAttentionResult
) -> QueryView | None:
    """Where one query token attends in every layer and head: its controls and its tiles (None if it failed).

    `query` is the class token's attention, which the rollout's forward already captured."""
    layout = token_layout(loaded.model)
    depth = len(loaded.model.blocks)
    st.markdown("##### Where one token attends, in every layer and head")
    st.caption(
        "A model view for image patches, like bertviz's for text: rows are layers, columns are heads, and "
        "each tile shows the attention of the chosen query token over the patches."
    )
    kind_col, row_col, col_col, scale_col, layers_col = st.columns([2, 2, 2, 3, 2], vertical_alignment="bottom")
    query_choices = ([CLASS_TOKEN] if layout.has_class_token else []) + ["a patch"]
    query_kind = kind_col.radio(
        "Query token", query_choices, key=widgets.model_key("rollout.query.kind", loaded), horizontal=True
    )
    query_index, query_label, query_patch = 0, CLASS_TOKEN, None
    if query_kind == "a patch":
        gh, gw = layout.grid
        row_key, col_key = (
            widgets.model_key("rollout.query.row", loaded),
            widgets.model_key("rollout.query.col", loaded),
        )
        row = row_col.slider("Patch row", 1, gh, (gh + 1) // 2, key=row_key) if gh > 1 else 1
        col = col_col.slider("Patch column", 1, gw, (gw + 1) // 2, key=col_key) if gw > 1 else 1
        query_patch = (row - 1, col - 1)
        query_index = layout.num_prefix_tokens + query_patch[0] * gw + query_patch[1]
        query_label = f"patch ({row}, {col})"
    first, last = _layers_shown(layers_col, loaded)
    per_tile = scale_col.toggle(
        "Scale per tile",
        value=True,
        key="rollout.query.per_tile",
        help="On: each tile is scaled to its own maximum, so it shows where that head looks. Off: one scale for "
        "all tiles, so strong and weak heads can be told apart.",
    )
    if query_index != query.query_index:
        try:
            query = image_attention(loaded, image, options, query_index=query_index).query
        except VitvizError as exc:
            widgets.show_error(exc)
            return None
    grid = query.grid
    shown = f", layers {first}–{last} of {depth}" if (first, last) != (1, depth) else ""
    widgets.plotly(
        interactive.attention_grid_figure(
            grid[first - 1 : last],
            per_tile=per_tile,
            title=f"Attention of the {query_label}{shown}",
            query=query_patch,
            first_layer=first - 1,
        ),
        key="rollout.grid",
        stretch=False,
    )
    return QueryView(grid, query_index, query_label, query_patch, per_tile)


def _layers_shown(layers_col: DeltaGenerator, loaded: LoadedModel) -> tuple[int, int]:
    """The first and last layer (from 1) of the tiles: all of them, or a slice of a deep model's."""
    depth = len(loaded.model.blocks)
    first, last = 1, depth
    if depth > GRID_MAX_LAYERS:  # a deep model: a slice of layers at a time keeps the tiles readable
        first, last = layers_col.slider(
            "Layers shown",
            1,
            depth,
            (1, GRID_MAX_LAYERS),
            key=widgets.model_key("rollout.query.layers", loaded),
            help=f"At most {GRID_MAX_LAYERS} layers are drawn at once, so each tile stays large enough to read.",
        )
        if last - first + 1 > GRID_MAX_LAYERS:
            last = first + GRID_MAX_LAYERS - 1
            layers_col.caption(f"Showing layers {first}–{last} (at most {GRID_MAX_LAYERS} at once).")
    return first, last


def _downloads(
    model_key: str,
    image: InputImage,
    picture: np.ndarray,
    rollout_map: np.ndarray,
    probabilities: np.ndarray,
    top5: TopK,
    gradient: GradientRolloutResult | None,
    query: QueryView,
    controls: Controls,
) -> None:
    """The page's figures (rendered when clicked) and numbers for download."""
    opacity, cmap = controls.opacity, controls.colorscale.lower()
    figures = {
        "rollout": lambda: exports.paper_figures().rollout_overlay_figure(
            picture, rollout_map, alpha=opacity, cmap=cmap
        ),
        "attention-grid": lambda: exports.paper_figures().attention_grid_figure(
            query.grid, query=query.patch, per_tile=query.per_tile, title=f"Attention of the {query.label}"
        ),
    }
    arrays = {
        "rollout": rollout_map,
        "probabilities": probabilities,
        "query_attention": query.grid,
        "query_index": np.asarray(query.index),
    }
    if gradient is not None:
        figures["gradient-rollout"] = lambda: exports.paper_figures().rollout_overlay_figure(
            picture, gradient.map, title="Gradient-weighted rollout", alpha=opacity, cmap=cmap
        )
        arrays["gradient_rollout"] = gradient.map
        arrays["gradient_target_class"] = np.asarray(gradient.target_class)
    widgets.downloads(
        f"{model_key}-{image.name}",
        figures=figures,
        numbers={
            "top5.csv": lambda: exports.csv_bytes(
                ["class_index", "class", "probability"], [(p.index, p.name, p.probability) for p in top5]
            ),
            "rollout.npz": lambda: exports.npz_bytes(arrays),
        },
        key="rollout",
    )


def _range_note(values: np.ndarray, absolute: bool) -> None:
    """The map's raw range, and a warning when it is nearly flat (see interactive.relative_spread)."""
    low, high = float(np.min(values)), float(np.max(values))
    spread = interactive.relative_spread(values)
    st.caption(f"Raw values {low:.3g} … {high:.3g}; (max − min) / max = {100 * spread:.1f} %.")
    if spread < interactive.FLAT_SPREAD:
        scaled = "" if absolute else " Divided by its maximum it fills the colour scale anyway."
        st.warning(
            f"Nearly flat: the values differ by less than {100 * interactive.FLAT_SPREAD:.0f} % of the largest."
            + scaled,
            icon=":material/info:",
        )


def _gallery_maps(
    loaded: LoadedModel, images: list[InputImage], options: AnalysisOptions
) -> dict[str, np.ndarray | None]:
    """The rollout map of each upload shown in the gallery (None where the analysis failed)."""
    maps: dict[str, np.ndarray | None] = {}
    for image in images[:GALLERY_MAX]:
        try:
            maps[image.digest] = image_attention(loaded, image, options, query_index=0).rollout.map
        except VitvizError as exc:
            widgets.show_error(exc)
            maps[image.digest] = None
    return maps


def _gallery(
    images: list[InputImage],
    maps: dict[str, np.ndarray | None],
    *,
    colorscale: str,
    opacity: float,
    vmax: float | None,
) -> None:
    """Small rollout overlays of every upload in its own aspect ratio, one block per token."""
    st.markdown("##### All uploads")
    shown = images[:GALLERY_MAX]
    columns = st.columns(min(4, len(shown)))
    for index, image in enumerate(shown):
        relevance = maps.get(image.digest)
        if relevance is None:
            continue
        with columns[index % len(columns)]:
            pixels = _thumbnail(image.pixels)
            st.image(
                exports.paper_figures().overlay_image(
                    pixels, relevance, cmap=colorscale.lower(), alpha=opacity, blocks=True, vmax=vmax
                ),
                width="stretch",
                output_format="PNG",  # lossless: JPEG would blur the token blocks' edges
            )
            st.caption(widgets.plain(image.name))
    if len(images) > GALLERY_MAX:
        st.caption(f"… and {len(images) - GALLERY_MAX} more (choose one above).")


def _thumbnail(pixels: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """The picture with its longer side at most `side` pixels, aspect ratio kept."""
    height, width = pixels.shape[:2]
    factor = side / max(height, width)
    if factor >= 1:
        return pixels
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize(size, Image.Resampling.BILINEAR))


if __name__ == "__main__":
    render()
