"""Page `/compare`: two or more checkpoints, every analysis side by side on the same inputs, shared colour
scales, difference maps where the patch grids match, overlaid distance curves, each model's deletion and
insertion AUCs (through `vitviz.ui.analyses.faithfulness`, as /trust), what changed between two of them on a
data-set slice (`vitviz.ui.analyses.comparison`, as `python -m vitviz compare`) and a table of numbers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import streamlit as st

from vitviz.comparison import DEFAULT_METHODS as CHANGED_METHODS
from vitviz.comparison import Comparison, work
from vitviz.data.stream import DatasetSlice
from vitviz.errors import VitvizError
from vitviz.faithfulness import METHODS, FaithfulnessOptions, FaithfulnessResult
from vitviz.models import LoadedModel
from vitviz.pipeline import AnalysisOptions, DistanceResult, NotApplicable, map_differences
from vitviz.plots import comparison as comparison_plots
from vitviz.plots import faithfulness as faithfulness_plots
from vitviz.plots import interactive, paper, scale_by_max
from vitviz.ui import cached, catalog, exports, keys, widgets
from vitviz.ui.analyses import (
    attention_distance,
    comparison,
    display_picture,
    faithfulness,
    gradient_map,
    image_attention,
    model_aucs,
)
from vitviz.ui.catalog import ModelEntry

if TYPE_CHECKING:
    from matplotlib.figure import Figure  # made only when a download is clicked

FILTER_COMPONENTS = 16
DISTANCE_IMAGES = 16
FAITHFULNESS_IMAGES = 4
FAITHFULNESS_METHODS = ("rollout", "gradient-rollout", "attention-last", "random")  # /trust's default
# Comparisons of the bundled checkpoints, offered as one click each when all of their checkpoints are there.
# The ablation runs share the default's data, steps and model except for the one thing named.
READY_MADE: dict[str, tuple[str, ...]] = {
    "Early vs late": ("shapes-default-epoch-001", "shapes-default-epoch-002", "shapes-default"),
    "Position embeddings": ("shapes-default", "shapes-2d", "shapes-sincos", "shapes-nopos"),
    "ViT vs hybrid": ("shapes-default", "shapes-hybrid"),
    "Default vs registers": ("shapes-default", "shapes-reg4"),
    "Base vs fine-tuned": ("shapes-default", "shapes-finetune-hires"),
    # One task, three strategies: the default and what fine-tuning it onto MNIST digits made of it.
    "Linear vs LoRA vs full": (
        "shapes-default",
        "shapes-to-mnist-linear",
        "shapes-to-mnist-lora",
        "shapes-to-mnist-full",
    ),
}


# Tab label -> how the names of its figures end (None: every figure).
TAB_FIGURES: dict[str, tuple[str, ...] | None] = {
    "Summary": None,
    "Filters": ("filters",),
    "Position embeddings": ("position similarity",),
    "Attention distance": ("attention distance",),
    "Rollout": ("rollout",),
    "Faithfulness": ("faithfulness",),
    "What changed": ("linear CKA", "distance shift", "map differences", "AUC intervals"),
}
POSITION_FIXED = "−1 … 1"
POSITION_AUTO = "automatic"
FIGURE_HEIGHT = 380  # pixels: the filter and position mosaics of 3-4 models stay legible


@dataclass(frozen=True)
class Compared:
    """One model on the page, with a short name used in headers, tables and file names."""

    name: str
    entry: ModelEntry
    loaded: LoadedModel


def render() -> None:
    selection = widgets.model_sidebar()
    st.title("Compare models")
    st.caption(
        "Early vs late checkpoints, 1-D vs 2-D position embeddings, base vs fine-tuned, ViT vs hybrid: "
        "every analysis on the same inputs, with one colour scale per analysis."
    )
    models = _choose_models(selection.entry.key)
    if len(models) < 2:
        st.info("Choose at least two models to compare.")
        return

    tabs = st.tabs(list(TAB_FIGURES), key=keys.COMPARE_TAB, on_change="rerun")
    summary_tab, filters_tab, position_tab, distance_tab, rollout_tab, faithfulness_tab, changed_tab = tabs
    open_tab = next((label for label, tab in zip(TAB_FIGURES, tabs) if tab.open), "Summary")
    figures: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    rows = {m.name: _card(m) for m in models}
    # Every tab computes its numbers (the summary shows them), but only the open tab draws its charts: a closed
    # tab's charts would be built, sent and drawn by the browser for nothing, and opening a tab reruns the page.
    with filters_tab:
        _filters(models, rows, figures, arrays, shown=open_tab == "Filters")
    with position_tab:
        _position(models, figures, arrays, shown=open_tab == "Position embeddings")
    with distance_tab:
        _distance(models, rows, figures, arrays, shown=open_tab == "Attention distance")
    with rollout_tab:
        _rollout(models, rows, figures, arrays, shown=open_tab == "Rollout")
    if faithfulness_tab.open:  # 2(S+1) forwards per image, method and model: computed only when asked for
        with faithfulness_tab:
            _faithfulness(models, rows, figures, arrays)
    if changed_tab.open:  # three passes over a data-set slice: computed only when asked for
        with changed_tab:
            _what_changed(models, figures, arrays)
    with summary_tab:
        widgets.table(_transposed(rows, short=True), column_config=_model_columns(models))
        st.caption(
            "Accuracy is what the checkpoint's training recorded; the rest is measured here on the inputs "
            "chosen in the other tabs."
        )

    table = list(rows.values())
    columns = list(dict.fromkeys(k for row in table for k in row))
    shown = TAB_FIGURES[open_tab]  # the picker offers the open tab's figures (all of them on the summary)
    widgets.figure_picker_downloads(
        "compare",
        figures={name: make for name, make in figures.items() if shown is None or name.endswith(shown)},
        numbers={
            "summary.csv": lambda: exports.csv_bytes(columns, [[row.get(c, "") for c in columns] for row in table]),
            "compare.npz": lambda: exports.npz_bytes(arrays),
        },
        key="compare",
    )


def _choose_models(selected: str) -> list[Compared]:
    """The models to compare, kept in the URL (?compare=a&compare=b) like the sidebar's selection."""
    entries = catalog.discover_models()
    if not st.session_state.get(keys.COMPARE_ADOPTED):
        st.session_state[keys.COMPARE_ADOPTED] = True
        wanted = [catalog.resolve_key(k, entries) for k in st.query_params.get_all(keys.QUERY_COMPARE)]
        added = st.session_state.get(keys.EXTRA_MODELS, {})
        # A Hub model is compared only once the user has loaded it: a link alone downloads nothing.
        found = [e for e in wanted if e is not None and (e.kind != catalog.HF or e.key in added)]
        for entry in found:
            if entry.key not in {e.key for e in entries}:
                st.session_state.setdefault(keys.EXTRA_MODELS, {})[entry.key] = entry
        if found:
            st.session_state[keys.COMPARE] = [e.key for e in found]
    offers = _offers(entries)
    _ready_made(offers)
    default = st.session_state.get(keys.COMPARE)
    if not default:
        # The first bundled comparison the sidebar's model is part of, else that model and one other.
        default = next((chosen for chosen in offers.values() if selected in chosen), None)
        if default is None:
            others = [e.key for e in entries if e.key != selected and e.kind == catalog.BUNDLED]
            others += [e.key for e in entries if e.key != selected and e.key not in others]
            default = [selected, *others[:1]]
    chosen = widgets.model_choices(
        "Models",
        key=keys.COMPARE_WIDGET,
        default=default,
        help="The first model is the reference: difference maps show each other model minus it.",
    )
    st.session_state[keys.COMPARE] = [e.key for e in chosen]
    st.query_params[keys.QUERY_COMPARE] = [e.key for e in chosen]
    models = []
    for index, entry in enumerate(chosen):
        try:
            with st.spinner("Loading models…"):
                loaded = widgets.load(entry)
        except VitvizError as exc:
            widgets.show_error(exc)
            continue
        models.append(Compared(name=f"{chr(ord('A') + index)}", entry=entry, loaded=loaded))
    if models:
        st.caption("  ·  ".join(f"**{m.name}**: {widgets.plain(m.entry.label)}" for m in models))
    return models


