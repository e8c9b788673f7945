"""Page `/position`: cosine similarity of the position embeddings (paper Fig. 7 centre), one patch's map,
and the embeddings resampled to a new resolution."""

from __future__ import annotations

import numpy as np
import streamlit as st

from vitviz.errors import VitvizError
from vitviz.pipeline import NotApplicable
from vitviz.plots import interactive
from vitviz.tokens import token_layout
from vitviz.ui import cached, exports, widgets

MAX_SCALE = 2  # resampling choices reach up to this many times the trained grid...
RANGE_FIXED = "−1 … 1"
RANGE_AUTO = "automatic"
MAX_RESAMPLED_SIDE = 24  # ...and at most this many patches per side (a 24x24 mosaic is 360k cells to draw)


def render() -> None:
    selection = widgets.model_sidebar()
    loaded = selection.loaded
    layout = token_layout(loaded.model)
    gh, gw = layout.grid
    st.title("Position embeddings")
    st.caption(
        "Tile (r, c) shows how similar the embedding of patch (r, c) is to the embedding of every patch "
        "(cosine similarity). A model that learned the 2-D layout shows a bright spot that moves with the tile."
    )
    result = cached.position(loaded.content_hash, loaded)
    if isinstance(result, NotApplicable):
        st.info("Not applicable: this model has no absolute position embeddings (none, or a relative-position bias).")
        return
    similarity = result.similarity
    scale = (
        st.segmented_control(
            "Colour range",
            (RANGE_FIXED, RANGE_AUTO),
            default=RANGE_FIXED,
            key="position.range",
            help="−1 … 1 is cosine similarity's whole range; automatic spans this table's smallest to largest "
            "value, so the structure of a table that is nearly all high (e.g. sin-cos) shows.",
        )
        or RANGE_FIXED
    )
    zmin, zmax = (-1.0, 1.0) if scale == RANGE_FIXED else _auto_range(similarity)
    st.caption(
        f"Colour range {zmin:.3f} … {zmax:.3f}; the similarities run from {similarity.min():.3f} to "
        f"{similarity.max():.3f}."
    )

    grid_col, patch_col = st.columns([3, 2])
    with grid_col:
        widgets.plotly(interactive.position_figure(similarity, zmin=zmin, zmax=zmax), key="position.grid")
    with patch_col:
        st.markdown("##### One patch")
        row_key, col_key = widgets.model_key("position.row", loaded), widgets.model_key("position.col", loaded)
        row = st.slider("Patch row", 1, gh, (gh + 1) // 2, key=row_key) if gh > 1 else 1
        col = st.slider("Patch column", 1, gw, (gw + 1) // 2, key=col_key) if gw > 1 else 1
        widgets.plotly(
            interactive.position_patch_figure(similarity, row - 1, col - 1, zmin=zmin, zmax=zmax), key="position.patch"
        )

    st.markdown("##### At another resolution")
    controls_col, resampled_col = st.columns([2, 3])
    with controls_col:
        st.caption(
            "Fine-tuning at a higher resolution keeps the patch size, so the grid grows and the embeddings are "
            "resampled (bicubic in 2-D for learned tables, recomputed for sin-cos, per axis for factorised ones)."
        )
        choices = _grid_choices(gh, gw)
        rows = st.select_slider(
            "New patch grid",
            options=list(choices),
            value=min((r for r in choices if r > gh), default=gh),
            format_func=lambda r: f"{r}×{choices[r]} ({r * layout.stride[0]}×{choices[r] * layout.stride[1]} px)",
            key=widgets.model_key("position.resample", loaded),
        )
    new_grid = (rows, choices[rows])
    new_size = (new_grid[0] * layout.stride[0], new_grid[1] * layout.stride[1])
    resampled = None
    try:
        with st.spinner("Resampling…"):
            outcome = cached.resampled_position(loaded.content_hash, loaded, new_size)
    except VitvizError as exc:
        widgets.show_error(exc, controls_col)
    else:
        if isinstance(outcome.position, NotApplicable):
            controls_col.info("After resampling this model has no absolute position embeddings to compare.")
        else:
            resampled = outcome.position.similarity
            controls_col.caption(
                f"Method: {widgets.plain(outcome.method)}; grid {gh}×{gw} → {new_grid[0]}×{new_grid[1]}."
            )
            with resampled_col:
                widgets.plotly(
                    interactive.position_figure(
                        resampled,
                        title=f"Resampled to {new_grid[0]}×{new_grid[1]}",
                        **(
                            {}
                            if scale == RANGE_FIXED
                            else dict(zip(("zmin", "zmax"), _auto_range(resampled), strict=True))
                        ),
                    ),
                    key="position.resampled",
                )

    figures = {"position-similarity": lambda: exports.paper_figures().position_similarity_figure(similarity)}
    numbers = {
        "position-similarity.csv": lambda: exports.matrix_csv_bytes(
            similarity.reshape(gh * gw, gh * gw), "patch", [f"patch_{i + 1}" for i in range(gh * gw)]
        ),
        "position-similarity.npz": lambda: exports.npz_bytes(_arrays(similarity, resampled)),
    }
    if resampled is not None:
        figures["position-similarity-resampled"] = lambda: exports.paper_figures().position_similarity_figure(
            resampled, title=f"Position embedding similarity, resampled to {new_grid[0]}×{new_grid[1]}"
        )
    widgets.downloads(selection.entry.key, figures=figures, numbers=numbers, key="position")


def _auto_range(values: np.ndarray) -> tuple[float, float]:
    """The table's own smallest and largest value (a tiny span when it is constant)."""
    low, high = float(np.min(values)), float(np.max(values))
    return low, high if high > low else low + 1e-6


def _grid_choices(gh: int, gw: int) -> dict[int, int]:
    """New grids with the trained aspect ratio, as rows -> columns, from half to MAX_SCALE times the trained size."""
    top = max(gh + 1, min(MAX_SCALE * gh, MAX_RESAMPLED_SIDE))
    return {rows: max(1, round(rows * gw / gh)) for rows in range(max(1, gh // 2), top + 1)}


def _arrays(similarity: np.ndarray, resampled: np.ndarray | None) -> dict[str, np.ndarray]:
    arrays = {"similarity": similarity}
    if resampled is not None:
        arrays["similarity_resampled"] = resampled
    return arrays


if __name__ == "__main__":
    render()
