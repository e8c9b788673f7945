"""`python -m vitviz compare A B`: every section against what each model's own analyses give (the single-model
JSON of `analyze --dataset`, plain forwards for the predictions), on two pairs of architectures; the mistakes a user
can make are one line and status 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitviz.analysis.differences import resample_bilinear
from vitviz.cli import main

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
    document = _run(tmp_path, a, b, "--dataset", "shapes", "--limit", str(limit), "--batch-size", "4")
    assert list(document) == [
        "models",
        "dataset",
        "cka",
        "predictions",
        "distance_shift",
        "rollout_difference",
        "gradient_rollout_difference",
    ]
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


def test_compare_on_image_files_and_figures(tmp_path: Path) -> None:
    a, b = _path("shapes-default"), _path("shapes-reg4")
    figures = tmp_path / "figures"
    document = _run(tmp_path, a, b, "--images", str(SAMPLES), "--batch-size", "4", "--figures", str(figures))
    assert document["dataset"]["num_images"] == len(document["dataset"]["images"]) >= 4
    assert document["predictions"]["accuracy"] == {"a": None, "b": None}  # image files have no labels
    assert all(p["label"] == -1 for p in document["predictions"]["per_image"])
    for stem in ("cka", "distance-shift", "map-differences"):
        assert (figures / f"{stem}.png").is_file() and (figures / f"{stem}.svg").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset", "shapes", "--batch-size", "3", "--json", "-"], "--batch-size must be at least 4"),
        (["--json", "-"], "compare needs images"),
        (["--dataset", "shapes"], "nothing to write"),
        (["--dataset", "shapes", "--images", "x.png", "--json", "-"], "not both"),
        (["--dataset", "nope", "--json", "-"], "unknown dataset"),
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