def _offers(entries: list[ModelEntry]) -> dict[str, list[str]]:
    """The ready-made comparisons whose bundled checkpoints are all present, as model keys."""
    present = {e.key for e in entries if e.kind == catalog.BUNDLED}
    return {
        label: [f"{catalog.BUNDLED}:{stem}" for stem in stems]
        for label, stems in READY_MADE.items()
        if all(f"{catalog.BUNDLED}:{stem}" in present for stem in stems)
    }


def _ready_made(offers: dict[str, list[str]]) -> None:
    """One button per ready-made comparison; a click picks its checkpoints."""
    if not offers:
        return
    with st.container(horizontal=True, wrap=True, gap="small", vertical_alignment="center"):
        st.caption("Bundled comparisons", width="content")
        for index, (label, chosen) in enumerate(offers.items()):
            st.button(label, key=f"compare.ready.{index}", on_click=_choose, args=(chosen,), width="content")


def _choose(chosen: list[str]) -> None:
    """Button callback: runs before the page, so the multiselect can still be given its new value."""
    st.session_state[keys.COMPARE] = list(chosen)
    st.session_state[keys.COMPARE_WIDGET] = list(chosen)


def _header(model: Compared) -> str:
    return f"**{model.name}** · {widgets.plain(model.entry.label)}"


