"""Page `/`: the selected model's card, how it was trained, its curves, and a guide to the other pages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import streamlit as st

from vitviz import card as card_text
from vitviz import pipeline
from vitviz import runs as run_folders
from vitviz.pipeline import ModelCard
from vitviz.plots import interactive
from vitviz.tokens import TokenLayout, token_layout
from vitviz.ui import cached, catalog, exports, pages, widgets


def render() -> None:
    selection = widgets.model_sidebar()
    loaded, entry = selection.loaded, selection.entry
    st.title("vitviz studio")
    st.caption("See what a Vision Transformer has learned.")
    st.subheader(f"Model: {widgets.plain(entry.label)}")

    card = cached.model_card(loaded.source, loaded.content_hash, loaded)
    layout = token_layout(loaded.model)
    parameters = card.parameters
    # A wrapping row of metrics as wide as their values: five equal columns cut the values at 1000 px.
    with st.container(horizontal=True, wrap=True, gap="large"):
        st.metric(
            "Parameters", f"{parameters / 1e6:.2f} M" if parameters >= 1e5 else f"{parameters:,}", width="content"
        )
        st.metric("Layers × heads", f"{card.depth} × {card.num_heads}", width="content")
        st.metric("Width", card.embed_dim, width="content")
        st.metric("Input", f"{card.img_size[0]}×{card.img_size[1]} px", width="content")
        st.metric("Tokens", f"{card.grid[0]}×{card.grid[1]} + {card.num_prefix_tokens}", width="content")

    arch_col, train_col = st.columns(2)
    with arch_col:
        st.markdown("##### Architecture")
        _property_table(_architecture_rows(card, layout))
        if card.resolution_history:
            st.markdown("##### Resolution history")
            widgets.table(
                [
                    {"method": h["method"], "old grid": _grid(h["old_grid"]), "new grid": _grid(h["new_grid"])}
                    for h in card.resolution_history
                ]
            )
    with train_col:
        st.markdown("##### How it was trained")
        rows = card_text.training_rows(card.training, _checkpoint_name(entry))
        if rows:
            _property_table(rows)
        else:
            st.caption("This model carries no training summary.")
        accuracy = card_text.accuracies(card.training)
        if accuracy:
            with st.container(horizontal=True, wrap=True, gap="large"):
                for label, value in accuracy.items():
                    st.metric(label, f"{100 * value:.1f} %", width="content")

    records, where = _training_log(entry, card.training)
    st.markdown("##### Training curves")
    marker = _curves_marker(card.training)
    if records:
        last_step = max((r["step"] for r in records if isinstance(r.get("step"), (int, float))), default=None)
        note = f"From {widgets.plain(where)}"
        if marker is not None and last_step is not None and marker[0] < last_step:
            note += (
                f"; the curves run to step {last_step:g}, this checkpoint was saved at step {marker[0]:g} (dotted line)"
            )
        st.caption(note + ".")
        if st.toggle(
            "Interactive",
            key="overview.curves.interactive",
            help="An interactive chart: hover for values, zoom. Off, the same curves as a picture, which a "
            "browser draws without first loading the chart library (a second on a first visit).",
        ):
            widgets.plotly(interactive.training_curves_figure(records, x="step", marker=marker), key="overview.curves")
        else:
            st.image(curves_picture(records, marker), width="stretch")
    else:
        st.caption("No training log was found for this model (runs keep theirs in metrics.jsonl).")

    numbers = {"model-card.json": lambda: exports.json_bytes(card.to_dict())}
    figures = {}
    if records:
        numbers["metrics.csv"] = lambda: exports.records_csv_bytes(records)
        figures["training-curves"] = lambda: exports.paper_figures().training_curves_figure(
            records, x="step", marker=marker
        )
    widgets.downloads(entry.key, figures=figures, numbers=numbers, key="overview")

    st.divider()
    st.markdown("##### What each page shows")
    for page in pages.guide():
        link_col, text_col = st.columns([1, 3], vertical_alignment="center")
        link_col.page_link(page.path, label=page.title)
        text_col.markdown(page.about)
    st.caption("Every page uses the model chosen in the sidebar, and offers its figures and numbers for download.")


CURVES_WIDTH_PX = 1260  # the picture's width: the page's main column at 1400 px and wider


def curves_picture(records: list[dict[str, Any]], marker: tuple[float, str] | None) -> bytes:
    """The training curves as a PNG, drawn once per server for the same records (`cached.training_curves_png`).
    The JSON keeps each record's key order, which orders the series and so their colours."""
    return cached.training_curves_png(json.dumps(records), marker, CURVES_WIDTH_PX)


