"""Page `/trust`: which map to trust? Several explanation methods on the same images, side by side, with
their deletion and insertion curves, the AUC table and the cascading-randomisation sanity check.

Every number comes from `vitviz.faithfulness.run_faithfulness` through the disk-cached
`vitviz.ui.analyses.faithfulness`, so the page, `python -m vitviz faithfulness` and `python -m training
evaluate` agree to the last digit on the same images (docs/design.md, "Faithfulness and the Trust page").
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import streamlit as st

from vitviz.errors import VitvizError
from vitviz.faithfulness import FaithfulnessOptions, FaithfulnessResult, MethodResult, default_steps
from vitviz.methods import get_method, method_names
from vitviz.models import LoadedModel
from vitviz.plots import faithfulness as faithfulness_plots
from vitviz.plots import interactive
from vitviz.plots.faithfulness import map_picture
from vitviz.tokens import token_layout
from vitviz.ui import cached, exports, widgets
from vitviz.ui.analyses import display_picture, faithfulness

PAGE_DEFAULT_METHODS = ("rollout", "gradient-rollout", "attention-last", "random")
COSTLY = {
    "integrated-gradients": "integrated gradients runs {ig} to {ig_max} forward and backward passes per image "
    "(doubled until its completeness error is at most 5%)",
    "occlusion": "occlusion runs one forward per patch ({n} here) per image",
}
PREDICTED = -1  # the target selectbox's entry for "each image's predicted class"
DEFAULT_IMAGES = 4
MAPS_SHOWN = 6  # images shown with their maps side by side
COLOUR_MAP = "viridis"  # perceptually uniform, as the rollout page's default
OPACITY = 0.6
MEAN = "mean over the images"


def render() -> None:
    selection = widgets.model_sidebar()
    loaded = selection.loaded
    layout = token_layout(loaded.model)
    num_patches = layout.num_patches
    class_names = list(loaded.meta.class_names)
    st.title("Which map to trust?")
    st.caption(
        "An explanation map ranks the patches. Deletion removes the top-ranked patches first and follows the "
        "probability of the target class: a faithful map makes it fall fast (low area under the curve). Insertion "
        "starts from a blank image and restores the top-ranked patches first: a faithful map makes it rise fast "
        "(high area). The sanity check randomises the model from the head down: a map that does not change is "
        "not explaining this model (Petsiuk et al. 2018; Adebayo et al. 2018)."
    )

    methods = st.multiselect(
        "Methods",
        method_names(),
        default=list(PAGE_DEFAULT_METHODS),
        key="trust.methods",
        help=" ".join(f"{name}: {get_method(name).description}" for name in method_names()),
    )
    steps_col, target_col, sanity_col = st.columns([2, 3, 2], vertical_alignment="bottom")
    steps = int(
        steps_col.number_input(
            "Steps S",
            min_value=1,
            max_value=num_patches,
            value=default_steps(num_patches),
            step=1,
            key="trust.steps",
            help=f"Curve points: step i removes or restores floor(i·n/S) of the n = {num_patches} patches. "
            f"Default min(n, 50). Each image costs 2(S+1) forwards per method.",
        )
    )
    target_choices = [PREDICTED, *range(len(class_names))]
    target = target_col.selectbox(
        "Target class",
        target_choices,
        key=widgets.model_key("trust.target", loaded),
        format_func=lambda i: "each image's prediction" if i == PREDICTED else f"{i}: {class_names[i]}",
        help="The class whose probability the curves follow, and that gradient methods explain.",
    )
    sanity = sanity_col.toggle(
        "Sanity check",
        value=False,
        key="trust.sanity",
        help="Cascading randomisation: recompute every map after randomising the head, then each block from "
        "the last to the first.",
    )
    costly = [m for m in methods if m in COSTLY]
    if costly:
        st.caption(
            "Slow: "
            + "; ".join(
                COSTLY[m].format(
                    ig=FaithfulnessOptions().ig_steps, ig_max=FaithfulnessOptions().ig_max_steps, n=num_patches
                )
                for m in costly
            )
            + ", on top of the curves. Results are cached, so each runs once per image set."
        )

    images = widgets.dataset_picker(key="trust.images", default_count=DEFAULT_IMAGES)
    if not methods:
        st.warning("Choose at least one method above to compare.", icon=":material/info:")
        return
    if not images:
        return

    try:
        options = FaithfulnessOptions(
            methods=tuple(methods),
            steps=steps,
            target_class=None if target == PREDICTED else int(target),
            sanity=sanity,
        )
    except VitvizError as exc:
        widgets.show_error(exc)
        return
    total = len(methods) * len(images)
    bar = st.progress(0.0, text=f"Computing the curves of {len(images)} images…")
    finished: dict[str, int] = {}

    def progress(method: str, done: int) -> None:
        finished[method] = done
        count = sum(finished.values())
        bar.progress(min(count / total, 1.0), text=f"{method}: {done} / {len(images)} images")

    try:
        with st.spinner("Running the methods" + (" and the sanity check…" if sanity else "…")):
            result = faithfulness(loaded, images, options, progress=progress)
    except VitvizError as exc:
        bar.empty()
        widgets.show_error(exc)
        return
    bar.empty()
    pictures = [display_picture(loaded, image) for image in images]
    names = [image.name for image in images]

    _auc_table(result)
    _curves(result, names)
    _maps(result, pictures, names)
    if result.sanity is not None:
        strip = _sanity(result, names)
    else:
        strip = 0
        st.caption("Turn on the sanity check above to see how each map changes as the model is randomised.")
    _downloads(selection.entry.key, loaded, result, pictures, names, strip)


def _auc_table(result: FaithfulnessResult) -> None:
    st.markdown("##### Area under the curves")
    summary = result.summary
    rows = [
        {
            "method": _method_label(name, method),
            "deletion AUC": method.deletion_auc,
            "deletion interval": _interval_text(summary.intervals[name]["deletion"]),
            "insertion AUC": method.insertion_auc,
            "insertion interval": _interval_text(summary.intervals[name]["insertion"]),
            "seconds per image": method.seconds_per_image,
        }
        for name, method in result.methods.items()
    ]
    # The table takes the page's width (six columns did not fit beside the verdicts at 1400 px); verdicts below.
    # Three decimals and short headers keep its six columns within a 1000 px window.
    widgets.table(
        rows,
        column_config={
            "method": st.column_config.TextColumn("method"),
            "deletion AUC": st.column_config.NumberColumn(
                "deletion ↓",
                format="%.3f",
                help="Area under the deletion curve. Lower is better: the prediction falls faster.",
            ),
            "deletion interval": st.column_config.TextColumn(
                "95% CI", help="Paired bootstrap over the images (2,000 resamples, seed 0, percentiles)."
            ),
            "insertion AUC": st.column_config.NumberColumn(
                "insertion ↑",
                format="%.3f",
                help="Area under the insertion curve. Higher is better: the prediction returns faster.",
            ),
            "insertion interval": st.column_config.TextColumn(
                "95% CI ", help="Paired bootstrap over the images (2,000 resamples, seed 0, percentiles)."
            ),
            "seconds per image": st.column_config.NumberColumn(
                "s / image", format="%.2f", help="Wall time of the map and both curves, when computed."
            ),
        },
    )
    images = len(next(iter(result.methods.values())).per_image)
    target = "each image's prediction" if result.target_class is None else f"class {result.target_class}"
    for line in summary.verdict():
        st.markdown(widgets.plain(line))
    if "random" not in result.methods:
        st.markdown("Add `random` to see the baseline every method should beat.")
    st.caption(
        f"Mean over {images} image{'s' if images != 1 else ''}; S = {result.steps} steps; target: {target}; "
        "deleted patches become 0 after normalisation (the model's mean colour). A method is called better "
        "than another only when the 95% paired-bootstrap interval of their per-image difference excludes 0."
    )


def _interval_text(interval: tuple[float, float]) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def _method_label(name: str, method: MethodResult) -> str:
    """The method's name, with "(not converged)" when its maps missed their convergence target."""
    convergence = method.convergence
    return name if convergence is None or convergence.converged else f"{name} (not converged)"