def _card(model: Compared) -> dict[str, Any]:
    """The summary table's column for one model, from its model card (its accuracy read by `vitviz.card`)."""
    from vitviz.card import recorded_accuracy

    loaded = model.loaded
    card = cached.model_card(loaded.source, loaded.content_hash, loaded)
    accuracy = recorded_accuracy(card.training)
    cfg = card.config
    return {
        "model": model.name,
        "checkpoint": model.entry.label,
        "parameters (M)": round(card.parameters / 1e6, 3),
        "layers": card.depth,
        "heads": card.num_heads,
        "width": card.embed_dim,
        "input px": f"{card.img_size[0]}×{card.img_size[1]}",
        "grid": f"{card.grid[0]}×{card.grid[1]}",
        "prefix tokens": card.num_prefix_tokens,
        "position embedding": cfg["pos_embed"] if cfg is not None else "timm",
        "stem": cfg["stem"] if cfg is not None else "timm",
        "recorded accuracy": None if accuracy is None else round(accuracy, 4),
    }


def _columns(models: list[Compared]) -> list[Any]:
    """One column per model up to three; four or more go two to a row, so no figure is squeezed."""
    per_row = len(models) if len(models) <= 3 else 2
    columns: list[Any] = []
    while len(columns) < len(models):
        columns += st.columns(per_row)
    return columns[: len(models)]


def _filters(models: list[Compared], rows: dict[str, dict], figures: dict, arrays: dict, *, shown: bool) -> None:
    cumulative = {}
    for column, model in zip(_columns(models), models):
        with column:
            st.markdown(_header(model))
            result = cached.filters(model.loaded.content_hash, model.loaded)
            if isinstance(result, NotApplicable):
                st.info(f"No pixel-space filters: {widgets.plain(result.reason)}.")
                continue
            k = min(FILTER_COMPONENTS, len(result.explained_variance_ratio))
            components, ratio = result.components[:k], result.explained_variance_ratio
            _chart(
                shown,
                interactive.filters_figure,
                components,
                ratio[:k],
                ncols=4,
                max_components=k,
                title=" ",
                key=f"compare.filters.{model.name}",
                height=FIGURE_HEIGHT,
            )
            cumulative[model.name] = np.cumsum(ratio)
            rows[model.name]["PC1 variance %"] = round(100 * float(ratio[0]), 1)
            rows[model.name][f"top-{k} variance %"] = round(100 * float(ratio[:k].sum()), 1)
            figures[f"{model.name} filters"] = _bind(paper.filters_figure, components, ratio[:k], max_components=k)
            arrays[f"{model.name}_filter_components"] = components
            arrays[f"{model.name}_explained_variance_ratio"] = ratio
    if cumulative:
        st.markdown("##### Cumulative explained variance")
        _chart(
            shown,
            interactive.comparison_curves_figure,
            {name: values[:64] for name, values in cumulative.items()},
            x_title="Principal component",
            y_title="Cumulative explained variance",
            y_format=".0%",
            key="compare.filters.cumulative",
            height=340,
        )


def _position(models: list[Compared], figures: dict, arrays: dict, *, shown: bool) -> None:
    results = {m.name: cached.position(m.loaded.content_hash, m.loaded) for m in models}
    similarities = {name: r.similarity for name, r in results.items() if not isinstance(r, NotApplicable)}
    scale = (
        st.segmented_control(
            "Colour range",
            (POSITION_FIXED, POSITION_AUTO),
            default=POSITION_FIXED,
            key="compare.position.range",
            help="−1 … 1 is cosine similarity's whole range; automatic spans the smallest to the largest value "
            "of the models shown, so the structure of a table that is nearly all high (e.g. sin-cos) shows.",
        )
        or POSITION_FIXED
    )
    zmin, zmax = -1.0, 1.0
    if scale == POSITION_AUTO and similarities:
        zmin = min(float(v.min()) for v in similarities.values())
        zmax = max(float(v.max()) for v in similarities.values())
        zmax = zmax if zmax > zmin else zmin + 1e-6
    st.caption(f"Colour range {zmin:.3f} … {zmax:.3f}, shared by every model: one colour bar, at the last map.")
    last_with_map = next((m.name for m in reversed(models) if m.name in similarities), None)
    for column, model in zip(_columns(models), models):
        with column:
            st.markdown(_header(model))
            if model.name not in similarities:
                st.info("No absolute position embeddings.")
                continue
            similarity = similarities[model.name]
            _chart(
                shown,
                _position_chart,
                similarity,
                zmin=zmin,
                zmax=zmax,
                scale_bar=model.name == last_with_map,
                key=f"compare.position.{model.name}",
                height=FIGURE_HEIGHT,
            )
            figures[f"{model.name} position similarity"] = _bind(paper.position_similarity_figure, similarity)
            arrays[f"{model.name}_position_similarity"] = similarity
    _differences(similarities, "position similarity", figures, arrays, key="position", shown=shown)


