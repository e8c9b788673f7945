"""The Trust page (`/trust`, "Which map to trust?") through Streamlit's AppTest, and the promise behind it:
`python -m vitviz faithfulness`, the page's disk-cached service function and `python -m training evaluate`
give the same deletion and insertion AUCs, to the last digit, on the same model and images.

Expected numbers come from `vitviz.faithfulness.run_faithfulness` called here on images read with
`vitviz.images.load_for_model` (the CLI's reader), not through the app's code; the protocol itself is held
to a slow reference in tests/test_faithfulness.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from vitviz.faithfulness import FaithfulnessOptions, run_faithfulness
from vitviz.images import decode_image, load_for_model
from vitviz.models import load_model
from vitviz.pipeline import model_card

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
PAGE = "vitviz/ui/trust.py"
TIMEOUT = 300
METHODS = ["rollout", "gradient-rollout", "random"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def app_folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One runs folder and one disk cache for the module, so a configuration computed once is read back after."""
    runs, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITVIZ_RUNS_DIR", str(runs))
        patch.setenv("VITVIZ_CACHE_DIR", str(cache))
        yield {"runs": runs, "cache": cache}


def _samples(count: int) -> list[Path]:
    """The first images of the first sample set, the page's default image set."""
    from vitviz.ui import catalog

    return list(catalog.discover_sample_sets()[0].files[:count])


def _core(files: list[Path], options: FaithfulnessOptions, names: list[str] | None = None):
    loaded = load_model(str(DEFAULT))
    meta = loaded.meta
    images = torch.stack(
        [
            load_for_model(f, input_size=meta.input_size, mean=meta.mean, std=meta.std, in_chans=meta.in_chans)
            for f in files
        ]
    )
    names = [f.name for f in files] if names is None else names
    return loaded, run_faithfulness(loaded.model, images, names, options)


def _open() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    at.switch_page(PAGE).run()
    _assert_clean(at)
    return at


def _assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert [e.value for e in at.error] == []


def _text(element: object) -> str:
    return str(getattr(element, "value", element)).replace("\\", "")


