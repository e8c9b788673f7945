"""Page `/distance`: mean attention distance per layer and head over many images (paper Fig. 7 right)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from vitviz.errors import VitvizError
from vitviz.pipeline import DISTANCE_MODES, AnalysisOptions, attention_not_applicable
from vitviz.plots import interactive, paper
from vitviz.ui import exports, widgets
from vitviz.ui.analyses import attention_distance

MODE_HELP = (
    "paper: the authors' definition, attention to prefix tokens (e.g. the class token) is dropped without "
    "renormalising. renormalised: each query's attention over the patches is rescaled to sum to 1."
)


def render() -> None:
    selection = widgets.model_sidebar()
    loaded = selection.loaded
    st.title("Mean attention distance")
    st.caption(
        "For every head: how far, in pixels, a patch's attention reaches on average, weighted by the attention "
        "itself. Early layers mix near and far heads; late layers look far (ViT paper, Fig. 7 right)."
    )
    images = widgets.dataset_picker(key="distance")
    if not images:
        return
    unreadable = attention_not_applicable(loaded)
    if unreadable is not None:  # the batch loop would hand back NotApplicable, which the cache cannot store
        st.info(f"Not applicable: {widgets.plain(unreadable.reason)}.")
        return
    mode = st.segmented_control("Mode", DISTANCE_MODES, default="paper", key="distance.mode", help=MODE_HELP) or "paper"

    bar = st.progress(0.0, text=f"Analysing {len(images)} images…")
    try:
        result = attention_distance(
            loaded,
            images,
            AnalysisOptions(distance_mode=mode),
            progress=lambda done, total: bar.progress(done / total, text=f"{done} / {total} images"),
        )
    except VitvizError as exc:
        bar.empty()
        widgets.show_error(exc)
        return
    bar.empty()
    pixels, std, fraction = result.pixels, result.std, result.fraction
    depth, heads = pixels.shape
    width = loaded.meta.input_size[1]

    figure_col, table_col = st.columns([3, 2])
    with figure_col:
        title = f"{len(images)} image{'s' if len(images) != 1 else ''}, mode {mode}"
        widgets.plotly(interactive.distance_figure(pixels, std=std, title=title), key="distance.figure")
    with table_col:
        st.markdown("##### Per layer")
        st.dataframe(
            [
                {
                    "layer": layer + 1,
                    "mean px": round(float(pixels[layer].mean()), 1),
                    "min px": round(float(pixels[layer].min()), 1),
                    "max px": round(float(pixels[layer].max()), 1),
                    "mean % of width": round(100 * float(fraction[layer].mean()), 1),
                }
                for layer in range(depth)
            ],
            hide_index=True,
            width="stretch",
        )
        st.caption(f"Image width {width} px. Error bars: spread (std) over the images.")

    rows = [
        [layer + 1, head + 1, float(pixels[layer, head]), float(std[layer, head]), float(fraction[layer, head])]
        for layer in range(depth)
        for head in range(heads)
    ]
    widgets.downloads(
        selection.entry.key,
        figures={f"attention-distance-{mode}": lambda: paper.distance_figure(pixels, std=std)},
        numbers={
            f"attention-distance-{mode}.csv": lambda: exports.csv_bytes(
                ["layer", "head", "pixels", "std", "fraction_of_width"], rows
            ),
            f"attention-distance-{mode}.npz": lambda: exports.npz_bytes(
                {
                    "pixels": pixels,
                    "std": std,
                    "fraction": fraction,
                    "per_image": result.per_image,
                    "image_names": np.array([image.name for image in images]),
                }
            ),
        },
        key="distance",
    )


if __name__ == "__main__":
    render()