def _position_chart(similarity: np.ndarray, *, zmin: float, zmax: float, scale_bar: bool) -> Any:
    """One model's similarity mosaic; the scale is shared, so only one map carries a (narrow) colour bar and the
    others use their column's whole width."""
    fig = interactive.position_figure(similarity, title=" ", zmin=zmin, zmax=zmax)
    fig.update_traces(showscale=scale_bar, colorbar={"thickness": 12}, selector={"type": "heatmap"})
    return fig


def _differences(maps: dict[str, np.ndarray], what: str, figures: dict, arrays: dict, *, key: str, shown: bool) -> None:
    """Draws `vitviz.pipeline.map_differences`: each model minus the reference (the first with a map), on one
    shared scale; a model whose patch grid differs was resampled (bilinear) to the reference's grid, and the page
    says so."""
    found = map_differences(maps)
    if found is None:
        return
    reference_name, grid, limit = found.reference, found.grid, found.limit
    pairs = {name: difference.values for name, difference in found.differences.items()}
    notes = [f"{name} resampled from {gh}×{gw} to {grid[0]}×{grid[1]}" for name, (gh, gw) in found.resampled.items()]
    st.markdown(f"##### Differences in {what}: each model − {reference_name}")
    if notes:
        st.caption(
            f"The patch grids differ: {'; '.join(notes)} (bilinear) to match {reference_name} before subtracting."
        )
    st.caption(f"Shared scale −{limit:.3g} … {limit:.3g}; red: higher than {reference_name}, blue: lower.")
    for column, (name, difference) in zip(_columns_for(len(pairs)), pairs.items()):
        with column:
            st.markdown(f"**{name} − {reference_name}**")
            _chart(
                shown,
                interactive.difference_figure,
                difference,
                zmax=limit,
                key=f"compare.diff.{key}.{name}",
                height=FIGURE_HEIGHT,
            )
            arrays[f"{name}_minus_{reference_name}_{key}"] = difference


def _columns_for(count: int) -> list[Any]:
    columns = st.columns(max(2, min(3, count)))
    return [columns[i % len(columns)] for i in range(count)]


def _distance(models: list[Compared], rows: dict[str, dict], figures: dict, arrays: dict, *, shown: bool) -> None:
    images = widgets.dataset_picker(key="compare.distance", default_count=DISTANCE_IMAGES)
    if not images:
        return
    mode = (
        st.segmented_control("Mode", ("paper", "renormalised"), default="paper", key="compare.distance.mode") or "paper"
    )
    bar = st.progress(0.0, text="Measuring attention distance…")
    results: dict[str, DistanceResult] = {}
    for index, model in enumerate(models):

        def report(done: int, total: int, index: int = index) -> None:
            bar.progress(
                (index + done / total) / len(models),
                text=f"model {index + 1} of {len(models)}: {done} / {total} images",
            )

        try:
            results[model.name] = attention_distance(
                model.loaded, images, AnalysisOptions(distance_mode=mode), progress=report
            )
        except VitvizError as exc:
            widgets.show_error(exc)
    bar.empty()
    if not results:
        return
    top = max(float(r.pixels.max()) for r in results.values()) * 1.08
    for column, model in zip(_columns(models), models):
        if model.name not in results:
            continue
        pixels, std = results[model.name].pixels, results[model.name].std
        with column:
            st.markdown(_header(model))
            _chart(shown, interactive.distance_figure, pixels, std=std, ymax=top, key=f"compare.distance.{model.name}")
        rows[model.name]["distance layer 1 (px)"] = round(float(pixels[0].mean()), 1)
        rows[model.name]["distance last layer (px)"] = round(float(pixels[-1].mean()), 1)
        rows[model.name]["distance last layer (% width)"] = round(
            100 * float(results[model.name].fraction[-1].mean()), 1
        )
        figures[f"{model.name} attention distance"] = _bind(paper.distance_figure, pixels, std=std, ymax=top)
        arrays[f"{model.name}_distance_pixels"] = pixels
        arrays[f"{model.name}_distance_std"] = std
    st.markdown("##### Mean over heads, per layer")
    unit = (
        st.segmented_control("Unit", ("pixels", "% of image width"), default="pixels", key="compare.distance.unit")
        or "pixels"
    )
    per_layer = {
        name: (r.pixels if unit == "pixels" else 100.0 * r.fraction).mean(axis=1) for name, r in results.items()
    }
    _chart(
        shown,
        interactive.comparison_curves_figure,
        per_layer,
        x_title="Layer",
        y_title=f"Mean attention distance ({unit})",
        key="compare.distance.curves",
        height=340,
    )
    st.caption(f"{len(images)} images, mode {mode}.")