def _curves(result: FaithfulnessResult, names: Sequence[str]) -> None:
    st.markdown("##### Deletion and insertion curves")
    choices = [MEAN, *range(len(names))] if len(names) > 1 else [0]
    which = st.columns([2, 3])[0].selectbox(
        "Curves of",
        choices,
        key="trust.curves.image",
        format_func=lambda c: c if c == MEAN else names[c],
        label_visibility="collapsed" if len(names) == 1 else "visible",
    )
    pick = slice(None) if which == MEAN else slice(int(which), int(which) + 1)
    deletion = {n: np.stack([c.deletion.numpy() for c in m.per_image])[pick] for n, m in result.methods.items()}
    insertion = {n: np.stack([c.insertion.numpy() for c in m.per_image])[pick] for n, m in result.methods.items()}
    widgets.plotly(interactive.faithfulness_curves_figure(deletion, insertion), key="trust.curves")
    st.caption("Random is dashed. Each point is the mean over the images chosen; the legend gives each curve's AUC.")


def _maps(result: FaithfulnessResult, pictures: Sequence[np.ndarray], names: Sequence[str]) -> None:
    st.markdown("##### The maps, side by side")
    methods = list(result.methods)
    shown = min(len(pictures), MAPS_SHOWN)
    header = st.columns(len(methods) + 1)
    header[0].caption("input")
    for col, method in zip(header[1:], methods):
        col.markdown(f"**{method}**")
    for index in range(shown):
        cells = st.columns(len(methods) + 1)
        cells[0].image(_enlarged(pictures[index]), width="stretch")
        cells[0].caption(widgets.plain(names[index]))
        for cell, method in zip(cells[1:], methods):
            curves = result.methods[method].per_image[index]
            cell.image(
                map_picture(pictures[index], curves.map.numpy(), cmap=COLOUR_MAP, alpha=OPACITY), width="stretch"
            )
            convergence = result.methods[method].convergence
            note = "" if convergence is None or convergence.image_converged(index) else " · not converged"
            cell.caption(f"deletion {curves.deletion_auc:.3f} · insertion {curves.insertion_auc:.3f}{note}")
    if len(pictures) > shown:
        st.caption(f"… and {len(pictures) - shown} more images (in the table's means and in the downloads).")
    st.caption(
        "One block per patch, each map divided by its own maximum (yellow = most relevant). The curves use only the "
        "order of the patches; a map with negative values (occlusion) is shifted so its minimum is 0."
    )