def _charts(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def _array(value: object) -> np.ndarray:
    """A plotly trace array, plain or base64-typed ({"dtype", "bdata", "shape"})."""
    if isinstance(value, dict) and "bdata" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"])).astype(np.float64)
    return np.asarray(value, dtype=np.float64)


def _auc_table(at: AppTest):
    table = next(d.value for d in at.dataframe if "deletion AUC" in d.value.columns)
    return table.set_index("method")


def test_trust_page_auc_table_is_the_cores_and_sanity_shows_the_strip() -> None:
    at = _open()
    assert [t.value for t in at.title] == ["Which map to trust?"]
    assert at.multiselect(key="trust.methods").value == ["rollout", "gradient-rollout", "attention-last", "random"]
    labels = [b.label for b in at.get("download_button")]
    assert {"PNG", "SVG", "faithfulness.json", "faithfulness-auc.csv"} <= set(labels), labels

    at.slider(key="trust.images.count").set_value(2)
    at.multiselect(key="trust.methods").set_value(METHODS)
    at.run()
    _assert_clean(at)
    table = _auc_table(at)
    assert list(table.index) == METHODS
    _, expected = _core(_samples(2), FaithfulnessOptions(methods=tuple(METHODS)))
    summary = expected.summary
    for method in METHODS:
        assert table.loc[method, "deletion AUC"] == expected.methods[method].deletion_auc
        assert table.loc[method, "insertion AUC"] == expected.methods[method].insertion_auc
        low, high = summary.intervals[method]["deletion"]
        assert table.loc[method, "deletion interval"] == f"[{low:.3f}, {high:.3f}]"
        low, high = summary.intervals[method]["insertion"]
        assert table.loc[method, "insertion interval"] == f"[{low:.3f}, {high:.3f}]"
    # The verdict is the interval rule's, never a "lowest AUC" read off two images' means.
    shown = [_text(m) for m in at.markdown]
    for line in summary.verdict():
        assert line in shown, (line, shown)
    assert not any("Lowest deletion AUC" in text for text in shown)

    group = "Deletion AUC"  # the deletion panel's legend group (vitviz.plots.figures)
    curves = next(c for c in _charts(at) if any(t.get("legendgroup") == group for t in c["data"]))
    deletion = [t for t in curves["data"] if t.get("legendgroup") == group and t.get("showlegend") is not False]
    assert [t["name"].split(" ")[0] for t in deletion] == METHODS
    assert [t["line"]["dash"] for t in deletion] == ["solid", "solid", "dash"]  # random dashed
    assert len({t["line"]["color"] for t in deletion}) == 3  # one colour per method
    rollout_curves = np.stack([c.deletion.numpy() for c in expected.methods["rollout"].per_image])
    np.testing.assert_allclose(_array(deletion[0]["y"]), rollout_curves.mean(axis=0), rtol=0, atol=1e-12)
    images = at.get("image")
    assert len(images) >= 2 * (len(METHODS) + 1)  # every image: its input and one map per method

    at.toggle(key="trust.sanity").set_value(True).run()
    _assert_clean(at)
    sanity = next(d.value for d in at.dataframe if "head" in d.value.columns).set_index("method")
    depth = len(load_model(str(DEFAULT)).model.blocks)
    # Blocks numbered from 1, as every other page numbers layers (the core's stages count from 0).
    blocks = [f"block {b}" for b in range(depth, 0, -1)]
    assert list(sanity.columns) == ["head", f"{blocks[0]} (last)", *blocks[1:-1], f"{blocks[-1]} (first)"]
    assert sanity.loc["rollout", "head"] == 1.0  # rollout never reads the head: exactly 1 by construction
    assert (sanity.loc["random"] == 1.0).all()
    assert any("exactly 1 by construction" in _text(i) for i in at.info)
    assert any(c["data"][0].get("x") == list(sanity.columns) for c in _charts(at))  # the Spearman curve
    assert len(at.get("image")) >= len(images) + len(METHODS) * (depth + 2)  # the strip: original + each stage
    assert "faithfulness.json" in [b.label for b in at.get("download_button")]


def test_grad_cam_and_attnlrp_can_be_chosen_and_get_the_cores_aucs() -> None:
    at = _open()
    chosen = ["grad-cam", "attnlrp", "random"]
    assert set(chosen) <= set(at.multiselect(key="trust.methods").options)
    at.slider(key="trust.images.count").set_value(1)
    at.multiselect(key="trust.methods").set_value(chosen)
    at.run()
    _assert_clean(at)
    table = _auc_table(at)
    assert list(table.index) == chosen
    _, expected = _core(_samples(1), FaithfulnessOptions(methods=tuple(chosen)))
    for method in chosen:
        assert table.loc[method, "deletion AUC"] == expected.methods[method].deletion_auc
        assert table.loc[method, "insertion AUC"] == expected.methods[method].insertion_auc


def test_no_method_chosen_is_a_message_not_an_exception() -> None:
    at = _open()
    at.multiselect(key="trust.methods").set_value([]).run()
    _assert_clean(at)
    assert any("Choose at least one method" in _text(w) for w in at.warning)
    assert not any("deletion AUC" in d.value.columns for d in at.dataframe)


def test_cli_page_service_and_evaluate_give_identical_aucs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The same checkpoint and images through the three doors: python -m vitviz faithfulness, the page's
    cached service function (computed, then read back from the disk cache) and python -m training evaluate."""
    from training.data import build_dataset
    from training.evaluate import evaluate_checkpoint
    from vitviz.cli import main
    from vitviz.ui import analyses

    count = 3
    loaded = load_model(str(DEFAULT))
    data = build_dataset("shapes", split="test", img_size=loaded.meta.input_size, num_samples=count, seed=0)
    files = []
    for index in range(count):
        path = tmp_path / f"shape-{index}.png"
        data[index][0].save(path)  # PNG is lossless: the CLI reads back the evaluation's pixels
        files.append(path)

    out = tmp_path / "cli.json"
    argv = ["faithfulness", str(DEFAULT), "--images", *map(str, files), "--methods", ",".join(METHODS)]
    assert main([*argv, "--json", str(out)]) == 0
    capsys.readouterr()
    cli = json.loads(out.read_text())

    inputs = [
        analyses.InputImage(name=str(f), digest=f"test-{f.name}", pixels=np.asarray(decode_image(f))) for f in files
    ]
    options = FaithfulnessOptions(methods=tuple(METHODS))
    computed = analyses.faithfulness(loaded, inputs, options)
    cached = analyses.faithfulness(loaded, inputs, options, progress=lambda *_: pytest.fail("not from the cache"))

    report = evaluate_checkpoint(
        str(DEFAULT), dataset="shapes", num_samples=count, faithfulness_images=count, device="cpu"
    )
    evaluated = report["faithfulness"]
    assert evaluated["num_images"] == count and list(evaluated["methods"]) == METHODS
    assert (
        evaluated["protocol"] == cli["protocol"] == {"steps": 50, "baseline": "normalised-zero", "target": "predicted"}
    )

    for method in METHODS:
        want = cli["methods"][method]
        for page in (computed, cached):
            assert page.methods[method].deletion_auc == want["deletion_auc"]
            assert page.methods[method].insertion_auc == want["insertion_auc"]
        assert evaluated["methods"][method]["deletion_auc"] == want["deletion_auc"]
        assert evaluated["methods"][method]["insertion_auc"] == want["insertion_auc"]
        for key in ("deletion_auc_interval", "insertion_auc_interval"):
            assert evaluated["methods"][method][key] == want[key]
            assert want[key][0] <= want[key.removesuffix("_interval")] <= want[key][1]
    assert evaluated["comparisons"] == cli["comparisons"]
    assert cli["comparisons"]["num_images"] == count and len(cli["comparisons"]["deletion"]["pairs"]) == 3

    # The page's JSON download is the CLI's document (timings aside: they are measured, not computed).
    document = json.loads(json.dumps(cached.to_json(model_card(loaded).model_section())))
    for doc in (document, cli):
        for method in doc["methods"].values():
            method.pop("seconds_per_image")
    assert document == cli


def test_page_service_cache_round_trips_sanity_and_a_fixed_target(tmp_path: Path) -> None:
    from vitviz.ui import analyses

    files = _samples(2)
    inputs = [
        analyses.InputImage(name=f.name, digest=f"rt-{f.name}", pixels=np.asarray(decode_image(f))) for f in files
    ]
    loaded = load_model(str(DEFAULT))
    options = FaithfulnessOptions(methods=("rollout", "attention-last"), steps=8, target_class=3, sanity=True)
    first = analyses.faithfulness(loaded, inputs, options)
    again = analyses.faithfulness(loaded, inputs, options, progress=lambda *_: pytest.fail("not from the cache"))
    _, expected = _core(files, options)
    for result in (first, again):
        assert result.to_json({})["sanity"] == expected.to_json({})["sanity"]
        assert result.target_class == 3 and result.steps == 8
        for name, method in expected.methods.items():
            got = result.methods[name]
            assert (got.deletion_auc, got.insertion_auc) == (method.deletion_auc, method.insertion_auc)
            for a, b in zip(got.per_image, method.per_image):
                assert a.image == b.image and a.target_class == b.target_class == 3
                assert torch.equal(a.map, b.map) and torch.equal(a.deletion, b.deletion)
        for name in expected.sanity:
            assert torch.equal(result.sanity[name].maps, expected.sanity[name].maps)
    renamed = [analyses.InputImage(name=f"other-{i.name}", digest=i.digest, pixels=i.pixels) for i in inputs]
    assert [c.image for c in analyses.faithfulness(loaded, renamed, options).methods["rollout"].per_image] == [
        "other-" + f.name for f in files
    ]


def test_download_figures_and_auc_csv_render(tmp_path: Path) -> None:
    """What the page's download buttons produce: the figures as PNG and SVG, and the AUCs as CSV."""
    import csv
    import io

    from vitviz.plots import faithfulness as plots
    from vitviz.ui import analyses, exports
    from vitviz.ui.trust import _auc_csv

    files = _samples(2)
    loaded, result = _core(files, FaithfulnessOptions(methods=("rollout", "occlusion", "random"), steps=4, sanity=True))
    inputs = [
        analyses.InputImage(name=f.name, digest=f"dl-{f.name}", pixels=np.asarray(decode_image(f))) for f in files
    ]
    pictures = [analyses.display_picture(loaded, image) for image in inputs]
    maps = {n: np.stack([c.map.numpy() for c in m.per_image]) for n, m in result.methods.items()}
    stages = result.sanity["rollout"].randomised
    figures = [
        plots.maps_figure(pictures, maps, [f.name for f in files]),
        plots.sanity_maps_figure(
            {n: m[0] for n, m in maps.items()},
            {n: s.maps[:, 0].numpy() for n, s in result.sanity.items()},
            stages,
            spearman={n: list(s.spearman) for n, s in result.sanity.items()},
        ),
    ]
    for fig in figures:
        assert exports.figure_bytes(fig, "png").startswith(b"\x89PNG")
        assert b"<svg" in exports.figure_bytes(fig, "svg")[:400]
    assert len(figures[0].axes) == 2 * 4 and len(figures[1].axes) == 3 * (len(stages) + 1)

    rows = list(csv.DictReader(io.StringIO(_auc_csv(result).decode("utf-8"))))
    assert [r["image"] for r in rows[:3]] == ["mean"] * 3 and len(rows) == 3 + 3 * 2
    for row in rows:
        method = result.methods[row["method"]]
        want = method if row["image"] == "mean" else next(c for c in method.per_image if c.image == row["image"])
        assert float(row["deletion_auc"]) == want.deletion_auc and float(row["insertion_auc"]) == want.insertion_auc

    shifted = plots.display_map(np.array([[-2.0, 1.0], [0.0, 3.0]]))  # occlusion can be negative
    np.testing.assert_array_equal(shifted, [[0.0, 3.0], [2.0, 5.0]])
    picture = plots.map_picture(None, np.array([[0.0, 1.0]]), side=8)
    assert picture.shape == (4, 8, 3) and (picture[:, :4] == picture[0, 0]).all()  # one flat block per token


def test_integrated_gradients_that_did_not_converge_is_labelled() -> None:
    from vitviz.faithfulness import Convergence, MethodResult
    from vitviz.ui.trust import _method_label

    def result(errors: tuple[float, ...]) -> MethodResult:
        convergence = Convergence(steps=(800,) * len(errors), errors=errors, start_steps=50, max_steps=800)
        return MethodResult("integrated-gradients", 0.2, 0.6, 1.0, (), convergence=convergence)

    assert _method_label("integrated-gradients", result((0.01, 0.2, 0.04))) == "integrated-gradients"
    missed = result((0.01, 0.2, 0.3))
    assert not missed.convergence.converged and not missed.convergence.image_converged(1)
    assert _method_label("integrated-gradients", missed) == "integrated-gradients (not converged)"
    assert _method_label("rollout", MethodResult("rollout", 0.2, 0.6, 1.0, ())) == "rollout"


def test_sanity_stages_are_numbered_from_one_as_on_the_other_pages() -> None:
    from vitviz.ui.trust import stage_labels

    randomised = ["head", "block 3", "block 2", "block 1", "block 0"]
    assert stage_labels(randomised) == ["head", "block 4 (last)", "block 3", "block 2", "block 1 (first)"]