def _rollout(models: list[Compared], rows: dict[str, dict], figures: dict, arrays: dict, *, shown: bool) -> None:
    images, _ = widgets.image_picker(key="compare.rollout")
    if not images:
        return
    image = images[0]
    if len(images) > 1:
        st.caption(f"Comparing on the first upload, {widgets.plain(image.name)}.")
    rollouts: dict[str, np.ndarray] = {}
    gradients: dict[str, np.ndarray] = {}
    for column, model in zip(_columns(models), models):
        with column:
            st.markdown(_header(model))
            try:
                result = image_attention(model.loaded, image, AnalysisOptions(), query_index=0)
                gradient = gradient_map(model.loaded, image, None) if model.loaded.meta.class_names else None
            except VitvizError as exc:
                widgets.show_error(exc)
                continue
            picture = display_picture(model.loaded, image)
            rollout_map = result.rollout.map
            if len(result.top5):
                best = result.top5[0]
                st.caption(f"Predicts {widgets.plain(best.name)} ({100 * best.probability:.1f} %)")
                widgets.prediction_context(model.loaded, image)
                rows[model.name]["prediction"] = best.name
                rows[model.name]["probability"] = round(best.probability, 4)
            _chart(
                shown,
                interactive.rollout_figure,
                picture,
                rollout_map,
                title="Attention rollout",
                key=f"compare.rollout.{model.name}",
            )
            rollouts[model.name] = scale_by_max(rollout_map)
            figures[f"{model.name} rollout"] = _bind(paper.rollout_overlay_figure, picture, rollout_map)
            arrays[f"{model.name}_rollout"] = rollout_map
            if gradient is not None:
                _chart(
                    shown,
                    interactive.rollout_figure,
                    picture,
                    gradient.map,
                    title="Gradient rollout (predicted class)",
                    key=f"compare.gradient.{model.name}",
                )
                gradients[model.name] = scale_by_max(np.clip(gradient.map, 0, None))
                figures[f"{model.name} gradient rollout"] = _bind(
                    paper.rollout_overlay_figure, picture, gradient.map, title="Gradient-weighted rollout"
                )
                arrays[f"{model.name}_gradient_rollout"] = gradient.map
    _differences(rollouts, "rollout, each map ÷ its maximum", figures, arrays, key="rollout", shown=shown)
    _differences(gradients, "gradient rollout, each map ÷ its maximum", figures, arrays, key="gradient", shown=shown)


