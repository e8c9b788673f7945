"""Page `/distance`: mean attention distance per layer and head over many images (paper Fig. 7 right).

The images are a sample set, the user's uploads, or a slice of a built-in data set (shapes, digits, the bundled
MNIST test set) streamed through `vitviz.pipeline.dataset_analyses`, as `python -m vitviz analyze --dataset` does.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from vitviz.data.stream import DatasetSlice, dataset_batches, open_dataset
from vitviz.errors import VitvizError
from vitviz.models import LoadedModel
from vitviz.pipeline import DISTANCE_MODES, AnalysisOptions, DistanceResult, attention_not_applicable, dataset_analyses
from vitviz.plots import interactive, paper
from vitviz.ui import exports, widgets
from vitviz.ui.analyses import attention_distance

MODE_HELP = (
    "paper: the authors' definition, attention to prefix tokens (e.g. the class token) is dropped without "
    "renormalising. renormalised: each query's attention over the patches is rescaled to sum to 1."
)
SOURCES = ("Images", "Data set")
PAGE_DATASETS = ("shapes", "digits", "mnist")  # offline, no download: mnist is the bundled test set
SPLITS = ("test", "val", "train")
MAX_LIMIT = 10_000
_MEMO = "distance.dataset.results"  # session memo: (model, data set, split, limit, mode) -> DistanceResult


def _dataset_slice() -> DatasetSlice:
    """The data-set controls: which data set, split and how many of its first images."""
    name_col, split_col, limit_col = st.columns(3)
    with name_col:
        name = st.selectbox("Data set", PAGE_DATASETS, key="distance.dataset.name")
    with split_col:
        split = st.selectbox("Split", SPLITS, key="distance.dataset.split")
    with limit_col:
        limit = st.number_input("First images", 1, MAX_LIMIT, 64, step=16, key="distance.dataset.limit")
    return DatasetSlice(name, split=split, limit=int(limit))


def _dataset_distance(loaded: LoadedModel, slice_: DatasetSlice, mode: str) -> tuple[DistanceResult, list[str]]:
    """The slice's distance through `dataset_analyses` (memoised per session) and its images' names."""
    options = AnalysisOptions(distance_mode=mode)
    key = (loaded.content_hash, slice_.name, slice_.split, slice_.limit, mode)
    memo = st.session_state.setdefault(_MEMO, {})
    if key not in memo:
        meta = loaded.meta
        data = open_dataset(slice_, input_size=meta.input_size, in_chans=meta.in_chans, mean=meta.mean, std=meta.std)
        bar = st.progress(0.0, text=f"Analysing {len(data)} images of {slice_.name} {slice_.split}…")
        done = [0]

        def progress(images: int) -> None:
            done[0] += images
            bar.progress(done[0] / len(data), text=f"{done[0]} / {len(data)} images")

        try:
            results = dataset_analyses(
                loaded, dataset_batches(data, options.batch_size), ["distance"], options, progress=progress
            )
        finally:
            bar.empty()
        if not isinstance(results.distance, DistanceResult):
            raise VitvizError("attention distance does not apply to this model")
        memo.clear()  # one slice at a time: a data-set result holds [L, N, H] numbers
        memo[key] = results.distance
    result = memo[key]
    return result, [slice_.image_name(index) for index in range(result.num_images)]


def render() -> None:
    selection = widgets.model_sidebar()
    loaded = selection.loaded
    st.title("Mean attention distance")
    st.caption(
        "For every head: how far, in pixels, a patch's attention reaches on average, weighted by the attention "
        "itself. Early layers mix near and far heads; late layers look far (ViT paper, Fig. 7 right)."
    )
    source = st.segmented_control(
        "Source",
        SOURCES,
        default="Images",
        key="distance.source",
        help="Images: a sample set or your uploads. Data set: the first images of a built-in data set's split, "
        "preprocessed as the model expects (what `python -m vitviz analyze --dataset` reads).",
    )
    from_dataset = source == "Data set"
    if from_dataset:
        slice_ = _dataset_slice()
    else:
        images = widgets.dataset_picker(key="distance")
        if not images:
            return
    unreadable = attention_not_applicable(loaded)
    if unreadable is not None:  # the batch loop would hand back NotApplicable, which the cache cannot store
        st.info(f"Not applicable: {widgets.plain(unreadable.reason)}.")
        return
    mode = st.segmented_control("Mode", DISTANCE_MODES, default="paper", key="distance.mode", help=MODE_HELP) or "paper"

    if from_dataset:
        try:
            result, names = _dataset_distance(loaded, slice_, mode)
        except VitvizError as exc:
            widgets.show_error(exc)
            return
    else:
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
        names = [image.name for image in images]
    pixels, std, fraction = result.pixels, result.std, result.fraction
    depth, heads = pixels.shape
    width = loaded.meta.input_size[1]

    figure_col, table_col = st.columns([3, 2])
    with figure_col:
        what = f"{slice_.name} {slice_.split}: " if from_dataset else ""
        title = f"{what}{len(names)} image{'s' if len(names) != 1 else ''}, mode {mode}"
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
                    "image_names": np.array(names),
                }
            ),
        },
        key="distance",
    )


if __name__ == "__main__":
    render()
