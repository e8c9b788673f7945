"""/compare's faithfulness tab through Streamlit's AppTest: each compared checkpoint's deletion and insertion AUCs
on the page's image set are the numbers `python -m vitviz faithfulness` writes for the same image files.

The expected numbers come from the CLI (`vitviz.cli.main`, which reads the files with `vitviz.images`), not from
the app's code; the protocol itself is held to a slow reference in tests/test_faithfulness.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
CHECKPOINTS = ROOT / "assets" / "checkpoints"
PAGE = "vitviz/ui/compare.py"
TIMEOUT = 300
# The default ViT and the one without position embeddings: same grid, very different faithfulness.
STEMS = ("shapes-default", "shapes-nopos")
METHODS = ["rollout", "gradient-rollout", "random"]
IMAGES = 2

pytestmark = pytest.mark.usefixtures("one_torch_thread", "module_app_folders")


def _assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] == []


def _auc_tables(at: AppTest) -> list:
    return [d.value for d in at.dataframe if {"model", "method", "deletion AUC"} <= set(d.value.columns)]


def _cli(stem: str, files: list[Path], out: Path) -> dict:
    from vitviz.cli import main

    argv = ["faithfulness", str(CHECKPOINTS / f"{stem}.safetensors"), "--images", *map(str, files)]
    assert main([*argv, "--methods", ",".join(METHODS), "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_compare_shows_each_models_aucs_equal_to_the_cli(tmp_path: Path) -> None:
    for stem in STEMS:
        if not (CHECKPOINTS / f"{stem}.safetensors").is_file():
            pytest.skip(f"needs the bundled checkpoint {stem}")
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params["compare"] = [f"bundled:{stem}" for stem in STEMS]
    at.run()
    at.switch_page(PAGE).run()
    _assert_clean(at)
    assert _auc_tables(at) == []  # computed only when its tab is opened

    at.session_state["compare.tab"] = "Faithfulness"
    at.run()
    _assert_clean(at)
    at.multiselect(key="compare.faithfulness.methods").set_value(METHODS)
    at.slider(key="compare.faithfulness.count").set_value(IMAGES)
    at.run()
    _assert_clean(at)
    tables = _auc_tables(at)
    assert len(tables) == 1, "no AUC table on the faithfulness tab"
    table = tables[0]
    assert list(table["model"]) == [name for name in ("A", "B") for _ in METHODS]
    assert list(table["method"]) == METHODS * len(STEMS)

    from vitviz.ui import catalog

    files = list(catalog.discover_sample_sets()[0].files[:IMAGES])  # the picker's default set, first images
    for name, stem in zip(("A", "B"), STEMS):
        cli = _cli(stem, files, tmp_path / f"{stem}.json")
        rows = table[table["model"] == name].set_index("method")
        assert (rows["steps S"] == cli["protocol"]["steps"]).all()
        for method in METHODS:
            assert rows.loc[method, "deletion AUC"] == cli["methods"][method]["deletion_auc"], (stem, method)
            assert rows.loc[method, "insertion AUC"] == cli["methods"][method]["insertion_auc"], (stem, method)
        for curve in ("deletion", "insertion"):
            for method in METHODS:
                low, high = cli["methods"][method][f"{curve}_auc_interval"]
                assert rows.loc[method, f"{curve} interval"] == f"[{low:.4f}, {high:.4f}]"
    captions = [str(c.value).replace("\\", "") for c in at.caption]
    assert not any("lowest deletion AUC" in text for text in captions)
    assert sum("not told apart" in text or "ahead of every other method" in text for text in captions) >= len(STEMS)
    # The two models do not give the same numbers: the table is per model, not one model repeated.
    a, b = (table[table["model"] == n]["deletion AUC"].tolist() for n in ("A", "B"))
    assert a[:2] != b[:2]
    curves = [c for c in at.get("plotly_chart") if c.key and c.key.startswith("compare.faithfulness.")]
    assert len(curves) == len(STEMS)  # each model's mean curves
    # Each model's two panels take the page's width, one model per row, with the legend in rows below them: in
    # side-by-side columns with the legend on the right, each panel was a few dozen pixels wide and the two panel
    # titles printed over each other.
    assert not _keys_in_columns(at._tree) & {c.key for c in curves}
    for curve in curves:
        legend = json.loads(curve.proto.spec)["layout"]["legend"]
        assert legend["orientation"] == "h" and legend["yanchor"] == "bottom", legend


def _keys_in_columns(node: object, inside: bool = False) -> set[str]:
    """The keys of the elements below `node` that sit in a column of `st.columns`."""
    from streamlit.testing.v1.element_tree import Column

    keys = {str(node.key)} if inside and getattr(node, "key", None) else set()
    for child in getattr(node, "children", {}).values():
        keys |= _keys_in_columns(child, inside or isinstance(child, Column))
    return keys