def _interval_text(interval: tuple[float, float]) -> str:
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def _faithfulness(models: list[Compared], rows: dict[str, dict], figures: dict, arrays: dict) -> None:
    """Each model's deletion and insertion AUCs of the chosen methods on the same images, from the cached
    `vitviz.ui.analyses.faithfulness` (the numbers of /trust and `python -m vitviz faithfulness`)."""
    st.caption(
        "Deletion removes each map's top-ranked patches first (a faithful map makes the target class's probability "
        "fall fast: low AUC); insertion restores them into a blank image (it should rise fast: high AUC). Each model "
        "explains its own prediction; S = min(patches, 50) for each model, as on /trust (Petsiuk et al. 2018)."
    )
    methods = st.multiselect("Methods", METHODS, default=list(FAITHFULNESS_METHODS), key="compare.faithfulness.methods")
    images = widgets.dataset_picker(key="compare.faithfulness", default_count=FAITHFULNESS_IMAGES)
    if not methods:
        st.warning("Choose at least one method above to compare.", icon=":material/info:")
        return
    if not images:
        return
    options = FaithfulnessOptions(methods=tuple(methods))
    bar = st.progress(0.0, text="Computing the curves…")
    results: dict[str, FaithfulnessResult] = {}
    for index, model in enumerate(models):

        def report(method: str, done: int, index: int = index) -> None:
            bar.progress(
                min((index + done / len(images)) / len(models), 1.0),
                text=f"model {index + 1} of {len(models)}, {method}: {done} / {len(images)} images",
            )

        try:
            results[model.name] = faithfulness(model.loaded, images, options, progress=report)
        except VitvizError as exc:
            widgets.show_error(exc)
    bar.empty()
    if not results:
        return
    table = [
        {
            "model": name,
            "method": method,
            "deletion AUC": values.deletion_auc,
            "deletion interval": _interval_text(result.summary.intervals[method]["deletion"]),
            "insertion AUC": values.insertion_auc,
            "insertion interval": _interval_text(result.summary.intervals[method]["insertion"]),
            "steps S": result.steps,
        }
        for name, result in results.items()
        for method, values in result.methods.items()
    ]
    st.markdown("##### Area under the curves, per model")
    widgets.table(
        table,
        column_config={
            "deletion AUC": st.column_config.NumberColumn(
                "deletion AUC ↓", format="%.4f", help="Lower is better: the prediction falls faster."
            ),
            "insertion AUC": st.column_config.NumberColumn(
                "insertion AUC ↑", format="%.4f", help="Higher is better: the prediction returns faster."
            ),
        },
    )
    for name, result in results.items():
        st.caption(f"**{widgets.plain(name)}**: " + " ".join(widgets.plain(line) for line in result.summary.verdict()))
        for method, values in result.methods.items():
            rows[name][f"{method} deletion AUC"] = round(values.deletion_auc, 4)
            rows[name][f"{method} insertion AUC"] = round(values.insertion_auc, 4)
    st.caption(
        f"Mean over {len(images)} image{'s' if len(images) != 1 else ''}; each model's predicted class. Intervals: "
        "95% paired bootstrap over the images; a method is called better only when the interval of its per-image "
        "difference excludes 0."
    )
    for model in models:  # one model per row: two panels and their legend need the page's width
        if model.name not in results:
            continue
        result = results[model.name]
        deletion = {n: np.stack([c.deletion.numpy() for c in m.per_image]) for n, m in result.methods.items()}
        insertion = {n: np.stack([c.insertion.numpy() for c in m.per_image]) for n, m in result.methods.items()}
        st.markdown(_header(model))
        widgets.plotly(
            interactive.faithfulness_curves_figure(deletion, insertion),
            key=f"compare.faithfulness.{model.name}",
        )
        title = f"{model.name}: {len(images)} image(s), S = {result.steps}"
        figures[f"{model.name} faithfulness"] = _bind(
            faithfulness_plots.curves_figure, deletion, insertion, title=title
        )
        for method in result.methods:
            arrays[f"{model.name}_{method}_deletion"] = deletion[method]
            arrays[f"{model.name}_{method}_insertion"] = insertion[method]


CHANGED_DATASETS = ("shapes", "digits", "mnist")  # offline, no download: mnist is the bundled test set


def _what_changed(models: list[Compared], figures: dict, arrays: dict) -> None:
    """Two of the chosen models on a data-set slice through the cached `vitviz.ui.analyses.comparison` (the numbers
    of `python -m vitviz compare A B --dataset ...`): linear CKA, predictions, distance shift, mean-map differences."""
    names = [m.name for m in models]
    pick_a, pick_b, batch_col = st.columns(3)
    with pick_a:
        first = st.selectbox("Model A", names, index=0, key="compare.changed.a")
    with pick_b:
        second = st.selectbox("Model B", names, index=1, key="compare.changed.b")
    with batch_col:
        batch = st.number_input("Minibatch b", 4, 256, 16, key="compare.changed.batch", help="CKA's minibatch")
    name_col, split_col, limit_col = st.columns(3)
    with name_col:
        dataset = st.selectbox("Data set", CHANGED_DATASETS, key="compare.changed.dataset")
    with split_col:
        split = st.text_input(
            "Split",
            "test",
            key="compare.changed.split",
            help="test, val or train, or a slice of one as the command line takes it: test[8000:] (MNIST's digits "
            "no bundled fine-tune trained on).",
        ).strip()
    with limit_col:
        limit = st.number_input("First images", 4, 10_000, 64, step=16, key="compare.changed.limit")
    methods = st.multiselect(
        "Deletion and insertion AUCs of",
        METHODS,
        default=list(CHANGED_METHODS),
        key="compare.changed.methods",
        help="Each model's AUCs of these map methods on the same images, and B − A per method; none: no curves "
        "(2(S+1) forwards per image, method and model).",
    )
    model_a, model_b = (next(m for m in models if m.name == n) for n in (first, second))
    chosen = DatasetSlice(dataset, split=split, limit=int(limit))
    # The comparison first, drawn as soon as it is there; the AUCs (the slow part) after it, model by model.
    result = _with_progress(
        "Comparing…",
        work(int(limit)),
        lambda progress: comparison(
            model_a.loaded, model_b.loaded, chosen, AnalysisOptions(batch_size=int(batch)), progress=progress
        ),
    )
    if result is None:
        return
    st.caption(f"**A** = {first}, **B** = {second}; {result.num_images} images of {dataset} {split}.")
    _changed_cka(result, figures, arrays)
    _changed_predictions(result)
    _changed_distance(result, figures, arrays)
    _changed_maps(result, figures, arrays)
    if not methods:
        return
    options = FaithfulnessOptions(methods=tuple(methods))
    aucs = _with_progress(
        "Deletion and insertion curves…",
        work(int(limit), methods) - work(int(limit)),
        lambda progress: [model_aucs(m.loaded, chosen, options, int(batch), progress) for m in (model_a, model_b)],
    )
    if aucs is not None:
        _changed_aucs(result.with_aucs(*aucs), figures, arrays)