def _enlarged(picture: np.ndarray, side: int = 256) -> np.ndarray:
    """The picture enlarged by whole pixels to at least `side`, like the maps beside it."""
    factor = max(1, -(-side // max(picture.shape[:2])))
    return np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1)


def stage_labels(randomised: Sequence[str]) -> list[str]:
    """The randomisation stages as the pages number layers, from 1: ("head", "block 3", ..., "block 0") of a
    4-block model reads ("head", "block 4 (last)", "block 3", "block 2", "block 1 (first)")."""
    indices = [int(s.split(" ")[1]) for s in randomised if s.startswith("block ")]
    last = max(indices, default=0)

    def label(stage: str) -> str:
        if not stage.startswith("block "):
            return stage
        index = int(stage.split(" ")[1])
        where = " (last)" if index == last and last > 0 else " (first)" if index == 0 else ""
        return f"block {index + 1}{where}"

    return [label(stage) for stage in randomised]


def _sanity(result: FaithfulnessResult, names: Sequence[str]) -> int:
    """The Spearman curve and table, and the strip of one image; returns that image's index."""
    assert result.sanity is not None
    st.markdown("##### Sanity check: cascading randomisation")
    first = next(iter(result.sanity.values()))
    stages = stage_labels(first.randomised)
    correlations = {name: list(s.spearman) for name, s in result.sanity.items()}
    curve_col, note_col = st.columns([3, 2])
    with curve_col:
        widgets.plotly(
            interactive.sanity_curve_figure(stages, correlations, title=None), key="trust.sanity.curve", height=380
        )
    with note_col:
        st.info(
            "Randomising the head first, then the blocks from the last to the first, should change a map that "
            "explains the model's decision: its Spearman correlation with the original map should fall. "
            "**Rollout never reads the head, so its first entry is exactly 1 by construction** (so is "
            "attention-last's, and every entry of random's): that is the point of the check. A method whose map "
            "stays put while the model it claims to explain is destroyed is showing the input, not the model.",
            icon=":material/science:",
        )
    widgets.table(  # the page's width: in the note's column the last blocks were cut at the right edge
        [
            {"method": name, **{stage: values[i] for i, stage in enumerate(stages)}}
            for name, values in correlations.items()
        ],
        column_config={stage: st.column_config.NumberColumn(stage, format="%.3f") for stage in stages},
    )
    st.caption("Mean Spearman rank correlation over the images; empty where a map was constant.")

    which = 0
    if len(names) > 1:
        which = st.columns([2, 3])[0].selectbox(
            "Strip of image", range(len(names)), key="trust.sanity.image", format_func=lambda i: names[i]
        )
    originals = {name: method.per_image[which].map.numpy() for name, method in result.methods.items()}
    cells = st.columns(len(stages) + 2)
    cells[0].caption("method")
    cells[1].caption("original")
    for cell, stage in zip(cells[2:], stages):
        cell.caption(stage)
    for name, sanity in result.sanity.items():
        cells = st.columns(len(stages) + 2, vertical_alignment="center")
        cells[0].markdown(f"**{name}**")
        cells[1].image(map_picture(None, originals[name], cmap=COLOUR_MAP, side=96), width="stretch")
        cells[1].caption("the model as trained")
        for stage_index, cell in enumerate(cells[2:]):
            after = sanity.maps[stage_index, which]
            cell.image(map_picture(None, after.numpy(), cmap=COLOUR_MAP, side=96), width="stretch")
            rho = sanity.per_image_spearman[which][stage_index]
            cell.caption("ρ n/a" if not np.isfinite(rho) else f"ρ = {rho:.2f}")
    st.caption(
        f"Each method's map of {widgets.plain(names[which])} after each stage, left to right: more of the model "
        "randomised; each divided by its own maximum, so a nearly flat map looks uniformly bright. ρ: Spearman "
        "with the original map, for this image."
    )
    return int(which)


def _downloads(
    stem: str,
    loaded: LoadedModel,
    result: FaithfulnessResult,
    pictures: Sequence[np.ndarray],
    names: Sequence[str],
    strip: int,
) -> None:
    card = cached.model_card(loaded.source, loaded.content_hash, loaded)
    deletion = {n: np.stack([c.deletion.numpy() for c in m.per_image]) for n, m in result.methods.items()}
    insertion = {n: np.stack([c.insertion.numpy() for c in m.per_image]) for n, m in result.methods.items()}
    target = "predicted" if result.target_class is None else f"class {result.target_class}"
    title = f"{len(names)} image(s), S = {result.steps}, target {target}"
    shown = min(len(pictures), MAPS_SHOWN)
    figures = {
        "faithfulness-curves": lambda: faithfulness_plots.curves_figure(deletion, insertion, title=title),
        "faithfulness-maps": lambda: faithfulness_plots.maps_figure(
            pictures[:shown],
            {n: np.stack([c.map.numpy() for c in m.per_image[:shown]]) for n, m in result.methods.items()},
            names[:shown],
            aucs={
                n: [(c.deletion_auc, c.insertion_auc) for c in m.per_image[:shown]] for n, m in result.methods.items()
            },
            cmap=COLOUR_MAP,
            alpha=OPACITY,
        ),
    }
    if result.sanity is not None:
        sanity = result.sanity
        stages = next(iter(sanity.values())).randomised
        figures["faithfulness-sanity"] = lambda: faithfulness_plots.sanity_figure(
            stages, {n: list(s.spearman) for n, s in sanity.items()}
        )
        figures["faithfulness-sanity-maps"] = lambda: faithfulness_plots.sanity_maps_figure(
            {n: m.per_image[strip].map.numpy() for n, m in result.methods.items()},
            {n: s.maps[:, strip].numpy() for n, s in sanity.items()},
            stages,
            spearman={n: list(s.per_image_spearman[strip]) for n, s in sanity.items()},
            title=f"Maps of {names[strip]} after cascading randomisation",
            cmap=COLOUR_MAP,
        )
    widgets.figure_picker_downloads(
        stem,
        figures=figures,
        numbers={
            # Exactly what `python -m vitviz faithfulness --json OUT` writes for these images.
            "faithfulness.json": lambda: json.dumps(result.to_json(card.model_section())).encode("utf-8"),
            "faithfulness-auc.csv": lambda: _auc_csv(result),
        },
        key="trust",
    )


def _auc_csv(result: FaithfulnessResult) -> bytes:
    """One row per method with the means (image "mean"), then one per method and image."""
    rows: list[list[object]] = [
        [name, "mean", "", method.deletion_auc, method.insertion_auc] for name, method in result.methods.items()
    ]
    rows += [
        [name, curves.image, curves.target_class, curves.deletion_auc, curves.insertion_auc]
        for name, method in result.methods.items()
        for curves in method.per_image
    ]
    return exports.csv_bytes(["method", "image", "target_class", "deletion_auc", "insertion_auc"], rows)


if __name__ == "__main__":
    render()
