"""`python -m vitviz analyze` and `info --json` keep their output: the JSON written before the analysis
service was introduced (tests/golden, made with OMP_NUM_THREADS=1) is reproduced key for key.

Strings, ints and list shapes must be identical. Floats may differ, since the last bits depend on the number
of threads torch uses and on the CPU's kernels (float32 sums in another order): by 1e-6 relative, or by an
absolute bound taken from how each number is computed (`tolerances`), never from what one machine printed:

- `distance.std`, the spread of the per-image distances over a few images, can be far smaller than the
  distances themselves; a population standard deviation moves by at most the largest change of the values it is
  taken over (|std(x) - std(y)| <= max |x - y|), so its error is the distances' own: 1e-6 of the largest one.
- rollout and gradient-rollout maps are rows pulled through L layers of N x N float32 products: the classical
  bound for such sums is about L * N * eps32 of the largest entry, which is what a small entry may move by.
- filter components are unit vectors of length n from float32 filters: n * eps32 per entry.
- everything else: 1e-7 absolute.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import safetensors.numpy

from vitviz.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
DEFAULT = "assets/checkpoints/shapes-default.safetensors"
SAMPLES = "assets/samples"
REL, ABS = 1e-6, 1e-7
EPS32 = 2.0**-23

CASES = {
    "shapes-default": [
        DEFAULT,
        "--images",
        f"{SAMPLES}/circle.png",
        f"{SAMPLES}/star.png",
        f"{SAMPLES}/triangle.png",
    ],
    "vit_tiny": [
        "timm:vit_tiny_patch16_224",
        "--images",
        f"{SAMPLES}/circle.png",
        f"{SAMPLES}/star.png",
        "--components",
        "8",
    ],
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _in_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    """The golden files name the model and images by the relative paths they were made with."""
    monkeypatch.chdir(ROOT)


def _largest(values: Any) -> float:
    return max(_largest(v) for v in values) if isinstance(values, list) else abs(values)


def tolerances(where: str, expected: dict[str, Any], document: dict[str, Any]) -> dict[str, float]:
    """The absolute tolerance of each key of the section at `where` (see the module's docstring)."""
    bounds = {key: ABS for key in expected}
    model = document.get("model", {})
    if where == "$.distance" and "pixels" in expected:
        bounds["std"] = max(ABS, REL * _largest(expected["pixels"]))
    if where.startswith(("$.rollout[", "$.gradient_rollout[")) and "map" in expected and model:
        tokens = model["grid"][0] * model["grid"][1] + model["num_prefix_tokens"]
        bounds["map"] = max(ABS, model["depth"] * tokens * EPS32 * _largest(expected["map"]))
    if where == "$.filters" and expected.get("components"):
        bounds["components"] = max(ABS, len(expected["components"][0]) * EPS32)
    return bounds


def differences(
    got: Any, expected: Any, where: str = "$", abs_tol: float = ABS, document: dict[str, Any] | None = None
) -> list[str]:
    """Where two JSON documents disagree: keys, types, strings, ints and lengths exactly, floats within REL or
    the absolute bound of `tolerances`."""
    document = expected if document is None else document
    if type(got) is not type(expected):
        return [f"{where}: {type(got).__name__} != {type(expected).__name__}"]
    if isinstance(expected, dict):
        if list(got) != list(expected):
            return [f"{where}: keys {list(got)} != {list(expected)}"]
        bounds = tolerances(where, expected, document)
        return [
            d for key in expected for d in differences(got[key], expected[key], f"{where}.{key}", bounds[key], document)
        ]
    if isinstance(expected, list):
        if len(got) != len(expected):
            return [f"{where}: length {len(got)} != {len(expected)}"]
        return [
            d
            for i, (g, e) in enumerate(zip(got, expected))
            for d in differences(g, e, f"{where}[{i}]", abs_tol, document)
        ]
    if isinstance(expected, float):
        close = math.isclose(got, expected, rel_tol=REL, abs_tol=abs_tol)
        return [] if close else [f"{where}: {got!r} != {expected!r}"]
    return [] if got == expected else [f"{where}: {got!r} != {expected!r}"]


def _golden(name: str) -> dict[str, Any]:
    with gzip.open(GOLDEN / f"{name}.json.gz", "rt", encoding="utf-8") as handle:
        return json.load(handle)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_analyze_reproduces_the_golden_json(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"{name}.json"
    _cli(capsys, "analyze", *CASES[name], "--json", str(out))
    expected = _golden(name)
    assert set(expected) == {"model", "filters", "position", "distance", "rollout", "gradient_rollout"}
    assert differences(json.loads(out.read_text(encoding="utf-8")), expected) == []


def test_the_comparison_catches_what_it_must() -> None:
    expected = _golden("shapes-default")
    assert differences(expected, expected) == []
    changed = json.loads(json.dumps(expected))
    changed["rollout"][1]["map"][3][4] *= 1 + 1e-3
    changed["rollout"][2]["top5"][0][0] = "square"
    changed["distance"]["num_images"] = 3.0
    changed["position"]["similarity"][0].pop()
    changed["gradient_rollout"][0]["extra"] = 1
    changed["distance"]["std"][0][0] += 2e-6 * max(max(row) for row in expected["distance"]["pixels"])
    found = differences(changed, expected)
    assert len(found) == 6, found
    assert differences({"b": 1, "a": 2}, {"a": 2, "b": 1}) != []  # key order is part of the byte output


def _checkpoint_metadata(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return json.loads(header["__metadata__"]["vitviz"])


def test_info_json_is_the_model_section_and_the_checkpoints_own_description(
    capsys: pytest.CaptureFixture[str],
) -> None:
    card = json.loads(_cli(capsys, "info", DEFAULT, "--json"))
    path = ROOT / DEFAULT
    meta = _checkpoint_metadata(path)
    assert list(card) == [
        *_golden("shapes-default")["model"],
        "parameters",
        "in_chans",
        "mean",
        "std",
        "config",
        "class_names",
        "training",
        "resolution_history",
        "content_hash",
    ]
    assert {k: card[k] for k in _golden("shapes-default")["model"]} == _golden("shapes-default")["model"]
    assert card["parameters"] == sum(int(t.size) for t in safetensors.numpy.load_file(str(path)).values())
    for key in ("in_chans", "mean", "std", "config", "class_names", "training", "resolution_history"):
        assert card[key] == meta[key], key
    assert card["content_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
    text = _cli(capsys, "info", DEFAULT)
    gh, gw = card["grid"]
    assert f"tokens      {gh}x{gw} patches of 4x4 px + 1 prefix token(s)" in text
    assert f"parameters  {card['parameters']:,}" in text
    assert f"variant     position embedding {meta['config']['pos_embed']}, stem patch" in text


def test_info_json_of_a_timm_model_has_no_config_and_imagenet_classes(capsys: pytest.CaptureFixture[str]) -> None:
    card = json.loads(_cli(capsys, "info", "timm:vit_tiny_patch16_224", "--json"))
    assert {k: card[k] for k in _golden("vit_tiny")["model"]} == _golden("vit_tiny")["model"]
    assert card["config"] is None and len(card["class_names"]) == 1000 == card["num_classes"]
    assert card["mean"] == card["std"] == [0.5, 0.5, 0.5]  # timm's pretrained_cfg for this model
    assert card["training"] == {"source": "timm", "pretrained": False, "weights": None}
    assert card["content_hash"] == hashlib.sha256(b"timm:vit_tiny_patch16_224").hexdigest()
