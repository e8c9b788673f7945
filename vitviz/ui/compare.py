"""Page `/compare`: two or more checkpoints, every analysis side by side on the same inputs, shared colour
scales, difference maps where the patch grids match, overlaid distance curves and a table of numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
from matplotlib.figure import Figure

from vitviz.errors import VitvizError
from vitviz.models import LoadedModel
from vitviz.pipeline import AnalysisOptions, DistanceResult, NotApplicable, top_k
from vitviz.plots import interactive, paper, scale_by_max
from vitviz.ui import cached, catalog, exports, keys, widgets
from vitviz.ui.analyses import attention_distance, display_picture, gradient_map, image_attention
from vitviz.ui.catalog import ModelEntry

FILTER_COMPONENTS = 16
DISTANCE_IMAGES = 16
# Comparisons of the bundled checkpoints, offered as one click each when all of their checkpoints are there.
# The ablation runs share the default's data, steps and model except for the one thing named.
READY_MADE: dict[str, tuple[str, ...]] = {
    "Early vs late": ("shapes-default-epoch-001", "shapes-default-epoch-002", "shapes-default"),
    "Position embeddings": ("shapes-default", "shapes-2d", "shapes-sincos", "shapes-nopos"),
    "ViT vs hybrid": ("shapes-default", "shapes-hybrid"),
    "Base vs fine-tuned": ("shapes-default", "shapes-finetune-hires"),
}


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

    summary_tab, filters_tab, position_tab, distance_tab, rollout_tab = st.tabs(
        ["Summary", "Filters", "Position embeddings", "Attention distance", "Rollout"]
    )
    figures: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    rows = {m.name: _card(m) for m in models}
    with filters_tab:
        _filters(models, rows, figures, arrays)
    with position_tab:
        _position(models, figures, arrays)
    with distance_tab:
        _distance(models, rows, figures, arrays)
    with rollout_tab:
        _rollout(models, rows, figures, arrays)
    with summary_tab:
        widgets.table(_transposed(rows))
        st.caption(
            "Accuracy is what the checkpoint's training recorded; the rest is measured here on the inputs "
            "chosen in the other tabs."
        )

    table = list(rows.values())
    columns = list(dict.fromkeys(k for row in table for k in row))
    widgets.figure_picker_downloads(
        "compare",
        figures=figures,
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
        found = [e for e in wanted if e is not None]
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
    """The summary table's column for one model, from its model card."""
    loaded = model.loaded
    card = cached.model_card(loaded.source, loaded.content_hash, loaded)
    metrics = card.training.get("metrics") if isinstance(card.training.get("metrics"), dict) else {}
    accuracy = metrics.get("eval_accuracy") if metrics else None
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
        "recorded accuracy": None if not isinstance(accuracy, (int, float)) else round(float(accuracy), 4),
    }


def _columns(models: list[Compared]) -> list[Any]:
    columns = st.columns(len(models)) if len(models) <= 3 else st.columns(3)
    return [columns[i % len(columns)] for i in range(len(models))]


def _filters(models: list[Compared], rows: dict[str, dict], figures: dict, arrays: dict) -> None:
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
            widgets.plotly(
                interactive.filters_figure(components, ratio[:k], ncols=4, max_components=k, title=" "),
                key=f"compare.filters.{model.name}",
            )
            cumulative[model.name] = np.cumsum(ratio)
            rows[model.name]["PC1 variance %"] = round(100 * float(ratio[0]), 1)
            rows[model.name][f"top-{k} variance %"] = round(100 * float(ratio[:k].sum()), 1)
            figures[f"{model.name} filters"] = _bind(paper.filters_figure, components, ratio[:k], max_components=k)
            arrays[f"{model.name}_filter_components"] = components
            arrays[f"{model.name}_explained_variance_ratio"] = ratio
    if cumulative:
        st.markdown("##### Cumulative explained variance")
        length = max(len(v) for v in cumulative.values())
        frame = pd.DataFrame(
            {name: np.pad(v, (0, length - len(v)), constant_values=np.nan) for name, v in cumulative.items()},
            index=pd.RangeIndex(1, length + 1, name="component"),
        )
        st.line_chart(
            frame.iloc[: min(length, 64)], x_label="principal component", y_label="cumulative share", height=320
        )


