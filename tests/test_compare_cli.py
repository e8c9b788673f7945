"""`python -m vitviz compare A B`: every section against what each model's own analyses give (the single-model
JSON of `analyze --dataset` and `faithfulness --dataset`, plain forwards for the predictions), on two pairs of
architectures; the B − A AUC intervals against a Python loop over the bootstrap's resamples; the mistakes a user
can make are one line and status 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitviz.analysis.differences import resample_bilinear
from vitviz.cli import main
from vitviz.intervals import bootstrap_indices

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "assets" / "checkpoints"
SAMPLES = ROOT / "assets" / "samples"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _path(stem: str) -> str:
    path = CHECKPOINTS / f"{stem}.safetensors"
    if not path.is_file():
        pytest.skip(f"needs the bundled checkpoint {stem}")
    return str(path)


def _run(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "compare.json"
    assert main(["compare", *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _analyze(tmp_path: Path, model: str, limit: int) -> dict:
    out = tmp_path / f"{Path(model).stem}.json"
    argv = ["analyze", model, "--dataset", "shapes", "--limit", str(limit), "--batch-size", "4"]
    assert main([*argv, "--analyses", "distance,rollout,gradient-rollout", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _predictions(model: str, limit: int) -> tuple[list[int], list[int]]:
    """Each image's argmax over a plain forward, one image at a time, and the labels."""
    from vitviz.data.stream import DatasetSlice, open_dataset
    from vitviz.models import load_model

    loaded = load_model(model)
    meta = loaded.meta
    data = open_dataset(
        DatasetSlice("shapes", limit=limit), input_size=meta.input_size, in_chans=3, mean=meta.mean, std=meta.std
    )
    predicted, labels = [], []
    with torch.no_grad():
        for index in range(limit):
            image, label, _ = data[index]
            predicted.append(int(loaded.model(image[None]).argmax()))
            labels.append(label)
    return predicted, labels


def _scaled(values: list) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array / array.max()


@pytest.mark.parametrize(
    ("stem_a", "stem_b"), [("shapes-default", "shapes-hybrid"), ("shapes-default", "shapes-finetune-hires")]
)
def test_compare_sections_equal_each_models_own_analyses(tmp_path: Path, stem_a: str, stem_b: str) -> None:
    a, b, limit = _path(stem_a), _path(stem_b), 10
    document = _run(
        tmp_path, a, b, "--dataset", "shapes", "--limit", str(limit), "--batch-size", "4", "--methods", "none"
    )
    assert list(document) == [
        "models",
        "dataset",
        "cka",
        "predictions",
        "distance_shift",
        "rollout_difference",
        "gradient_rollout_difference",
    ]  # no "faithfulness": --methods none
    assert document["models"]["a"]["source"].endswith(f"{stem_a}.safetensors")
    assert document["dataset"]["num_images"] == limit and document["cka"]["num_images"] == 8
    assert document["cka"]["dropped_images"] == 2 and len(document["cka"]["matrix"]) == document["models"]["a"]["depth"]

    (pred_a, labels), (pred_b, _) = _predictions(a, limit), _predictions(b, limit)
    predictions = document["predictions"]
    assert [p["a"] for p in predictions["per_image"]] == pred_a
    assert [p["b"] for p in predictions["per_image"]] == pred_b
    assert [p["label"] for p in predictions["per_image"]] == labels
    assert predictions["agreement"] == pytest.approx(sum(x == y for x, y in zip(pred_a, pred_b)) / limit)
    assert predictions["accuracy"]["a"] == pytest.approx(sum(x == y for x, y in zip(pred_a, labels)) / limit)
    assert predictions["accuracy"]["b"] == pytest.approx(sum(x == y for x, y in zip(pred_b, labels)) / limit)

    own_a, own_b = _analyze(tmp_path, a, limit), _analyze(tmp_path, b, limit)
    shift = document["distance_shift"]
    assert shift["a"] == own_a["distance"]["pixels"] and shift["b"] == own_b["distance"]["pixels"]
    if np.shape(shift["a"]) == np.shape(shift["b"]):
        assert shift["matched"] is True
        expected = np.asarray(own_b["distance"]["pixels"]) - np.asarray(own_a["distance"]["pixels"])
        np.testing.assert_allclose(shift["shift"], expected, rtol=0, atol=1e-12)
    else:
        assert shift["matched"] is False and "differ" in shift["note"] and "shift" not in shift

    for section, key in (("rollout_difference", "rollout"), ("gradient_rollout_difference", "gradient_rollout")):
        maps = document[section]
        assert maps["a_mean_map"] == own_a[key]["mean_map"] and maps["b_mean_map"] == own_b[key]["mean_map"]
        grid_a, grid_b = np.shape(maps["a_mean_map"]), np.shape(maps["b_mean_map"])
        scaled_b = _scaled(maps["b_mean_map"])
        if grid_a != grid_b:
            assert maps["resampled_from"] == list(grid_b)
            scaled_b = resample_bilinear(scaled_b, grid_a)
        else:
            assert maps["resampled_from"] is None
        assert maps["grid"] == list(grid_a)
        np.testing.assert_allclose(maps["difference"], scaled_b - _scaled(maps["a_mean_map"]), atol=1e-12)


