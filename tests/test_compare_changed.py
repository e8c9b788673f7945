"""/compare's "What changed" tab through Streamlit's AppTest: the CKA heat map, the agreement and the table of
both models' AUCs with B − A shown for two bundled checkpoints on a data-set slice are what the core
(`vitviz.comparison.compare_models`, the numbers of `python -m vitviz compare`) computes for the same slice."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
CHECKPOINTS = ROOT / "assets" / "checkpoints"
STEMS = ("shapes-default", "shapes-hybrid")
LIMIT, BATCH = 10, 4
METHODS = ["rollout", "random"]

pytestmark = pytest.mark.usefixtures("one_torch_thread", "module_app_folders")


def _assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] == []


def _trace_array(value: object) -> np.ndarray:
    """A plotly trace array, plain or base64-typed ({"dtype", "bdata", "shape"})."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = [int(n) for n in str(value.get("shape", len(flat))).split(",")]
        return flat.reshape(shape).astype(np.float64)
    return np.asarray(value, dtype=np.float64)


def test_what_changed_shows_the_cores_cka_and_agreement() -> None:
    for stem in STEMS:
        if not (CHECKPOINTS / f"{stem}.safetensors").is_file():
            pytest.skip(f"needs the bundled checkpoint {stem}")
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.query_params["compare"] = [f"bundled:{stem}" for stem in STEMS]
    at.run()
    at.switch_page("vitviz/ui/compare.py").run()
    _assert_clean(at)
    assert not [c for c in at.get("plotly_chart") if c.key == "compare.changed.cka"]  # only when its tab is open

    # The tab's inputs are set before it first draws, so it computes the small slice only (its defaults, 64 images
    # and four methods' curves, take minutes here).
    inputs = {"compare.changed.limit": LIMIT, "compare.changed.batch": BATCH, "compare.changed.methods": METHODS}
    for key, value in inputs.items():
        at.session_state[key] = value
    at.session_state["compare.tab"] = "What changed"
    at.run()
    _assert_clean(at)
    assert at.number_input(key="compare.changed.limit").value == LIMIT
    assert at.multiselect(key="compare.changed.methods").value == METHODS
    charts = [c for c in at.get("plotly_chart") if c.key == "compare.changed.cka"]
    assert len(charts) == 1, "no CKA heat map on the tab"
    shown = _trace_array(json.loads(charts[0].proto.spec)["data"][0]["z"])

    from vitviz.analyses import AnalysisOptions
    from vitviz.comparison import compare_models, slice_batches
    from vitviz.data.stream import DatasetSlice
    from vitviz.faithfulness import FaithfulnessOptions
    from vitviz.models import load_model

    models = [load_model(str(CHECKPOINTS / f"{stem}.safetensors")) for stem in STEMS]
    options = AnalysisOptions(batch_size=BATCH)
    open_batches, names, classes = slice_batches(DatasetSlice("shapes", limit=LIMIT), models, BATCH)
    faithfulness = FaithfulnessOptions(methods=tuple(METHODS))
    core = compare_models(
        *models, open_batches, options, image_names=names, dataset_classes=classes, faithfulness=faithfulness
    )
    np.testing.assert_allclose(shown, core.pairs["cka"].matrix, rtol=1e-12)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Agreement"] == f"{100 * core.agreement():.1f} %"
    assert metrics["Accuracy A"] == f"{100 * core.accuracy('a'):.1f} %"
    assert [c.key for c in at.get("plotly_chart") if c.key and c.key.startswith("compare.changed.")] == [
        "compare.changed.cka",
        "compare.changed.distance",
        "compare.changed.rollout",
        "compare.changed.gradient",
        "compare.changed.aucs",
    ]
    _assert_auc_table(at, core)


def _assert_auc_table(at: AppTest, core: object) -> None:
    """One row per method and curve: each model's AUC and interval, B − A, its interval and the verdict."""
    tables = [d.value for d in at.dataframe if {"method", "curve", "B − A", "verdict"} <= set(d.value.columns)]
    assert len(tables) == 1, "no AUC table on the tab"
    table = tables[0]
    assert list(zip(table["method"], table["curve"])) == [(m, c) for m in METHODS for c in ("deletion", "insertion")]
    points, differences = core.auc_points(), core.auc_differences()  # type: ignore[attr-defined]
    for row in table.to_dict("records"):
        method, curve = row["method"], row["curve"]
        for side in ("A", "B"):
            auc, low, high = points[side][curve][method]
            assert row[side] == auc and row[f"{side} interval"] == f"[{low:.4f}, {high:.4f}]"
        difference = differences[method][curve]
        assert row["B − A"] == difference.difference
        assert row["B − A interval"] == f"[{difference.interval[0]:.4f}, {difference.interval[1]:.4f}]"
        assert row["verdict"] == ("not told apart" if difference.better is None else f"{difference.better} better")


def test_a_typed_split_slice_is_read_and_a_bad_one_is_one_line() -> None:
    """The split box takes a slice as the command line does (test[900:]; test[8000:] for MNIST's held-out digits); a split that
    does not exist is one error line, not an exception."""
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.query_params["compare"] = [f"bundled:{stem}" for stem in STEMS]
    at.run()
    at.switch_page("vitviz/ui/compare.py").run()
    inputs = {"compare.changed.limit": 4, "compare.changed.batch": 4, "compare.changed.methods": []}
    for key, value in inputs.items():
        at.session_state[key] = value
    at.session_state["compare.tab"] = "What changed"
    at.run()
    at.text_input(key="compare.changed.split").input("nope").run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value.replace("\\", "") for e in at.error]  # shown as escaped Markdown
    assert len(errors) == 1 and "unknown split 'nope'" in errors[0] and "\n" not in errors[0].strip()
    at.text_input(key="compare.changed.split").input("test[900:]").run()
    _assert_clean(at)
    assert any("4 images of shapes test[900:]" in c.value for c in at.caption)
