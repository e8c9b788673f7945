"""Page `/analyses`: every registered analysis, as `python -m vitviz analyze` writes it.

The page knows no analysis by name: it lists the registry (vitviz/analyses), offers each analysis's declared
options, runs it through the same pipeline as the CLI and shows the figures and the JSON section the CLI would
write. An analysis added to the registry appears here without any change to the studio.
"""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from vitviz import analyses as registry
from vitviz.errors import VitvizError
from vitviz.pipeline import AnalysisOptions
from vitviz.ui import widgets
from vitviz.ui.analyses import registered_analysis


def render() -> None:
    selection = widgets.model_sidebar()
    loaded = selection.loaded
    st.title("Every analysis")
    st.caption(
        "Each analysis vitviz has, with the figures and the JSON section that `python -m vitviz analyze "
        "--analyses NAME --json OUT --figures DIR` writes for it: the same registry, options and numbers."
    )
    declared = {analysis.name: analysis for analysis in registry.analyses()}
    name = st.selectbox(
        "Analysis",
        list(declared),
        format_func=lambda n: f"{n}: {declared[n].summary}",
        key="explore.analysis",
    )
    analysis = declared[name]
    try:
        options = _options(analysis, key=f"explore.{name}.{selection.entry.key}")
    except VitvizError as exc:
        widgets.show_error(exc)
        return
    images = widgets.dataset_picker(key="explore.images", default_count=4) if analysis.on_images else []
    if analysis.on_images and not images:
        return
    try:
        with st.spinner(f"Running {name}…"):
            output = registered_analysis(loaded, name, images, options)
    except VitvizError as exc:
        widgets.show_error(exc)
        return
    if output.not_applicable is not None:
        st.info(f"Not applicable to this model: {widgets.plain(output.not_applicable)}.")
        return
    for stem, png in output.figures:
        st.image(png, caption=stem)
    st.download_button(
        f"{analysis.section}.json",
        output.section,
        file_name=f"{analysis.section}.json",
        mime="application/json",
        key=f"explore.download.{name}",
    )
    with st.expander("The JSON section"):
        st.json(json.loads(output.section), expanded=False)


def _options(analysis: registry.Analysis, *, key: str) -> AnalysisOptions:
    """A widget for each option the analysis declares (and the shared ones it reads), with its default."""
    shared = {option.name: option for option in registry.SHARED_OPTIONS}
    declared = [*analysis.options, *(shared[name] for name in analysis.uses if name in shared)]
    values: dict[str, Any] = {}
    for option in declared:
        values[option.name] = _widget(option, key=f"{key}.{option.name}")
    return AnalysisOptions(**values)


def _widget(option: registry.Option, *, key: str) -> Any:
    label = f"{option.flag}: {option.help}"
    if option.choices:
        return st.selectbox(label, option.choices, index=option.choices.index(option.default), key=key)
    if option.default is None:  # an optional integer (the target class): empty means the default
        text = st.text_input(label, "", key=key, help="Empty: the default.")
        if not text.strip():
            return None
        try:
            return int(text)
        except ValueError:
            raise VitvizError(f"{option.flag} must be a whole number, got {text!r}") from None
    if option.type is int:
        return int(st.number_input(label, value=int(option.default), step=1, key=key))
    if option.type is float:
        return float(st.number_input(label, value=float(option.default), format="%g", key=key))
    return st.text_input(label, str(option.default), key=key)


if __name__ == "__main__":
    render()