def _with_progress(text: str, total: int, compute: Callable[[Callable[[int], None]], Any]) -> Any:
    """`compute(progress)` under a progress bar of `total` units (gone when it is done); None after showing a
    one-line error."""
    bar = st.progress(0.0, text=text)
    done = [0]

    def progress(units: int) -> None:
        done[0] += units
        bar.progress(min(done[0] / max(total, 1), 1.0), text=f"{text} {done[0]} / {total} image passes")

    try:
        return compute(progress)
    except VitvizError as exc:
        widgets.show_error(exc)
        return None
    finally:
        bar.empty()


def _changed_cka(result: Comparison, figures: dict, arrays: dict) -> None:
    st.markdown("##### Linear CKA, every block of A with every block of B")
    cka = result.pairs.get("cka")
    if cka is None or isinstance(cka, NotApplicable):
        st.info(f"Linear CKA does not apply: {widgets.plain(cka.reason if cka else 'not computed')}.")
        return
    widgets.plotly(comparison_plots.cka_heatmap(cka.matrix), key="compare.changed.cka", height=FIGURE_HEIGHT)
    st.caption(
        f"Minibatches of b = {cka.batch_size}; {cka.num_images} images"
        + (f", the last {cka.dropped_images} dropped (fewer than 4)." if cka.dropped_images else ".")
    )
    figures["A vs B linear CKA"] = _bind(comparison_plots.cka_figure, cka.matrix)
    arrays["cka"] = cka.matrix


def _changed_predictions(result: Comparison) -> None:
    agreement, accuracy = result.agreement(), {side: result.accuracy(side) for side in ("a", "b")}
    columns = st.columns(3)
    for column, (label, value) in zip(
        columns, (("Agreement", agreement), ("Accuracy A", accuracy["a"]), ("Accuracy B", accuracy["b"]))
    ):
        with column:
            st.metric(label, "—" if value is None else f"{100 * value:.1f} %")
    if accuracy["a"] is None or accuracy["b"] is None:
        st.caption("Accuracy is given for a model whose classes are the data set's.")


def _changed_distance(result: Comparison, figures: dict, arrays: dict) -> None:
    st.markdown("##### Mean attention distance, B − A")
    shift, why = result.distance_shift()
    if shift is None:
        st.caption(f"No shift: {widgets.plain(why or '')}.")
        per_layer = {
            n: d.mean(axis=1) for n, d in (("A", result.a.distance), ("B", result.b.distance)) if not isinstance(d, str)
        }
        if per_layer:
            widgets.plotly(
                interactive.comparison_curves_figure(per_layer, x_title="Layer", y_title="Mean distance (px)"),
                key="compare.changed.distance",
                height=340,
            )
        return
    widgets.plotly(
        interactive.comparison_curves_figure(
            {"B − A, mean over heads": shift.mean(axis=1)}, x_title="Layer", y_title="Distance shift (px)"
        ),
        key="compare.changed.distance",
        height=340,
    )
    figures["A vs B distance shift"] = _bind(comparison_plots.distance_shift_figure, shift)
    arrays["distance_shift"] = shift


