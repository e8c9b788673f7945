"""Page `/filters`: raw patch-embedding filters and their top-k principal components (paper Fig. 7 left)."""

from __future__ import annotations

import math

import numpy as np
import streamlit as st

from vitviz.pipeline import NotApplicable, scaled_for_display
from vitviz.plots import interactive, tile_mosaic
from vitviz.ui import cached, exports, widgets

RAW_FILTERS_SHOWN = 64
RAW_COLUMNS = 16
RAW_MOSAIC_WIDTH = 900  # pixels the raw-filter picture is enlarged to, at most


def render() -> None:
    selection = widgets.model_sidebar()
    loaded = selection.loaded
    st.title("Patch-embedding filters")
    st.caption(
        "Each token starts as a linear projection of one image patch. The projection's rows are filters over "
        "pixels; their principal components show the basis the model learned (ViT paper, Fig. 7 left)."
    )
    result = cached.filters(loaded.content_hash, loaded)
    if isinstance(result, NotApplicable):
        st.info(f"Not applicable to this model: {widgets.plain(result.reason)}.")
        return
    weight, components, ratio = result.weight, result.components, result.explained_variance_ratio
    max_k = len(ratio)
    k = st.slider(
        "Principal components shown", 1, min(max_k, 64), min(28, max_k), key=widgets.model_key("filters.k", loaded)
    )

    left, right = st.columns([3, 2])
    with left:
        widgets.plotly(interactive.filters_figure(components[:k], ratio[:k], max_components=k), key="filters.pca")
    with right:
        st.markdown("##### Explained variance")
        widgets.plotly(interactive.explained_variance_figure(ratio[: max(k, min(max_k, 64))]), key="filters.variance")
        st.caption(
            f"The first {k} components explain {100 * float(ratio[:k].sum()):.1f} % of the variance "
            f"of the {weight.shape[0]} filters ({weight.shape[1]}×{weight.shape[2]}×{weight.shape[3]} each)."
        )

    shown = min(RAW_FILTERS_SHOWN, weight.shape[0])
    st.markdown(f"##### Raw filters (first {shown} of {weight.shape[0]}, each scaled to its own range)")
    st.image(_raw_mosaic(weight[:shown]))

    widgets.downloads(
        selection.entry.key,
        figures={
            "filters": lambda: exports.paper_figures().filters_figure(components[:k], ratio[:k], max_components=k)
        },
        numbers={
            "explained-variance.csv": lambda: exports.matrix_csv_bytes(
                np.stack([ratio, np.cumsum(ratio)], axis=1), "component", ["explained_variance_ratio", "cumulative"]
            ),
            "filters.npz": lambda: exports.npz_bytes(
                {"components": components[:k], "explained_variance_ratio": ratio, "raw_filters": weight}
            ),
        },
        key="filters",
    )


def _raw_mosaic(weight: np.ndarray) -> np.ndarray:
    """Filters [n, C, P, P] as one picture, each min-max scaled on its own (grey for non-RGB inputs)."""
    scaled = scaled_for_display(weight)
    pictures = (
        scaled.transpose(0, 2, 3, 1) if scaled.shape[1] == 3 else scaled.mean(axis=1)[..., None].repeat(3, axis=3)
    )
    count, ph, pw, _ = pictures.shape
    columns = min(RAW_COLUMNS, count)
    rows = math.ceil(count / columns)
    tiles = np.ones((rows * columns, ph, pw, 3))
    tiles[:count] = pictures
    gap = max(1, ph // 8)
    mosaic = tile_mosaic(tiles.reshape(rows, columns, ph, pw, 3), gap=gap, fill=1.0)
    # Enlarged here with nearest-neighbour: a browser would blur tiny filters when scaling them up.
    factor = max(1, RAW_MOSAIC_WIDTH // mosaic.shape[1])
    return np.rint(mosaic * 255).astype(np.uint8).repeat(factor, axis=0).repeat(factor, axis=1)


if __name__ == "__main__":
    render()
