"""Hostile, broken and odd-but-valid images through the Python API, the command line and the app's upload.

Bad files (empty, random, text, truncated JPEG/PNG/GIF, SVG/PDF/EPS/HEIC/ICO under image names, decompression
bombs of every format) must give one error line naming the file; bombs must be refused from their header,
before a pixel is decoded, under `vitviz.images.MAX_PIXELS`. Odd files (CMYK, 16-bit and float grey, palette
and alpha transparency, 1-bit, EXIF orientations 1-8, animated GIF/WebP/PNG, multi-page TIFF, 1x1, 1x65535)
must show exactly the pixels a viewer shows (written out independently in conftest.py), and their analysis
must equal the analysis of a plain PNG holding those pixels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageFile

from tests.reliability.conftest import (
    APP_MEMORY_LIMIT,
    MEMORY_LIMIT,
    ROOT,
    ImageCase,
    Sandbox,
    bad_images,
    odd_images,
    one_line_cli_error,
)
from vitviz.errors import VitvizError
from vitviz.images import MAX_PIXELS, decode_image, load_for_model

BAD = {case.name: case for case in bad_images()}
ODD = {case.name: case for case in odd_images()}
ALL = {**BAD, **ODD}
APP_CHECKPOINT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"


def test_at_least_40_image_cases_and_the_documented_pixel_limit() -> None:
    assert len(ALL) == len(BAD) + len(ODD) >= 40
    assert sum(case.bomb for case in BAD.values()) >= 5
    assert MAX_PIXELS == 40_000_000  # docs/reliability.md quotes this limit


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for case in ALL.values():
        path = folder / case.name / case.filename
        path.parent.mkdir()
        path.write_bytes(case.data)
        paths[case.name] = path
    return paths


# --- the Python API ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BAD))
def test_api_refuses_bad_images_with_one_line_naming_the_file(name: str, image_files, tally: dict) -> None:
    case = BAD[name]
    tally["images: API"]["cases"] += 1
    for source in (image_files[name], case.data):
        with pytest.raises(VitvizError) as info:
            load_for_model(
                source, input_size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, in_chans=3, name=case.filename
            )
        message = str(info.value)
        assert "\n" not in message and f"'{case.filename}'" in message, message
        assert case.fragment in message, message


@pytest.mark.parametrize("name", [n for n, c in BAD.items() if c.bomb])
def test_bombs_are_refused_from_the_header_before_decoding(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape either
        with pytest.raises(VitvizError, match="pixel limit"):
            decode_image(BAD[name].data, name=BAD[name].filename)
    assert decoded == [], "pixels were decoded before the refusal"


@pytest.mark.parametrize("name", list(ODD))
def test_api_shows_the_pixels_a_viewer_shows(name: str, image_files, tally: dict) -> None:
    case = ODD[name]
    tally["images: API"]["cases"] += 1
    decoded = np.asarray(decode_image(image_files[name]))
    assert decoded.shape == case.expected.shape and decoded.dtype == np.uint8
    difference = np.abs(decoded.astype(int) - case.expected.astype(int)).max()
    assert difference <= case.tolerance, f"{name}: pixels differ by up to {difference}"
    x = load_for_model(image_files[name], input_size=(16, 24), mean=(0.5,) * 3, std=(0.25,) * 3, in_chans=3)
    assert x.shape == (3, 16, 24) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())


def test_decoding_every_case_stays_within_the_memory_bound(image_files, sandbox: Sandbox, tally: dict) -> None:
    """All cases in one child under RLIMIT_AS: nothing crashes and the resident set grows by a bounded amount."""
    child = sandbox.run(
        "decode_all", paths=[[name, str(path)] for name, path in image_files.items()], memory_limit=MEMORY_LIMIT
    )
    assert child.exit_code == 0, child.stderr[-3000:]
    for name, outcome in child.result.items():
        expected = "accepted" if ALL[name].valid else "refused"
        assert outcome["decode"]["outcome"] == outcome["tensor"]["outcome"] == expected, (name, outcome)
    tally["images: API"]["peak RSS growth MiB (all cases, one process)"] = (child.rss_growth or 0) >> 20
    assert child.rss_growth < MEMORY_LIMIT


# --- the command line -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_results(image_files, tiny_checkpoint: Path, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("image-cli")
    child = sandbox.run(
        "image_cli",
        checkpoint=str(tiny_checkpoint),
        cases=[[name, str(path)] for name, path in image_files.items()],
        workdir=str(workdir),
        memory_limit=MEMORY_LIMIT,
        timeout=600,
    )
    assert child.exit_code == 0, child.stderr[-3000:]
    assert child.rss_growth < MEMORY_LIMIT
    return child.result


@pytest.mark.parametrize("name", list(BAD))
def test_cli_refuses_bad_images_with_status_2_and_one_line(name: str, cli_results: dict, tally: dict) -> None:
    result = cli_results[name]["file"]
    counts = tally["images: CLI"]
    counts["cases"] += 1
    counts["tracebacks"] += "Traceback" in result["stderr"]
    assert result["code"] == 2, result
    line = one_line_cli_error(result)
    assert f"'{BAD[name].filename}'" in line and BAD[name].fragment in line, line


@pytest.mark.parametrize("name", list(ODD))
def test_cli_analyses_odd_images_as_the_pixels_they_show(name: str, cli_results: dict, tally: dict) -> None:
    """The rollout of the odd file equals the rollout of a plain PNG of its (independently checked) pixels."""
    result, plain = cli_results[name]["file"], cli_results[name]["plain"]
    counts = tally["images: CLI"]
    counts["cases"] += 1
    counts["tracebacks"] += "Traceback" in result["stderr"]
    assert result["code"] == 0 and plain["code"] == 0, (result["stderr"], plain["stderr"])
    (rollout,), (reference,) = result["json"]["rollout"], plain["json"]["rollout"]
    np.testing.assert_allclose(rollout["map"], reference["map"], rtol=1e-5, atol=1e-7)
    assert [c for c, _ in rollout["top5"]] == [c for c, _ in reference["top5"]]
    np.testing.assert_allclose([p for _, p in rollout["top5"]], [p for _, p in reference["top5"]], atol=1e-6)
    assert np.isfinite(rollout["map"]).all()


# --- the app ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_results(image_files, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """All files uploaded at once on /rollout (shapes-default model); then every valid one picked in turn."""
    folder = tmp_path_factory.mktemp("image-app")
    files = [[ALL[name].filename, str(path)] for name, path in image_files.items()]
    assert len({f for f, _ in files}) == len(files), "upload names must be unique to tell the errors apart"
    child = sandbox.run(
        "app_image_uploads",
        files=files,
        cache_dir=str(folder / "cache"),
        runs_dir=str(folder / "runs"),
        valid=[case.filename for case in ODD.values()],
        memory_limit=APP_MEMORY_LIMIT,
        timeout=600,
    )
    assert child.exit_code == 0, child.stderr[-3000:]
    pictures = {}
    for name, case in ODD.items():
        np.save(folder / f"{name}.npy", case.expected)
        pictures[case.filename] = str(folder / f"{name}.npy")
    reference = sandbox.run("reference_probabilities", checkpoint=str(APP_CHECKPOINT), pictures=pictures)
    assert reference.exit_code == 0, reference.stderr[-3000:]
    return {"app": child.result, "reference": reference.result, "rss": child.rss_growth}


def test_app_upload_of_every_case_raises_nothing(app_results: dict, tally: dict) -> None:
    upload = app_results["app"]["upload"]
    tally["images: app"]["peak RSS growth MiB (whole session)"] = (app_results["rss"] or 0) >> 20
    assert upload["exceptions"] == [], upload["exceptions"]
    assert upload["titles"] == ["Attention rollout"]


@pytest.mark.parametrize("name", list(BAD))
def test_app_shows_one_error_per_bad_image(name: str, app_results: dict, tally: dict) -> None:
    errors = app_results["app"]["upload"]["errors"]
    counts = tally["images: app"]
    counts["cases"] += 1
    mine = [e for e in errors if f"'{BAD[name].filename}'" in e]
    assert len(mine) == 1, errors
    assert "\n" not in mine[0] and BAD[name].fragment in mine[0], mine


@pytest.mark.parametrize("name", list(ODD))
def test_app_explains_odd_images_as_the_pixels_they_show(name: str, app_results: dict, tally: dict) -> None:
    """The app's top-5 for the odd file equals the model's prediction on the pixels a viewer shows."""
    case: ImageCase = ODD[name]
    shown = app_results["app"]["top5"][case.filename]
    counts = tally["images: app"]
    counts["cases"] += 1
    counts["crashes"] += bool(shown["exceptions"])
    captions = shown["input_caption"]
    assert shown["exceptions"] == [] and len(captions) == 1, shown
    assert captions[0].startswith(f"Input: {case.filename}, as the model sees it"), shown
    assert not any(f"'{case.filename}'" in e for e in shown["errors"]), shown["errors"]
    expected = np.asarray(app_results["reference"][case.filename])
    order = np.argsort(-expected, kind="stable")[:5]
    atol = 1e-5 if case.tolerance == 0 else 2e-3  # a pixel off by one level moves a probability by far less
    np.testing.assert_allclose(shown["probabilities"], expected[order], atol=atol)