def _changed_maps(result: Comparison, figures: dict, arrays: dict) -> None:
    maps: dict[str, np.ndarray] = {}
    for column, (which, title) in zip(st.columns(2), (("rollout", "Rollout"), ("gradient", "Gradient rollout"))):
        with column:
            st.markdown(f"**{title}, mean map B − A** (each ÷ its maximum)")
            found = result.map_difference(which)
            if isinstance(found, str):
                st.info(widgets.plain(found))
                continue
            difference = found.differences["B"]
            if difference.resampled_from is not None:
                gh, gw = difference.resampled_from
                st.caption(f"B resampled from {gh}×{gw} to A's {found.grid[0]}×{found.grid[1]} (bilinear).")
            widgets.plotly(
                interactive.difference_figure(difference.values),
                key=f"compare.changed.{which}",
                height=FIGURE_HEIGHT,
            )
            maps[f"{title}, B − A"] = difference.values
            arrays[f"{which}_difference"] = difference.values
    if maps:
        limit = max(float(np.abs(v).max()) for v in maps.values()) or 1e-12
        figures["A vs B map differences"] = _bind(comparison_plots.difference_maps_figure, maps, limit)


def _changed_aucs(result: Comparison, figures: dict, arrays: dict) -> None:
    """Both models' AUCs with their intervals and B − A per method and curve, with the verdict of its interval."""
    a, b = result.a.aucs, result.b.aucs
    if a is None or b is None:
        return
    st.markdown("##### Deletion and insertion AUCs, B − A")
    points, differences = result.auc_points(), result.auc_differences()
    table = []
    for method, found in differences.items():
        for curve in ("deletion", "insertion"):
            row: dict[str, Any] = {"method": method, "curve": curve}
            for side in ("A", "B"):
                auc, low, high = points[side].get(curve, {}).get(method, (None, None, None))
                row[side] = auc
                row[f"{side} interval"] = "—" if auc is None else _interval_text((low, high))
            if isinstance(found, str):
                row.update({"B − A": None, "B − A interval": "—", "verdict": f"not compared: {found}"})
            else:
                difference = found[curve]
                row["B − A"] = difference.difference
                row["B − A interval"] = _interval_text(difference.interval)
                row["verdict"] = "not told apart" if difference.better is None else f"{difference.better} better"
            table.append(row)
    number = {"format": "%.4f"}
    widgets.table(
        table,
        column_config={
            "A": st.column_config.NumberColumn("A AUC", **number),
            "B": st.column_config.NumberColumn("B AUC", **number),
            "B − A": st.column_config.NumberColumn("B − A", **number),
        },
    )
    st.caption(
        f"Mean over the {result.num_images} images, each model explaining its own prediction; "
        f"S = {a.steps or '—'} for A, {b.steps or '—'} for B. Intervals: 95% paired bootstrap over the images; "
        "B − A is told apart from 0 only when its interval excludes 0 (lower deletion, higher insertion is better)."
    )
    if any(points.values()):
        widgets.plotly(comparison_plots.auc_intervals_chart(points), key="compare.changed.aucs", height=340)
        figures["A vs B AUC intervals"] = _bind(comparison_plots.auc_intervals_figure, points)
    for side, aucs in (("A", a), ("B", b)):
        for curve, values in (("deletion", aucs.deletion), ("insertion", aucs.insertion)):
            arrays.update({f"{side}_{method}_{curve}_auc": v for method, v in values.items()})


def _transposed(rows: dict[str, dict[str, Any]], *, short: bool = False) -> list[dict[str, str]]:
    """One row per property, one column per model, every value as text ("—" where missing); with short, the
    checkpoint's name without its kind in brackets (the column's tooltip has it whole)."""
    properties = list(dict.fromkeys(k for row in rows.values() for k in row if k != "model"))
    table = [{"": prop, **{name: _text(row.get(prop)) for name, row in rows.items()}} for prop in properties]
    for row in table:
        if short and row[""] == "checkpoint":
            row.update({name: _short_label(text) for name, text in row.items() if name})
    return table


def _short_label(label: str) -> str:
    """A picker label without its trailing kind in brackets: 'shapes-default (bundled)' -> 'shapes-default'."""
    head, bracket, _ = label.rpartition(" (")
    return head if bracket and label.endswith(")") and head else label


def _model_columns(models: list[Compared]) -> dict[str, Any]:
    """Each model's summary column wide enough for a checkpoint's name, its full label in the header's tooltip."""
    return {m.name: st.column_config.TextColumn(m.name, help=m.entry.label, width="large") for m in models}


def _text(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _chart(
    shown: bool, make: Callable[..., Any], *args: Any, key: str, height: int | None = None, **kwargs: Any
) -> None:
    """`make(*args, **kwargs)` drawn as a Plotly chart when its tab is open; nothing (not even built) otherwise."""
    if shown:
        widgets.plotly(make(*args, **kwargs), key=key, height=height)


def _bind(make: Any, *args: Any, **kwargs: Any) -> Any:
    def figure() -> Figure:
        return make(*args, **kwargs)

    return figure


if __name__ == "__main__":
    render()