def warm_default_curves(loaded: Any) -> None:
    """Draw the bundled default's curves picture into the cache, as its overview will ask for it (the server's
    start-up calls this, so that the first visit does not wait for matplotlib)."""
    entry = catalog.bundled_entry(catalog.DEFAULT_CHECKPOINT)
    training = pipeline.model_card(loaded).training
    records, _ = _training_log(entry, training)
    if records:
        curves_picture(records, _curves_marker(training))


def _curves_marker(training: dict[str, Any]) -> tuple[float, str] | None:
    """The step the checkpoint was saved at, to mark on its run's curves."""
    saved_step = card_text.saved_step(training)
    return (float(saved_step), "this checkpoint") if saved_step is not None else None


def _grid(value: Any) -> str:
    return f"{value[0]}×{value[1]}" if isinstance(value, (list, tuple)) and len(value) == 2 else str(value)


def _short_source(source: str) -> str:
    """A checkpoint path relative to the repository (or the runs folder) when it lies inside it."""
    for base in (catalog.REPO_ROOT, catalog.runs_dir().parent):
        try:
            return str(Path(source).resolve().relative_to(base))
        except (ValueError, OSError):
            continue
    return source


def _architecture_rows(card: ModelCard, layout: TokenLayout) -> list[tuple[str, str]]:
    prefix = []
    if layout.has_class_token:
        prefix.append("class")
    if layout.has_dist_token:
        prefix.append("distillation")
    if layout.num_reg_tokens:
        prefix.append(f"{layout.num_reg_tokens} register")
    rows = [
        ("architecture", card.arch),
        ("source", _short_source(card.source)),
        ("patch grid", _grid(card.grid)),
        ("pixels per token", _grid(card.stride)),
        ("prefix tokens", ", ".join(prefix) or "none"),
        ("input channels", str(card.in_chans)),
        (
            "classes",
            f"{len(card.class_names)}: "
            + ", ".join(card.class_names[:8])
            + (" …" if len(card.class_names) > 8 else ""),
        ),
        (
            "normalisation",
            f"mean {', '.join(f'{m:.3g}' for m in card.mean)}; std {', '.join(f'{s:.3g}' for s in card.std)}",
        ),
    ]
    if card.config is not None:
        cfg = card.config
        rows += [
            ("position embedding", cfg["pos_embed"]),
            ("stem", cfg["stem"] if cfg["stem"] == "patch" else f"hybrid ResNetV2 {list(cfg['hybrid_layers'])}"),
            ("pooling", cfg["global_pool"]),
            ("MLP ratio", f"{cfg['mlp_ratio']:g}"),
            ("head", cfg["head"]),
        ]
    return [(key, str(value)) for key, value in rows]


ZWSP = "\u200b"


def _property_table(rows: list[tuple[str, str]]) -> None:
    """Property/value rows as a Markdown table: long values (paths, class lists) wrap instead of being cut, and
    the first page a user sees imports neither pandas nor pyarrow (about a second of a fresh server's first
    visit) and needs none of Streamlit's Arrow JavaScript, which a data table would."""
    lines = ["| property | value |", "| --- | --- |"]
    # A zero-width space after each "/" lets a long path wrap inside its cell instead of running into the
    # table beside it.
    lines += [f"| {widgets.plain(label)} | {widgets.plain(value).replace('/', '/' + ZWSP)} |" for label, value in rows]
    st.markdown("\n".join(lines))


def _checkpoint_name(entry: catalog.ModelEntry) -> str | None:
    """Which checkpoint of its run a run entry is ("best", "last", "epoch-003"); None for other models."""
    if entry.kind != catalog.RUN or entry.path is None:
        return None
    return entry.path.name.removesuffix(".safetensors")


def _training_log(entry: catalog.ModelEntry, training: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    run = catalog.run_dir_for(entry, training)
    if run is not None:
        return run_folders.read_metrics(run), f"run {run.name}"
    beside = catalog.metrics_beside(entry)
    if beside is not None:
        return run_folders.read_jsonl(beside), beside.name
    return [], ""


if __name__ == "__main__":
    render()