def _slow_difference_interval(b: list[float], a: list[float]) -> tuple[float, float]:
    """The 95% interval of the mean of b − a over the bootstrap's resamples, one resample at a time."""
    draws = bootstrap_indices(len(a))
    means = sorted(sum(b[i] - a[i] for i in row) / len(row) for row in draws.tolist())
    return tuple(float(v) for v in np.percentile(means, [2.5, 97.5]))  # type: ignore[return-value]


def test_compare_aucs_are_each_models_faithfulness(tmp_path: Path) -> None:
    """Each model's AUCs, intervals and method comparisons are those `faithfulness --dataset` writes for it on the
    same images with the same methods and steps; B − A per method and curve is the paired difference of the
    images' AUCs, its interval that of a loop over the resamples."""
    a, b, limit, methods, steps = _path("shapes-default"), _path("shapes-hybrid"), 6, "rollout,attention-last,random", 6
    figures = tmp_path / "figures"
    same = ["--dataset", "shapes", "--limit", str(limit), "--methods", methods, "--steps", str(steps)]
    document = _run(tmp_path, a, b, *same, "--batch-size", "4", "--figures", str(figures))
    section = document["faithfulness"]
    assert list(document)[-1] == "faithfulness" and section["methods"] == methods.split(",")
    assert section["num_images"] == limit and (figures / "faithfulness-aucs.png").is_file()
    own = {}
    for side, model in (("a", a), ("b", b)):
        out = tmp_path / f"faithfulness-{side}.json"
        assert main(["faithfulness", model, *same, "--json", str(out)]) == 0
        own[side] = json.loads(out.read_text())
        assert section[side]["protocol"] == own[side]["protocol"]
        assert section[side]["comparisons"] == own[side]["comparisons"]
        for method in section["methods"]:
            written = own[side]["methods"][method]
            assert section[side]["methods"][method] == {
                "deletion_auc": written["deletion_auc"],
                "insertion_auc": written["insertion_auc"],
                "deletion_auc_interval": written["deletion_auc_interval"],
                "insertion_auc_interval": written["insertion_auc_interval"],
                "num_images": limit,
            }
    for method in section["methods"]:
        for curve in ("deletion", "insertion"):
            per_a, per_b = ([i[f"{curve}_auc"] for i in own[s]["methods"][method]["per_image"]] for s in ("a", "b"))
            difference = section["difference"][method][curve]
            assert difference["first"] == "B" and difference["second"] == "A"
            assert difference["difference"] == pytest.approx(np.mean(np.subtract(per_b, per_a)), abs=1e-12)
            assert difference["interval"] == pytest.approx(_slow_difference_interval(per_b, per_a), abs=1e-12)
            low, high = difference["interval"]
            if low <= 0 <= high:
                assert difference["better"] is None
                assert difference["verdict"] == f"{curve}: A and B not told apart on these {limit} images."
            else:
                assert difference["better"] in ("A", "B") and difference["verdict"].startswith(f"{curve}: ")
            assert f"{method}, {difference['verdict']}" in section["verdict"]


def test_compare_on_image_files_and_figures(tmp_path: Path) -> None:
    a, b = _path("shapes-default"), _path("shapes-reg4")
    figures = tmp_path / "figures"
    cheap = ["--methods", "random", "--steps", "2"]
    document = _run(tmp_path, a, b, "--images", str(SAMPLES), "--batch-size", "4", "--figures", str(figures), *cheap)
    assert document["dataset"]["num_images"] == len(document["dataset"]["images"]) >= 4
    assert document["predictions"]["accuracy"] == {"a": None, "b": None}  # image files have no labels
    assert all(p["label"] == -1 for p in document["predictions"]["per_image"])
    assert document["faithfulness"]["num_images"] == document["dataset"]["num_images"]
    for stem in ("cka", "distance-shift", "map-differences", "faithfulness-aucs"):
        assert (figures / f"{stem}.png").is_file() and (figures / f"{stem}.svg").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset", "shapes", "--batch-size", "3", "--json", "-"], "--batch-size must be at least 4"),
        (["--json", "-"], "compare needs images"),
        (["--dataset", "shapes"], "nothing to write"),
        (["--dataset", "shapes", "--images", "x.png", "--json", "-"], "not both"),
        (["--dataset", "nope", "--json", "-"], "unknown dataset"),
        (["--dataset", "shapes", "--methods", "rollout,nope", "--json", "-"], "unknown method nope"),
        (["--dataset", "shapes", "--steps", "0", "--json", "-"], "--steps must be at least 1"),
        (["--dataset", "shapes", "--methods", "none", "--steps", "4", "--json", "-"], "--methods none"),
        (["--dataset", "shapes", "--steps", "100000", "--json", "-"], "more than the model's"),
    ],
)
def test_compare_mistakes_are_one_line_and_status_2(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _path("shapes-default")
    assert main(["compare", a, a, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_compare_refuses_an_unknown_model_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", _path("shapes-default"), "nope.safetensors", "--dataset", "shapes", "--json", "-"]) == 2
    assert "\n" not in capsys.readouterr().err.strip()