def _position(models: list[Compared], figures: dict, arrays: dict) -> None:
    similarities: dict[str, np.ndarray] = {}
    for column, model in zip(_columns(models), models):
        with column:
            st.markdown(_header(model))
            result = cached.position(model.loaded.content_hash, model.loaded)
            if isinstance(result, NotApplicable):
                st.info("No absolute position embeddings.")
                continue
            similarity = result.similarity
            similarities[model.name] = similarity
            widgets.plotly(interactive.position_figure(similarity, title=" "), key=f"compare.position.{model.name}")
            figures[f"{model.name} position similarity"] = _bind(paper.position_similarity_figure, similarity)
            arrays[f"{model.name}_position_similarity"] = similarity
    _differences(similarities, "position similarity", figures, arrays, key="position")


def _differences(maps: dict[str, np.ndarray], what: str, figures: dict, arrays: dict, *, key: str) -> None:
    """Each model minus the reference (the first with a map), where the shapes match, on one shared scale."""
    if len(maps) < 2:
        return
    reference_name, reference = next(iter(maps.items()))
    pairs = {
        name: values - reference
        for name, values in maps.items()
        if name != reference_name and values.shape == reference.shape
    }
    skipped = [name for name, values in maps.items() if name != reference_name and values.shape != reference.shape]
    st.markdown(f"##### Differences in {what}: each model − {reference_name}")
    if skipped:
        st.caption(f"No difference map for {', '.join(skipped)}: the patch grids differ.")
    if not pairs:
        return
    limit = max(float(np.nanmax(np.abs(d))) for d in pairs.values()) or 1e-12
    for column, (name, difference) in zip(st.columns(max(2, min(3, len(pairs)))), pairs.items()):
        with column:
            st.markdown(f"**{name} − {reference_name}**")
            widgets.plotly(interactive.difference_figure(difference, zmax=limit), key=f"compare.diff.{key}.{name}")
            arrays[f"{name}_minus_{reference_name}_{key}"] = difference


def _distance(models: list[Compared], rows: dict[str, dict], figures: dict, arrays: dict) -> None:
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
            widgets.plotly(interactive.distance_figure(pixels, std=std, ymax=top), key=f"compare.distance.{model.name}")
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
    depth = max(len(values) for values in per_layer.values())
    frame = pd.DataFrame(
        {name: np.pad(values, (0, depth - len(values)), constant_values=np.nan) for name, values in per_layer.items()},
        index=pd.RangeIndex(1, depth + 1, name="layer"),
    )
    st.line_chart(frame, x_label="layer", y_label=f"mean attention distance ({unit})", height=320)
    st.caption(f"{len(images)} images, mode {mode}.")


def _rollout(models: list[Compared], rows: dict[str, dict], figures: dict, arrays: dict) -> None:
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
            top = top_k(result.probabilities, model.loaded.meta.class_names, k=1)
            if len(top):
                best = top[0]
                st.caption(f"Predicts {widgets.plain(best.name)} ({100 * best.probability:.1f} %)")
                rows[model.name]["prediction"] = best.name
                rows[model.name]["probability"] = round(best.probability, 4)
            widgets.plotly(
                interactive.rollout_figure(picture, rollout_map, title="Attention rollout"),
                key=f"compare.rollout.{model.name}",
            )
            rollouts[model.name] = scale_by_max(rollout_map)
            figures[f"{model.name} rollout"] = _bind(paper.rollout_overlay_figure, picture, rollout_map)
            arrays[f"{model.name}_rollout"] = rollout_map
            if gradient is not None:
                widgets.plotly(
                    interactive.rollout_figure(picture, gradient.map, title="Gradient rollout (predicted class)"),
                    key=f"compare.gradient.{model.name}",
                )
                gradients[model.name] = scale_by_max(np.clip(gradient.map, 0, None))
                figures[f"{model.name} gradient rollout"] = _bind(
                    paper.rollout_overlay_figure, picture, gradient.map, title="Gradient-weighted rollout"
                )
                arrays[f"{model.name}_gradient_rollout"] = gradient.map
    _differences(rollouts, "rollout, each map ÷ its maximum", figures, arrays, key="rollout")
    _differences(gradients, "gradient rollout, each map ÷ its maximum", figures, arrays, key="gradient")


def _transposed(rows: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """One row per property, one column per model, every value as text ("—" where missing)."""
    properties = list(dict.fromkeys(k for row in rows.values() for k in row if k != "model"))
    return [{"": prop, **{name: _text(row.get(prop)) for name, row in rows.items()}} for prop in properties]


def _text(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _bind(make: Any, *args: Any, **kwargs: Any) -> Any:
    def figure() -> Figure:
        return make(*args, **kwargs)

    return figure


if __name__ == "__main__":
    render()
