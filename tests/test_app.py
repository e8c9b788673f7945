"""The studio through Streamlit's AppTest: every page on the bundled default checkpoint, uploads (good and
bad), the model picker and its URL, /compare with two checkpoints and /train's run list.

Expected numbers come from the checkpoint files read here with safetensors and numpy/torch directly (not
through the app's code), following the definitions in docs/design.md.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
TIMEOUT = 120
REFRESH = 2.0  # seconds between re-reads of a live run on /train

PAGES = {
    "overview": ("vitviz/ui/overview.py", "vitviz studio"),
    "filters": ("vitviz/ui/filters.py", "Patch-embedding filters"),
    "position": ("vitviz/ui/position.py", "Position embeddings"),
    "distance": ("vitviz/ui/distance.py", "Mean attention distance"),
    "rollout": ("vitviz/ui/rollout.py", "Attention rollout"),
    "tokens": ("vitviz/ui/tokens.py", "What tokens carry"),
    "trust": ("vitviz/ui/trust.py", "Which map to trust?"),
    "compare": ("vitviz/ui/compare.py", "Compare models"),
    "train": ("vitviz/ui/train.py", "Train"),
}


@pytest.fixture(autouse=True)
def app_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Each test gets its own runs folder and cache folder (the app reads both from the environment)."""
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    runs.mkdir()
    monkeypatch.setenv("VITVIZ_RUNS_DIR", str(runs))
    monkeypatch.setenv("VITVIZ_CACHE_DIR", str(cache))
    return {"runs": runs, "cache": cache}


def _other_bundled(*, same_grid: bool = False) -> Path:
    """Another bundled checkpoint; with same_grid, one whose patch grid equals the default's (for difference maps)."""
    others = sorted(p for p in DEFAULT.parent.glob("*.safetensors") if p != DEFAULT)
    if same_grid:

        def grid(path: Path) -> tuple:
            config = _meta(path)["config"]
            return tuple(s // config["patch_size"] for s in config["img_size"])

        others = [p for p in others if grid(p) == grid(DEFAULT)]
    assert others, "assets/checkpoints needs a second bundled checkpoint"
    return others[0]


def _open(page: str = "overview", query: dict[str, object] | None = None) -> AppTest:
    assert DEFAULT.is_file(), f"the bundled default checkpoint {DEFAULT} is missing"
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()
    if page != "overview":
        at.switch_page(PAGES[page][0]).run()
    _assert_clean(at)
    return at


def _assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _text(element: object) -> str:
    """An element's text with Markdown escapes removed (the app escapes user- and model-derived text)."""
    return str(getattr(element, "value", element)).replace("\\", "")


def _errors(at: AppTest) -> list[str]:
    return [_text(e) for e in at.error]


def _query(at: AppTest, key: str) -> list[str]:
    value = at.query_params.get(key, [])
    return [value] if isinstance(value, str) else list(value)


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _keyed(elements: object, prefix: str) -> object:
    """The one widget of `elements` whose key starts with `prefix` (model-dependent widgets carry the model)."""
    found = [e for e in elements if str(e.key or "").startswith(prefix)]
    assert len(found) == 1, [e.key for e in elements]
    return found[0]


def _charts(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def _array(value: object) -> np.ndarray:
    """A plotly trace array, plain or base64-typed ({"dtype", "bdata", "shape"})."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if shape:
            flat = flat.reshape([int(s) for s in str(shape).split(",")])
        return flat.astype(np.float64)
    return np.asarray(value, dtype=np.float64)


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(path))


def _meta(path: Path) -> dict:
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    return json.loads(header["__metadata__"]["vitviz"])


def _cosine_similarity_tiles(path: Path) -> np.ndarray:
    """docs/design.md: cosine similarity of the patch positions' embeddings, [gh, gw, gh, gw] (slow, obvious)."""
    meta = _meta(path)
    config = meta["config"]
    gh, gw = (s // config["patch_size"] for s in config["img_size"])
    tensors = _tensors(path)
    if "pos_embed" in tensors:
        table = tensors["pos_embed"].reshape(-1, config["embed_dim"]).astype(np.float64)
        table = table[table.shape[0] - gh * gw :]  # drop the class token's entry when the table has one
    else:  # factorised 2D: patch (r, c) is column c's X half followed by row r's Y half
        xs, ys = tensors["pos_embed_x"][0].astype(np.float64), tensors["pos_embed_y"][0].astype(np.float64)
        table = np.array([np.concatenate([xs[c], ys[r]]) for r in range(gh) for c in range(gw)])
    out = np.zeros((gh, gw, gh, gw))
    for i in range(gh * gw):
        for j in range(gh * gw):
            a, b = table[i], table[j]
            out[i // gw, i % gw, j // gw, j % gw] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return out


def _tile(mosaic: np.ndarray, row: int, col: int, size: tuple[int, int]) -> np.ndarray:
    """Tile (row, col) of a mosaic with 1-pixel gaps."""
    h, w = size
    return mosaic[row * (h + 1) : row * (h + 1) + h, col * (w + 1) : col * (w + 1) + w]


def _png(width: int, height: int, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    picture = Image.new("RGB", (width, height), (240, 240, 240))
    for x in range(width // 4, 3 * width // 4):
        for y in range(height // 3, 2 * height // 3):
            picture.putpixel((x, y), colour)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _reference_probabilities(path: Path, picture: Image.Image) -> np.ndarray:
    """Class probabilities of the checkpoint on a picture: resize, normalise, forward, softmax (no vitviz.images)."""
    from vitviz.models import load_model

    loaded = load_model(str(path))
    meta = _meta(path)
    height, width = meta["input_size"]
    pixels = (
        np.asarray(picture.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    )
    pixels = (pixels - np.array(meta["mean"], dtype=np.float32)) / np.array(meta["std"], dtype=np.float32)
    with torch.no_grad():
        logits = loaded.model(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    return logits.softmax(dim=-1)[0].numpy()


# --- every page on the default checkpoint ------------------------------------------------------------


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders_on_the_default_checkpoint_with_downloads(page: str) -> None:
    at = _open(page)
    assert [t.value for t in at.title] == [PAGES[page][1]]
    assert _errors(at) == []
    assert at.sidebar.selectbox(key="vv.model.widget").value == "bundled:shapes-default"
    assert _query(at, "model") == ["bundled:shapes-default"]
    if page != "train":
        labels = [b.label for b in at.get("download_button")]
        assert any(label.endswith(".png") or label == "PNG" for label in labels), labels  # compare: a figure picker
        assert any(label.endswith(".svg") or label == "SVG" for label in labels), labels
        assert any(label.endswith((".csv", ".npz")) for label in labels), labels
    if page == "overview":  # the bundled default's run log ships beside it, so its curves can be exported
        assert {"training-curves.png", "training-curves.svg", "metrics.csv"} <= set(labels), labels


def test_overview_card_reports_the_checkpoints_architecture() -> None:
    at = _open("overview")
    config = _meta(DEFAULT)["config"]
    parameters = sum(int(t.size) for t in _tensors(DEFAULT).values())
    expected = f"{parameters / 1e6:.2f} M" if parameters >= 1e5 else f"{parameters:,}"
    assert _metric(at, "Parameters") == expected
    assert _metric(at, "Layers × heads") == f"{config['depth']} × {config['num_heads']}"
    gh, gw = (s // config["patch_size"] for s in config["img_size"])
    assert _metric(at, "Tokens") == f"{gh}×{gw} + 1"


def _card_rows(at: AppTest) -> dict[str, str]:
    """The model card's property/value rows (both Markdown tables, so long values wrap instead of being cut)."""
    rows: dict[str, str] = {}
    for block in at.markdown:
        lines = block.value.splitlines()
        if not lines or lines[0] != "| property | value |":
            continue
        for line in lines[2:]:
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]  # cells between unescaped pipes
            assert len(cells) == 2, line
            rows[_text(cells[0]).strip()] = _text(cells[1]).replace("\u200b", "").strip()  # wrap points
    return rows


def test_overview_card_shows_long_values_whole_in_wrapping_tables() -> None:
    at = _open("overview")
    rows = _card_rows(at)
    assert rows["source"] == str(DEFAULT.relative_to(ROOT))  # assets/checkpoints/shapes-default.safetensors, whole
    assert rows["architecture"] == _meta(DEFAULT)["arch"]
    names = _meta(DEFAULT)["class_names"]
    assert rows["classes"].startswith(f"{len(names)}: {names[0]}")
    assert "source" not in {str(v) for frame in (d.value for d in at.dataframe) for v in frame.get("property", [])}


def test_overview_card_says_where_in_its_run_a_best_checkpoint_was_saved(app_folders: dict[str, Path]) -> None:
    from training import presets
    from training.engine import RunOptions, run

    # tiny: 4 steps an epoch, 2 epochs; stopped after 6 steps, so best was saved at the end of epoch 1.
    run(presets.tiny(), RunOptions(runs_dir=app_folders["runs"], run_id="tiny-r1", device="cpu", max_steps=6))
    folder = app_folders["runs"] / "tiny-r1"
    saved = _meta(folder / "best.safetensors")["training"]
    logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last_step = max(r["step"] for r in logged if "step" in r)
    assert saved["steps"] < last_step  # the situation the card must explain
    at = _open("overview", query={"model": "run:tiny-r1"})
    assert at.sidebar.selectbox(key="vv.model.widget").value == "run:tiny-r1"
    rows = _card_rows(at)
    assert rows["checkpoint"] == (
        f"best, saved at epoch {saved['epochs']} step {saved['steps']} of a run of {saved['epochs_planned']} epochs"
    )
    assert "epochs" not in rows and "steps" not in rows  # no bare counts that read as the run's length
    assert any(f"the curves run to step {last_step}" in _text(c) for c in at.caption)
    assert not _charts(at) and len(at.get("image")) == 1  # a picture of the curves until asked for the chart
    at.toggle(key="overview.curves.interactive").set_value(True).run()
    curves = next(c for c in _charts(at) if any("loss" in str(t.get("name")) for t in c["data"]))
    marks = [shape for shape in curves["layout"].get("shapes", []) if shape.get("x0") == shape.get("x1")]
    assert marks and {m["x0"] for m in marks} == {saved["steps"]}  # a line on each panel of the curves


def test_filters_page_states_the_explained_variance_of_the_top_components() -> None:
    at = _open("filters")
    k = _keyed(at.slider, "filters.k").value
    weight = _tensors(DEFAULT)["patch_embed.proj.weight"].astype(np.float64)
    flat = weight.reshape(weight.shape[0], -1)
    singular = np.linalg.svd(flat - flat.mean(axis=0), compute_uv=False)
    share = (singular[:k] ** 2).sum() / (singular**2).sum()
    captions = " ".join(_text(c) for c in at.caption)
    assert f"The first {k} components explain {100 * share:.1f} %" in captions


def test_position_page_draws_the_cosine_similarity_of_the_embeddings() -> None:
    at = _open("position")
    expected = _cosine_similarity_tiles(DEFAULT)
    gh, gw = expected.shape[:2]
    mosaic = _array(_charts(at)[0]["data"][0]["z"])
    assert mosaic.shape == (gh * (gh + 1) - 1, gw * (gw + 1) - 1)
    for row in range(gh):
        for col in range(gw):
            np.testing.assert_allclose(_tile(mosaic, row, col, (gh, gw)), expected[row, col], atol=1e-5)


@pytest.mark.parametrize("other", ["shapes-finetune-hires", "shapes-sincos"])  # 12 x 12 patches; 8 x 8 as the default
def test_position_patch_sliders_start_afresh_on_the_new_models_grid(other: str) -> None:
    at = _open("position")
    _keyed(at.slider, "position.row").set_value(8).run()
    at.sidebar.selectbox(key="vv.model.widget").set_value(f"bundled:{other}").run()
    _assert_clean(at)
    config = _meta(ROOT / "assets" / "checkpoints" / f"{other}.safetensors")["config"]
    side = config["img_size"][0] // config["patch_size"]
    row = _keyed(at.slider, "position.row")
    assert (row.max, row.value) == (side, (side + 1) // 2)  # the new model's centre, not a row picked before


def test_distance_page_modes_and_units_agree() -> None:
    at = _open("distance")
    paper = at.dataframe[0].value
    assert len(paper) == _meta(DEFAULT)["config"]["depth"]
    width = _meta(DEFAULT)["input_size"][1]
    np.testing.assert_allclose(paper["mean % of width"], (100 * paper["mean px"] / width).round(1), atol=0.11)
    at.segmented_control(key="distance.mode").set_value("renormalised").run()
    _assert_clean(at)
    renormalised = at.dataframe[0].value
    # "paper" drops the attention paid to the class token without renormalising, so it can only be shorter.
    assert (renormalised["mean px"].to_numpy() >= paper["mean px"].to_numpy() - 0.05).all()
    assert (renormalised["mean px"].to_numpy() > paper["mean px"].to_numpy()).any()


def _distance_upload(at: AppTest, files: list[tuple[str, bytes, str]], *, folder: bool = False) -> dict:
    """Upload `files` on /distance (as files or as a folder) and return the per-layer table as columns."""
    at.selectbox(key="distance.set").set_value("my uploads").run()
    if folder:
        at.toggle(key="distance.folder").set_value(True).run()
    at.file_uploader(key="distance.upload.folder" if folder else "distance.upload").set_value(files).run()
    _assert_clean(at)
    assert _errors(at) == []
    return at.dataframe[0].value


def test_distance_takes_several_uploads_at_once_and_averages_them() -> None:
    files = [
        (f"box-{i}.png", _png(48 + 16 * i, 40, colour), "image/png")
        for i, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)])
    ]
    at = _open("distance")
    together = _distance_upload(at, files)
    assert any(c["layout"]["title"]["text"].startswith("3 images") for c in _charts(at))
    singles = [_distance_upload(_open("distance"), [one])["mean px"].to_numpy() for one in files]
    # The mean distance over the images is the mean of each image's own (both rounded to 0.1 px on the page).
    np.testing.assert_allclose(together["mean px"].to_numpy(), np.mean(singles, axis=0), atol=0.1)
    folder = _distance_upload(_open("distance"), files, folder=True)
    np.testing.assert_allclose(folder["mean px"].to_numpy(), together["mean px"].to_numpy())


# --- rollout with uploads --------------------------------------------------------------------------------


def test_rollout_on_an_uploaded_image_shows_the_models_top5_and_overlays() -> None:
    at = _open("rollout")
    data = _png(100, 80)
    at.file_uploader(key="rollout.images.upload").set_value(("red-box.png", data, "image/png")).run()
    _assert_clean(at)
    assert _errors(at) == []
    assert any("red-box.png" in _text(c) for c in at.caption)
    top5 = at.dataframe[0].value
    expected = _reference_probabilities(DEFAULT, Image.open(io.BytesIO(data)))
    names = _meta(DEFAULT)["class_names"]
    order = np.argsort(-expected)[:5]
    assert list(top5["class"]) == [names[i] for i in order]
    np.testing.assert_allclose(top5["probability"].to_numpy(), expected[order], atol=1e-5)
    overlays = [c for c in _charts(at) if len(c["data"]) == 2 and c["data"][0]["type"] == "image"]
    assert len(overlays) == 2  # attention rollout and gradient rollout


def test_rollout_honours_exif_orientation_of_an_uploaded_jpeg() -> None:
    upright = Image.new("RGB", (90, 60), (20, 20, 20))
    for x in range(30):
        for y in range(60):
            upright.putpixel((x, y), (250, 250, 0))  # a yellow band on the left of the upright picture
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote; EXIF 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    at = _open("rollout")
    at.file_uploader(key="rollout.images.upload").set_value(("phone.jpg", buffer.getvalue(), "image/jpeg")).run()
    _assert_clean(at)
    from PIL import ImageOps

    expected = _reference_probabilities(DEFAULT, ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))
    order = np.argsort(-expected)[:5]
    np.testing.assert_allclose(at.dataframe[0].value["probability"].to_numpy(), expected[order], atol=1e-5)


def test_bad_image_upload_shows_an_error_and_the_page_keeps_working() -> None:
    at = _open("rollout")
    at.file_uploader(key="rollout.images.upload").set_value(
        [("broken.png", b"this is not a picture", "image/png"), ("ok.png", _png(64, 64), "image/png")]
    ).run()
    _assert_clean(at)
    errors = _errors(at)
    assert len(errors) == 1 and "broken.png" in errors[0] and "could not read image" in errors[0]
    assert any("ok.png" in _text(c) for c in at.caption)  # the good upload is still explained
    assert len(at.dataframe[0].value) == 5


# --- the model picker ----------------------------------------------------------------------------------------


def test_model_in_the_url_is_selected_and_shown() -> None:
    other = _other_bundled()
    at = _open("overview", query={"model": f"bundled:{other.stem}"})
    assert at.sidebar.selectbox(key="vv.model.widget").value == f"bundled:{other.stem}"
    assert _card_rows(at)["position embedding"] == _meta(other)["config"]["pos_embed"]


def test_unknown_model_in_the_url_falls_back_to_the_default_with_a_warning() -> None:
    at = _open("overview", query={"model": "bundled:no-such-model"})
    assert at.sidebar.selectbox(key="vv.model.widget").value == "bundled:shapes-default"
    assert any("no-such-model" in _text(w) for w in at.warning)


def test_uploaded_checkpoint_becomes_the_selection() -> None:
    other = _other_bundled()
    at = _open("overview")
    at.file_uploader(key="vv.add.upload").set_value((other.name, other.read_bytes(), "application/octet-stream")).run()
    _assert_clean(at)
    selected = at.sidebar.selectbox(key="vv.model.widget").value
    assert selected.startswith("upload:")
    assert _query(at, "model") == [selected]
    assert _card_rows(at)["position embedding"] == _meta(other)["config"]["pos_embed"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage that is not safetensors", "not a readable .safetensors file"),
        (safetensors.numpy.save({"w": np.zeros(3, dtype=np.float32)}), "without vitviz metadata"),
    ],
)
def test_bad_checkpoint_upload_shows_an_error_and_keeps_the_model(content: bytes, message: str) -> None:
    at = _open("filters")
    at.file_uploader(key="vv.add.upload").set_value(("bad.safetensors", content, "application/octet-stream")).run()
    _assert_clean(at)
    errors = _errors(at)
    assert any(message in e and "bad.safetensors" in e for e in errors), errors
    assert at.sidebar.selectbox(key="vv.model.widget").value == "bundled:shapes-default"
    assert [t.value for t in at.title] == ["Patch-embedding filters"]


def _load_model_button(at: AppTest) -> object:
    """The add-model box's button: a form's submit button, so Enter in the name box presses it."""
    return next(b for b in at.get("form_submit_button") if b.label == "Load model")


def _add_model_box(at: AppTest) -> object:
    return next(e for e in at.sidebar.expander if e.label == "Add a model")


def test_add_model_box_stays_open_after_an_error_with_one_short_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitviz.models import factory

    monkeypatch.setattr(factory, "weights_host_reachable", lambda *args, **kwargs: False)
    at = _open("rollout")
    assert _add_model_box(at).proto.expanded is False
    at.session_state["vv.add.open"] = True  # the user opens the box
    at.run()
    at.text_input(key="vv.add.timm").set_value("vit_tiny_patch16_224")
    at.checkbox(key="vv.add.pretrained").check()
    _load_model_button(at).click().run()  # Enter in the name box submits the same form
    _assert_clean(at)
    assert _add_model_box(at).proto.expanded is True  # still open, to correct the name or the checkbox
    (error,) = _errors(at)
    assert "need the network" in error and "Untick pretrained weights" in error
    assert "--weights" not in error and "Error" not in error and "\n" not in error
    assert at.sidebar.selectbox(key="vv.model.widget").value == "bundled:shapes-default"
    at.checkbox(key="vv.add.pretrained").uncheck()  # random weights work offline
    _load_model_button(at).click().run()
    _assert_clean(at)
    assert at.sidebar.selectbox(key="vv.model.widget").value == "timm:vit_tiny_patch16_224"


def test_unknown_timm_name_shows_an_error_and_keeps_the_model() -> None:
    at = _open("overview")
    at.text_input(key="vv.add.timm").set_value("vit_no_such_model_xyz")
    _load_model_button(at).click().run()
    _assert_clean(at)
    assert any("unknown timm model" in e for e in _errors(at)), _errors(at)
    assert at.sidebar.selectbox(key="vv.model.widget").value == "bundled:shapes-default"


def test_pretrained_timm_weights_offline_give_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitviz.models import factory

    monkeypatch.setattr(factory, "weights_host_reachable", lambda *args, **kwargs: False)
    at = _open("overview")
    at.text_input(key="vv.add.timm").set_value("vit_tiny_patch16_224")
    at.checkbox(key="vv.add.pretrained").check()
    _load_model_button(at).click().run()
    _assert_clean(at)
    assert any("need the network" in e for e in _errors(at)), _errors(at)
    assert at.sidebar.selectbox(key="vv.model.widget").value == "bundled:shapes-default"


def test_hugging_face_models_by_link_and_box_offline_give_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the network
    at = _open("overview", query={"model": "hf:google/vit-base-patch16-224"})
    assert _errors(at) == []  # a link alone downloads nothing: the sidebar offers the download
    next(b for b in at.sidebar.button if b.label == "Download hf:google/vit-base-patch16-224").click().run()
    assert any("hf:google/vit-base-patch16-224" in e and "local folder" in e for e in _errors(at)), _errors(at)
    at = _open("overview")
    at.text_input(key="vv.add.timm").set_value("hf:../../etc")
    _load_model_button(at).click().run()
    _assert_clean(at)
    assert any("not a Hugging Face model id" in e for e in _errors(at)), _errors(at)
    assert at.sidebar.selectbox(key="vv.model.widget").value == "bundled:shapes-default"


def _overlay_heatmaps(at: AppTest) -> list[dict]:
    """The heatmap traces of the rollout overlays (an image trace with a heatmap over it)."""
    return [
        c["data"][1]
        for c in _charts(at)
        if len(c["data"]) == 2 and [t["type"] for t in c["data"]] == ["image", "heatmap"]
    ]


def test_rollout_shows_the_input_beside_a_perceptually_uniform_overlay_and_its_raw_range() -> None:
    at = _open("rollout")
    charts = _charts(at)
    assert any([t["type"] for t in c["data"]] == ["image"] for c in charts), "the plain input is not shown"
    overlay = _overlay_heatmaps(at)[0]
    viridis_start = "rgb(68, 1, 84)"  # matplotlib's and plotly's viridis at 0
    assert overlay["colorscale"][0][1].replace(" ", "") == viridis_start.replace(" ", "")
    raw = _array(overlay["customdata"])[..., 2]
    low, high = raw.min(), raw.max()
    note = next(_text(c) for c in at.caption if _text(c).startswith("Raw values"))
    assert f"{low:.3g} … {high:.3g}" in note and f"{100 * (high - low) / high:.1f} %" in note
    np.testing.assert_allclose(_array(overlay["z"]), raw / high, rtol=1e-6)  # ÷ max by default
    at.selectbox(key="rollout.cmap").set_value("Jet").run()
    assert _overlay_heatmaps(at)[0]["colorscale"][0][1].replace(" ", "") == "rgb(0,0,131)"  # jet's dark blue
    at.get("button_group")[0].set_value("shared").run()
    _assert_clean(at)
    shared = _overlay_heatmaps(at)[0]
    np.testing.assert_allclose(_array(shared["z"]), raw, rtol=1e-6)
    assert shared["zmin"] == 0 and shared["zmax"] == pytest.approx(high)


def test_rollout_says_when_a_map_is_nearly_flat(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from vitviz.ui import analyses

    real = analyses.image_attention

    def flat(*args: object, **kwargs: object) -> object:
        result = real(*args, **kwargs)
        values = np.full_like(result.rollout.map, 0.02)
        values[0, 0] = 0.0205  # 2.4 % above the rest: nearly flat
        return dataclasses.replace(result, rollout=dataclasses.replace(result.rollout, map=values))

    monkeypatch.setattr(analyses, "image_attention", flat)
    at = _open("rollout")
    assert any("Nearly flat" in _text(w) for w in at.warning), [_text(w) for w in at.warning]
    assert any("0.02 … 0.0205" in _text(c) for c in at.caption)


def test_rollout_tile_scale_toggle_has_a_short_label_and_the_detail_in_its_help() -> None:
    at = _open("rollout")
    toggle = at.toggle(key="rollout.query.per_tile")
    assert toggle.label == "Scale per tile"  # the long label was cut in its column
    assert "own maximum" in toggle.help and "one scale for all tiles" in toggle.help


def test_rollout_marks_the_query_patch_on_every_tile() -> None:
    at = _open("rollout")
    _keyed(at.radio, "rollout.query.kind").set_value("a patch").run()
    _keyed(at.slider, "rollout.query.row").set_value(2).run()
    _keyed(at.slider, "rollout.query.col").set_value(7).run()
    _assert_clean(at)
    config = _meta(DEFAULT)["config"]
    gh, gw = (s // config["patch_size"] for s in config["img_size"])
    depth, heads = config["depth"], config["num_heads"]
    grid = next(c for c in _charts(at) if any(t.get("name") == "query patch" for t in c["data"]))
    marks = next(t for t in grid["data"] if t.get("name") == "query patch")
    expected = {(h * (gw + 1) + 6, layer * (gh + 1) + 1) for layer in range(depth) for h in range(heads)}
    assert set(zip(_array(marks["x"]).astype(int), _array(marks["y"]).astype(int))) == expected


MIN_TILE_PX = 40  # a tile of the layers x heads view smaller than this on screen is a strip, not a map


def _grid_tile_px(chart: dict) -> tuple[float, int, int]:
    """On-screen side of one tile of a layers x heads chart, and its (layers, heads), from the spec alone.

    The plot area is the figure size less its margins; the y axis is anchored to x (square cells), so one
    mosaic cell takes the smaller of the two fits. Tiles are counted from the mosaic's all-NaN gap lines."""
    layout = chart["layout"]
    z = _array(chart["data"][0]["z"])
    gap_rows = np.flatnonzero(np.isnan(z).all(axis=1))
    gap_cols = np.flatnonzero(np.isnan(z).all(axis=0))
    layers, heads = len(gap_rows) + 1, len(gap_cols) + 1
    tile_h, tile_w = (z.shape[0] + 1) // layers - 1, (z.shape[1] + 1) // heads - 1
    margin = layout["margin"]
    plot_w = layout["width"] - margin["l"] - margin["r"]
    plot_h = layout["height"] - margin["t"] - margin["b"]
    cell = min(plot_w / z.shape[1], plot_h / z.shape[0])
    return cell * max(tile_h, tile_w), layers, heads


def test_layers_by_heads_view_keeps_readable_tiles_on_a_narrow_timm_model() -> None:
    at = _open("rollout", query={"model": "timm:vit_tiny_patch16_224"})  # random weights, 12 layers x 3 heads
    _keyed(at.radio, "rollout.query.kind").set_value("a patch").run()
    _assert_clean(at)
    grid = next(c for c in _charts(at) if any(t.get("name") == "query patch" for t in c["data"]))
    tile_px, layers, heads = _grid_tile_px(grid)
    assert (layers, heads) == (12, 3)
    assert tile_px >= MIN_TILE_PX, f"tiles are {tile_px:.0f} px on screen"
    assert grid["layout"]["yaxis"]["ticktext"] == [str(i) for i in range(1, 13)]


@pytest.mark.parametrize("other", ["bundled:mnist-small", "timm:vit_tiny_patch16_224"])
def test_rollout_explains_the_new_models_prediction_after_a_model_switch(
    other: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitviz.ui import analyses

    targets: list[tuple[tuple[str, ...], int | None]] = []
    real = analyses.gradient_map

    def recording(loaded: object, image: object, target: int | None) -> object:
        targets.append((tuple(loaded.meta.class_names), target))
        return real(loaded, image, target)

    monkeypatch.setattr(analyses, "gradient_map", recording)  # the page imports it when it runs
    at = _open("rollout", query={"model": other})  # a link puts the other model in the picker
    at.sidebar.selectbox(key="vv.model.widget").set_value("bundled:shapes-default").run()
    names = _meta(DEFAULT)["class_names"]
    predicted = names.index(at.dataframe[0].value["class"].iloc[0])
    chosen = (predicted + 3) % len(names)
    _keyed(at.selectbox, "rollout.target").set_value(chosen).run()
    _assert_clean(at)
    assert targets[-1] == (tuple(names), chosen)
    at.sidebar.selectbox(key="vv.model.widget").set_value(other).run()
    _assert_clean(at)
    top = at.dataframe[0].value["class"].iloc[0]
    target = _keyed(at.selectbox, "rollout.target")
    assert target.value is not None and target.options[target.index] == f"{top} (predicted)"
    classes, explained = targets[-1]
    assert classes != tuple(names) and classes[target.value] == top  # the new model's head, its predicted class
    assert explained == target.value


def _photo_png(width: int = 600, height: int = 800) -> bytes:
    """A portrait-sized colour picture: smooth gradients with fine noise, as a photo's pixels vary."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    planes = [0.6 + 0.3 * np.sin(6 * x), 0.4 + 0.3 * np.cos(5 * y), 0.3 + 0.2 * x * y]
    pixels = np.clip(np.stack(planes, axis=-1) + rng.normal(0, 0.05, (height, width, 3)), 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


FAR = "far from what the model was trained on"


def test_rollout_says_what_the_model_was_trained_on_and_warns_about_a_photo() -> None:
    at = _open("rollout")
    assert any(_text(c) == "Trained on shapes: 10 classes, 32×32 px colour images." for c in at.caption)
    assert not any(FAR in _text(w) for w in at.warning), [_text(w) for w in at.warning]  # a bundled sample
    at.file_uploader(key="rollout.images.upload").set_value(("portrait.png", _photo_png(), "image/png")).run()
    _assert_clean(at)
    warning = next(_text(w) for w in at.warning if FAR in _text(w))
    assert "600×800 px and shrinks 19× to the model's 32×32 px input" in warning
    assert "timm" in warning and "hf:" in warning  # where to go for photos


def test_compare_rollout_tab_warns_about_a_photo_for_each_model() -> None:
    other = _other_bundled(same_grid=True)
    at = _open("compare", query={"compare": ["bundled:shapes-default", f"bundled:{other.stem}"]})
    _open_tab(at, "Rollout")
    assert not any(FAR in _text(w) for w in at.warning)
    assert sum(_text(c).startswith("Trained on shapes") for c in at.caption) == 2
    at.file_uploader(key="compare.rollout.upload").set_value(("portrait.png", _photo_png(), "image/png")).run()
    _assert_clean(at)
    assert sum(FAR in _text(w) for w in at.warning) == 2


def test_rollout_top5_puts_the_probability_before_long_class_names() -> None:
    at = _open("rollout")
    assert list(at.dataframe[0].value.columns) == ["probability", "class"]


# --- compare -------------------------------------------------------------------------------------------------


def _open_tab(at: AppTest, label: str) -> AppTest:
    """Open /compare's tab `label` (a rerun, as a click on the tab): only the open tab draws its charts."""
    at.session_state["compare.tab"] = label
    at.run()
    _assert_clean(at)
    return at


def test_compare_draws_only_the_open_tabs_charts() -> None:
    other = _other_bundled(same_grid=True)
    at = _open("compare", query={"compare": ["bundled:shapes-default", f"bundled:{other.stem}"]})
    assert _charts(at) == []  # the summary is a table; the other tabs' charts are not sent
    summary = at.dataframe[0].value
    assert {"PC1 variance %", "distance layer 1 (px)", "prediction"} <= set(summary[""])  # yet all computed
    _open_tab(at, "Filters")
    assert _charts(at) and all("query patch" not in c["data"][0].get("hovertemplate", "") for c in _charts(at))
    _open_tab(at, "Position embeddings")
    assert any("query patch" in c["data"][0].get("hovertemplate", "") for c in _charts(at))


def test_compare_two_checkpoints_side_by_side_with_difference_maps() -> None:
    other = _other_bundled(same_grid=True)
    keys = ["bundled:shapes-default", f"bundled:{other.stem}"]
    at = _open("compare", query={"compare": keys})
    assert _errors(at) == []
    assert at.multiselect(key="vv.compare.widget").value == keys
    assert _query(at, "compare") == keys
    summary = at.dataframe[0].value
    row = summary[summary[""] == "position embedding"]
    assert list(row[["A", "B"]].iloc[0]) == [_meta(DEFAULT)["config"]["pos_embed"], _meta(other)["config"]["pos_embed"]]
    expected = _cosine_similarity_tiles(other) - _cosine_similarity_tiles(DEFAULT)
    gh, gw = expected.shape[:2]
    _open_tab(at, "Position embeddings")
    differences = [
        c
        for c in _charts(at)
        if c["data"][0].get("colorscale") and "difference" in c["data"][0].get("hovertemplate", "")
    ]
    assert differences, "no difference map drawn"
    mosaic = _array(differences[0]["data"][0]["z"])
    for row_index in range(gh):
        for col in range(gw):
            np.testing.assert_allclose(_tile(mosaic, row_index, col, (gh, gw)), expected[row_index, col], atol=1e-5)


def test_bundled_comparisons_pick_their_checkpoints_in_one_click() -> None:
    from vitviz.ui.compare import READY_MADE

    at = _open("compare")
    bundled = {path.stem for path in DEFAULT.parent.glob("*.safetensors")}
    offered = {b.label: b for b in at.button if b.key and b.key.startswith("compare.ready.")}
    assert set(offered) == {label for label, stems in READY_MADE.items() if set(stems) <= bundled}
    assert "Position embeddings" in offered and "Early vs late" in offered  # the paper's ablation ships
    offered["Position embeddings"].click().run()
    assert _errors(at) == [] and not at.exception
    wanted = [f"bundled:{stem}" for stem in READY_MADE["Position embeddings"]]
    assert at.multiselect(key="vv.compare.widget").value == wanted and _query(at, "compare") == wanted
    summary = at.dataframe[0].value
    row = summary[summary[""] == "position embedding"]
    assert list(row[["A", "B", "C", "D"]].iloc[0]) == ["learned", "learned_2d", "sincos", "none"]


STRATEGY_FINETUNES = ("shapes-to-mnist-linear", "shapes-to-mnist-lora", "shapes-to-mnist-full")


def test_the_strategies_comparison_sets_the_base_beside_its_three_fine_tunes() -> None:
    from vitviz.ui.compare import READY_MADE

    stems = READY_MADE["Linear vs LoRA vs full"]
    assert stems == ("shapes-default", *STRATEGY_FINETUNES)
    at = _open("compare")
    next(b for b in at.button if b.label == "Linear vs LoRA vs full").click().run()
    _assert_clean(at)
    wanted = [f"bundled:{stem}" for stem in stems]
    assert at.multiselect(key="vv.compare.widget").value == wanted and _query(at, "compare") == wanted
    summary = at.dataframe[0].value
    recorded = summary[summary[""] == "recorded accuracy"]
    expected = [_meta(DEFAULT.parent / f"{s}.safetensors")["training"]["metrics"]["eval_accuracy"] for s in stems]
    assert list(recorded[["A", "B", "C", "D"]].iloc[0]) == [str(round(a, 4)) for a in expected]  # cells are text


@pytest.mark.parametrize("stem", STRATEGY_FINETUNES)
def test_a_bundled_fine_tunes_card_names_its_base_strategy_data_set_and_trained_parameters(stem: str) -> None:
    at = _open("overview", query={"model": f"bundled:{stem}"})
    rows = _card_rows(at)
    training = _meta(DEFAULT.parent / f"{stem}.safetensors")["training"]
    assert rows["base source"] == "assets/checkpoints/shapes-default.safetensors"
    assert rows["base content hash"] == hashlib.sha256(DEFAULT.read_bytes()).hexdigest()
    assert (rows["strategy"], rows["dataset"], rows["train split"]) == (stem.rsplit("-", 1)[1], "mnist", "test[:8000]")
    assert rows["trainable parameters"] == str(training["trainable_parameters"])
    from vitviz.ui import catalog

    entries = catalog.discover_models(epochs=False)
    tuned = next(e for e in entries if e.key == f"bundled:{stem}")
    assert catalog.base_entry(tuned, entries).key == "bundled:shapes-default"  # the studio finds the base


def test_compare_difference_maps_have_grid_axes_and_distance_curves_differ_by_hue_and_dash() -> None:
    other = _other_bundled(same_grid=True)
    at = _open("compare", query={"compare": ["bundled:shapes-default", f"bundled:{other.stem}"]})
    config = _meta(DEFAULT)["config"]
    gh, gw = (s // config["patch_size"] for s in config["img_size"])
    _open_tab(at, "Rollout")
    flat = next(
        c
        for c in _charts(at)
        if "difference" in c["data"][0].get("hovertemplate", "")
        and c["data"][0]["z"]
        and _array(c["data"][0]["z"]).ndim == 2
        and _array(c["data"][0]["z"]).shape == (gh, gw)
    )
    assert flat["layout"]["yaxis"]["range"] == [gh + 0.5, 0.5] and flat["layout"]["xaxis"]["range"] == [0.5, gw + 0.5]
    assert flat["layout"]["yaxis"]["title"]["text"] == "Patch row"
    assert flat["layout"]["xaxis"]["title"]["text"] == "Patch column"
    _open_tab(at, "Attention distance")
    curves = next(c for c in _charts(at) if [t.get("name") for t in c["data"]] == ["A", "B"])
    styles = {(t["line"]["color"], t["line"]["dash"]) for t in curves["data"]}
    assert len(curves["data"]) == 2 and len({c for c, _ in styles}) == 2 and len({d for _, d in styles}) == 2


def test_compare_resamples_differing_grids_for_the_difference_map() -> None:
    base, tuned = DEFAULT, DEFAULT.parent / "shapes-finetune-hires.safetensors"
    if not tuned.is_file():
        pytest.skip("needs the bundled fine-tuned checkpoint")
    at = _open("compare", query={"compare": ["bundled:shapes-default", "bundled:shapes-finetune-hires"]})
    _open_tab(at, "Position embeddings")
    assert any("resampled from" in _text(c) for c in at.caption), [_text(c) for c in at.caption]
    config = _meta(base)["config"]
    gh, gw = (s // config["patch_size"] for s in config["img_size"])
    differences = [c for c in _charts(at) if "difference" in c["data"][0].get("hovertemplate", "")]
    assert differences, "no difference map for grids that differ"
    expected_position = _cosine_similarity_tiles(base)
    mosaic = _array(differences[0]["data"][0]["z"])
    assert mosaic.shape == (gh * (gh + 1) - 1, gw * (gw + 1) - 1)
    assert np.isfinite(_tile(mosaic, 0, 0, (gh, gw))).all() and expected_position.shape == (gh, gw, gh, gw)


def test_compare_four_models_keep_legible_figures() -> None:
    from vitviz.ui.compare import FIGURE_HEIGHT, READY_MADE

    stems = READY_MADE["Position embeddings"]
    at = _open("compare", query={"compare": [f"bundled:{s}" for s in stems]})
    _open_tab(at, "Position embeddings")
    mosaics = [
        c
        for c in _charts(at)
        if "query patch" in c["data"][0].get("hovertemplate", "") and "similarity %" in c["data"][0]["hovertemplate"]
    ]
    assert len(mosaics) == 3  # shapes-nopos has no table
    assert all(c["layout"]["height"] == FIGURE_HEIGHT for c in mosaics)


@pytest.mark.parametrize("page", ["position", "compare"])
def test_position_similarity_offers_an_automatic_range(page: str) -> None:
    sincos = DEFAULT.parent / "shapes-sincos.safetensors"
    expected = _cosine_similarity_tiles(sincos)
    query = {"model": "bundled:shapes-sincos"}
    if page == "compare":
        query["compare"] = ["bundled:shapes-sincos", "bundled:shapes-sincos"]
    at = _open(page, query=query)
    if page == "compare":
        _open_tab(at, "Position embeddings")
    control = next(b for b in at.get("button_group") if "automatic" in b.options)
    mosaic = next(c for c in _charts(at) if "similarity %" in c["data"][0].get("hovertemplate", ""))
    assert (mosaic["data"][0]["zmin"], mosaic["data"][0]["zmax"]) == (-1, 1)
    control.set_value("automatic").run()
    _assert_clean(at)
    mosaic = next(c for c in _charts(at) if "similarity %" in c["data"][0].get("hovertemplate", ""))
    assert mosaic["data"][0]["zmin"] == pytest.approx(expected.min(), abs=1e-4)
    assert mosaic["data"][0]["zmax"] == pytest.approx(expected.max(), abs=1e-4)
    assert any(f"{expected.min():.3f} … {expected.max():.3f}" in _text(c) for c in at.caption)


# --- train ---------------------------------------------------------------------------------------------------


def _fake_run(runs: Path, run_id: str) -> Path:
    """A finished run folder as the training backend writes it (the run folder of docs/design.md)."""
    folder = runs / run_id
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"preset": "tiny"}))
    records = [
        {"kind": "step", "step": 1, "loss": 2.3, "accuracy": 0.1},
        {"kind": "step", "step": 2, "loss": 2.1, "accuracy": 0.2},
        {"kind": "epoch", "epoch": 1, "step": 2, "train_loss": 2.2, "eval_accuracy": 0.25},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "st')
    status = {
        "status": "finished",
        "reason": None,
        "pid": 1,
        "run_id": run_id,
        "progress": {"step": 2, "total_steps": 2, "epoch": 1, "epochs": 1},
        "metrics": {"eval_accuracy": 0.25},
    }
    (folder / "status.json").write_text(json.dumps(status))
    (folder / "best.safetensors").write_bytes(DEFAULT.read_bytes())
    (folder / "checkpoints" / "epoch-001.safetensors").write_bytes(DEFAULT.read_bytes())
    return folder


def test_train_page_lists_runs_and_their_checkpoints_join_every_picker(app_folders: dict[str, Path]) -> None:
    _fake_run(app_folders["runs"], "demo-run")
    at = _open("train")
    assert _errors(at) == []
    runs_table = at.dataframe[0].value
    assert list(runs_table["run"]) == ["demo-run"] and list(runs_table["status"]) == ["finished"]
    assert any("demo-run" in _text(m) and "finished" in _text(m) for m in at.markdown)
    curves = _charts(at)[0]
    loss = next(trace for trace in curves["data"] if trace["name"] == "train loss (steps)")
    assert list(_array(loss["y"])) == [2.3, 2.1]  # the half-written last line is skipped
    labels = [b.label for b in at.get("download_button")]
    assert {"training-curves.png", "training-curves.svg", "metrics.csv"} <= set(labels), labels
    picker = at.sidebar.selectbox(key="vv.model.widget")
    assert "run demo-run · best" in picker.options
    assert "run demo-run · epoch-001" not in picker.options  # listed under the run instead
    assert any(e.label == "Epoch checkpoints (1)" for e in at.expander)
    next(b for b in at.button if b.label == "epoch-001").click().run()
    _assert_clean(at)
    assert at.sidebar.selectbox(key="vv.model.widget").value == "run:demo-run/epoch-001"
    assert _query(at, "model") == ["run:demo-run/epoch-001"]


def _fake_finetune(runs: Path, run_id: str, base_source: str, *, config: dict | None = None) -> Path:
    """A finished fine-tune: the run folder of `_fake_run` whose checkpoint's lineage names `base_source`."""
    folder = _fake_run(runs, run_id)
    with open(DEFAULT, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        metadata = json.loads(handle.read(header_len))["__metadata__"]
    meta = json.loads(metadata["vitviz"])
    meta["training"] = {**meta.get("training", {}), "base_source": base_source, "strategy": "linear"}
    safetensors.numpy.save_file(
        _tensors(DEFAULT), str(folder / "best.safetensors"), {**metadata, "vitviz": json.dumps(meta)}
    )
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_finished_fine_tune_opens_compare_with_its_base_on_what_changed(app_folders: dict[str, Path]) -> None:
    _fake_run(app_folders["runs"], "scratch")  # trained from scratch: nothing to compare with
    _fake_finetune(app_folders["runs"], "tuned", "assets/checkpoints/shapes-default.safetensors")  # as typed
    at = _open("train")
    at.selectbox(key="train.follow.widget").set_value("scratch").run()
    assert not any(b.label == "Compare with its base" for b in at.button)
    at.selectbox(key="train.follow.widget").set_value("tuned").run()
    at.session_state["compare.changed.limit"] = 8  # few images and no AUC curves: the tab computes as it opens
    at.session_state["compare.changed.methods"] = []
    next(b for b in at.button if b.label == "Compare with its base").click().run()
    _assert_clean(at)
    assert [t.value for t in at.title] == ["Compare models"]
    assert at.multiselect(key="vv.compare.widget").value == ["bundled:shapes-default", "run:tuned"]
    assert _query(at, "compare") == ["bundled:shapes-default", "run:tuned"]
    assert at.session_state["compare.tab"] == "What changed"
    assert [c for c in at.get("plotly_chart") if c.key == "compare.changed.cka"], "the What changed tab is not open"


def test_the_base_of_a_fine_tune_is_the_picker_entry_its_lineage_names(tmp_path: Path) -> None:
    from vitviz.ui import catalog

    runs = tmp_path / "lineage-runs"
    runs.mkdir()
    _fake_run(runs, "plain")
    _fake_finetune(runs, "of-run", str(runs / "plain"))
    _fake_finetune(runs, "of-timm", "timm:vit_tiny_patch16_224", config={"finetune": {"pretrained": True}})
    _fake_finetune(runs, "of-hub", "hf:google/vit-base-patch16-224")
    _fake_finetune(runs, "of-gone", str(tmp_path / "gone.safetensors"))
    _fake_finetune(runs, "of-hf-folder", "hf:/data/a-folder")
    entries = catalog.discover_models(runs=runs, epochs=False)
    by_key = {e.key: e for e in entries}

    def base(run_id: str) -> str | None:
        found = catalog.base_entry(by_key[f"run:{run_id}"], entries)
        return None if found is None else found.key

    assert base("plain") is None  # no lineage
    assert base("of-run") == "run:plain"
    assert base("of-timm") == "timm-pretrained:vit_tiny_patch16_224"
    assert base("of-hub") == "hf:google/vit-base-patch16-224"
    assert base("of-gone") is None and base("of-hf-folder") is None  # not available to the studio


def test_train_page_without_runs_says_so_once() -> None:
    at = _open("train")
    said = [_text(e) for e in [*at.info, *at.caption] if "No runs" in _text(e)]
    assert said == ["No runs yet: start one with the form on the left."]


def test_train_curves_can_be_smoothed(app_folders: dict[str, Path]) -> None:
    _fake_run(app_folders["runs"], "demo-run")
    at = _open("train")
    at.slider(key="train.smoothing").set_value(0.5).run()
    _assert_clean(at)
    traces = {trace["name"]: trace for trace in _charts(at)[0]["data"]}
    # TensorBoard's debiased moving average of 2.3, 2.1 with weight 0.5: 2.3, then (0.575 + 1.05) / 0.75.
    np.testing.assert_allclose(_array(traces["train loss (steps)"]["y"]), [2.3, 1.625 / 0.75])
    np.testing.assert_allclose(_array(traces["train loss (steps) (raw)"]["y"]), [2.3, 2.1])


def test_a_stopped_run_offers_resume_and_a_finished_one_does_not(
    app_folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitviz.ui import runs

    stopped = _fake_run(app_folders["runs"], "halted")
    status = json.loads((stopped / "status.json").read_text())
    status.update(status="failed", resumable=True, reason="stopped by a stop signal")
    (stopped / "status.json").write_text(json.dumps(status))
    calls = []
    monkeypatch.setattr(runs, "resume_run", lambda runs_dir, run_id: calls.append((runs_dir, run_id)))
    at = _open("train")
    at.selectbox(key="train.follow.widget").set_value("halted").run()
    assert _run_heading(at, "halted").endswith(": stopped")
    next(b for b in at.button if b.label == "Resume").click().run()
    _assert_clean(at)
    assert calls == [(app_folders["runs"].resolve(), "halted")]
    assert runs.resume_command_line(app_folders["runs"], "halted")[3:6] == [
        "train",
        "--resume",
        str(app_folders["runs"] / "halted"),
    ]
    _fake_run(app_folders["runs"], "done-run")
    at = _open("train")
    at.selectbox(key="train.follow.widget").set_value("done-run").run()
    assert _run_heading(at, "done-run").endswith(": finished")
    assert not any(b.label == "Resume" for b in at.button)


def test_train_follows_status_json_after_a_resume_and_refreshes_while_a_run_is_alive(
    app_folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    import streamlit as st

    from vitviz.ui import runs

    folder = _fake_run(app_folders["runs"], "ux-tiny")
    status = json.loads((folder / "status.json").read_text())
    progress = {"step": 60, "total_steps": 160, "epoch": 1, "epochs": 4}
    status.update(status="failed", resumable=True, reason="stopped by a stop signal", progress=progress)
    status["updated"] = time.time() - 30
    (folder / "status.json").write_text(json.dumps(status))
    monkeypatch.setattr(runs, "_PROCESSES", {})  # this test's processes only, forgotten after it
    monkeypatch.setattr(runs, "_STARTED_AT", {})
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]  # stands in for the resumed training process
    resumed: list[subprocess.Popen] = []
    monkeypatch.setattr(
        runs, "resume_run", lambda runs_dir, run_id: resumed.append(runs._spawn(sleeper, runs_dir, run_id))
    )
    refreshes: list[tuple[str, float | None]] = []
    real_fragment = st.fragment

    def spy(func: object = None, *, run_every: float | None = None, **kwargs: object) -> object:
        refreshes.append((func.__name__, run_every))
        return real_fragment(func, run_every=run_every, **kwargs)

    monkeypatch.setattr(st, "fragment", spy)
    try:
        at = _open("train")
        at.selectbox(key="train.follow.widget").set_value("ux-tiny").run()
        assert _run_heading(at, "ux-tiny").endswith(": stopped")
        assert {every for _, every in refreshes} == {None}  # nothing is alive: no refreshing
        next(b for b in at.button if b.label == "Resume").click().run()
        _assert_clean(at)
        assert resumed and resumed[0].poll() is None
        # The resumed process has not written status.json yet: its old "stopped" is not shown as the news.
        assert _run_heading(at, "ux-tiny").endswith(": starting")
        assert not any(b.label == "Resume" for b in at.button)
        assert list(at.dataframe[0].value["status"]) == ["starting"]
        refreshes.clear()
        status.update(status="running", resumable=False, reason=None, pid=resumed[0].pid, updated=time.time())
        status["progress"] = {**progress, "step": 89, "epoch": 3}
        (folder / "status.json").write_text(json.dumps(status))
        at.run()
        _assert_clean(at)
        assert _run_heading(at, "ux-tiny").endswith(": running")
        assert any(_text(p.proto.text) == "step 89 of 160" for p in at.get("progress")), "the progress is stale"
        assert list(at.dataframe[0].value["status"]) == ["running"]
        assert dict(refreshes) == {"_runs_table": REFRESH, "_live_view": REFRESH}  # both follow the live run
    finally:
        for process in resumed:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("override", "message"),
    [("nonsense.key=1", "unknown config key 'nonsense.key'"), ("epochs=abc", "epochs must be an integer")],
)
def test_train_form_refuses_overrides_the_training_parser_rejects(
    app_folders: dict[str, Path], override: str, message: str
) -> None:
    at = _open("train")
    at.text_area(key="train.overrides").set_value(override)
    next(b for b in at.get("form_submit_button") if b.label == "Start").click().run()
    _assert_clean(at)
    assert any(message in e for e in _errors(at)), _errors(at)
    assert not any("Started run" in _text(m) for m in at.success)
    assert [p.name for p in app_folders["runs"].iterdir() if p.name != ".logs"] == []


def test_choosing_a_preset_updates_its_defaults_and_the_run_id_placeholder() -> None:
    import subprocess
    import sys

    at = _open("train")
    at.selectbox(key="train.preset.train").set_value("tiny").run()
    _assert_clean(at)
    assert at.text_input(key="train.run_id").placeholder.startswith("tiny-")
    assert any(e.label == "Preset defaults: tiny" for e in at.expander)
    listed = subprocess.run(
        [sys.executable, "-m", "training", "presets", "--json"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(at.json[0].value) == json.loads(listed.stdout)["tiny"]


def test_train_form_rejects_malformed_overrides_without_starting_a_run(app_folders: dict[str, Path]) -> None:
    at = _open("train")
    at.text_area(key="train.overrides").set_value("epochs=1\nthis is not an override")  # sent with the form
    next(b for b in at.get("form_submit_button") if b.label == "Start").click().run()
    _assert_clean(at)
    assert any("override line 2 is not KEY=VALUE" in e for e in _errors(at)), _errors(at)
    assert list(app_folders["runs"].iterdir()) == []


def _rerun_until(at: AppTest, condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition(at):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; page says: {[_text(m) for m in at.markdown][-6:]}")
        time.sleep(1.0)
        at.run()
        _assert_clean(at)


def _run_heading(at: AppTest, run_id: str) -> str:
    return next((_text(m) for m in at.markdown if _text(m).startswith(f"##### Run {run_id}:")), "")


@pytest.mark.slow
def test_a_run_started_from_the_train_page_can_be_stopped(app_folders: dict[str, Path]) -> None:
    from vitviz.ui import runs

    at = _open("train")
    at.selectbox(key="train.preset.train").set_value("tiny")
    at.text_area(key="train.overrides").set_value("epochs=500")
    at.text_input(key="train.run_id").set_value("stop-me")
    next(b for b in at.get("form_submit_button") if b.label == "Start").click().run()
    _assert_clean(at)
    process = runs.started_here("stop-me")
    assert process is not None
    try:
        _rerun_until(
            at,
            lambda a: _run_heading(a, "stop-me").endswith(": running") and any(b.label == "Stop" for b in a.button),
            180,
            "the run to start",
        )
        next(b for b in at.button if b.label == "Stop").click().run()
        _assert_clean(at)
        process.wait(timeout=120)
        _rerun_until(at, lambda a: _run_heading(a, "stop-me").endswith(": stopped"), 30, "the stopped status")
        status = json.loads((app_folders["runs"] / "stop-me" / "status.json").read_text())
        assert status["resumable"] is True and "stop signal" in status["reason"]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- pieces without streamlit ----------------------------------------------------------------------------------


def test_disk_cache_round_trips_arrays_without_pickle(tmp_path: Path) -> None:
    from vitviz.ui.diskcache import DiskCache, cache_key

    cache = DiskCache(tmp_path)
    key = cache_key("distance", model="abc", images=["1", "2"], mode="paper")
    assert key != cache_key("distance", model="abc", images=["2", "1"], mode="paper")
    calls = []
    arrays = {"pixels": np.arange(6.0).reshape(2, 3), "names": np.array(["a", "b"])}
    first = cache.get_or_compute("distance", key, lambda: calls.append(1) or arrays)
    second = cache.get_or_compute("distance", key, lambda: calls.append(1) or arrays)
    assert calls == [1]
    np.testing.assert_array_equal(second["pixels"], first["pixels"])
    assert list(second["names"]) == ["a", "b"]
    cache.path("distance", key).write_bytes(b"damaged")
    assert cache.get("distance", key) is None


def test_model_keys_only_resolve_to_discovered_files(tmp_path: Path) -> None:
    from vitviz.ui import catalog

    entries = catalog.discover_models(checkpoints=DEFAULT.parent, runs=tmp_path)
    assert entries[0].key == "bundled:shapes-default"
    assert catalog.resolve_key("bundled:../../etc/passwd", entries) is None
    assert catalog.resolve_key("run:../x", entries) is None
    assert catalog.resolve_key("upload:../../secret", entries) is None
    assert catalog.resolve_key("timm:vit_tiny_patch16_224", entries).source == "timm:vit_tiny_patch16_224"
    assert catalog.resolve_key("timm:bad name; rm -rf", entries) is None


def test_sample_sets_are_the_image_folders(tmp_path: Path) -> None:
    """Each folder's image files by the one rule (vitviz.imagefiles): hidden files and other formats are out."""
    from vitviz.ui import catalog

    (tmp_path / "shapes").mkdir()
    for name in ("circle-1.png", "circle-1-mask.png", "star-2.png", "notes.txt", "._star-2.png", "clip.svg"):
        (tmp_path / "shapes" / name).write_bytes(_png(8, 8))
    (tmp_path / "loose.jpg").write_bytes(b"x")
    sets = {s.name: [p.name for p in s.files] for s in catalog.discover_sample_sets(tmp_path)}
    assert sets == {"samples": ["loose.jpg"], "shapes": ["circle-1-mask.png", "circle-1.png", "star-2.png"]}


def test_bundled_samples_are_the_ten_shapes_and_no_masks() -> None:
    from vitviz.data.shapes import SHAPE_CLASSES
    from vitviz.ui import catalog

    sets = catalog.discover_sample_sets()
    assert [s.name for s in sets] == ["samples"]
    assert [p.stem for p in sets[0].files] == sorted(SHAPE_CLASSES)


def _image_folder(root: Path, classes: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def _spy_launcher(monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """The requests the page checks and the command lines it would start (no process is started)."""
    from vitviz.ui import runs

    checked: list = []
    spawned: list = []
    monkeypatch.setattr(runs, "check_request", lambda request, **kw: checked.append(request))
    monkeypatch.setattr(runs, "_spawn", lambda args, runs_dir, run_id: spawned.append(args))
    return checked, spawned


def test_train_fine_tunes_a_picked_base_on_a_validated_image_folder(
    app_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitviz.data.folder import summarize_folder
    from vitviz.ui import runs

    data = _image_folder(tmp_path / "pets", {"cat": 12, "dog": 12, "owl": 12})
    checked, spawned = _spy_launcher(monkeypatch)
    at = _open("train")
    at.segmented_control(key="train.command").set_value("finetune").run()
    assert at.selectbox(key="train.source").value == "bundled:shapes-default"  # the sidebar's model
    assert "timm" not in " ".join(at.selectbox(key="train.source").options)  # none added in this session
    at.selectbox(key="train.dataset").set_value("folder").run()
    at.text_input(key="train.folder").input(str(data)).run()
    _assert_clean(at)
    summary = summarize_folder(data)
    assert [_text(s) for s in at.success] == [summary.describe()] and summary.describe().startswith("3 classes, 36")
    at.segmented_control(key="train.strategy").set_value("lora").run()
    at.number_input(key="train.lora_rank").set_value(4)
    at.text_input(key="train.run_id").input("pets-lora")
    at.button(key="FormSubmitter:train.form.finetune-Start").click().run()
    _assert_clean(at)
    assert len(checked) == 1 and len(spawned) == 1
    assert spawned[0] == runs.command_line(checked[0])
    assert spawned[0][1:] == [
        "-m", "training", "finetune", "--preset", "finetune",
        "--from", str(DEFAULT.resolve()), "--strategy", "lora", "--lora-rank", "4",
        "--dataset", f"folder:{data}",
        "--runs-dir", str(app_folders["runs"].resolve()), "--run-id", "pets-lora", "--no-progress",
    ]  # fmt: skip
    assert any("Started run pets-lora" in _text(s) for s in at.success)


def test_train_refuses_an_image_folder_it_cannot_train_on(
    app_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked, spawned = _spy_launcher(monkeypatch)
    _image_folder(tmp_path / "single", {"cat": 12})
    at = _open("train")
    at.segmented_control(key="train.command").set_value("finetune").run()
    at.selectbox(key="train.dataset").set_value("folder").run()
    at.text_input(key="train.folder").input(str(tmp_path / "missing")).run()
    assert _errors(at) == [f"image folder {tmp_path / 'missing'} does not exist or is not a folder"]
    at.text_input(key="train.folder").input(str(tmp_path / "single")).run()
    assert _errors(at) == [f"{tmp_path / 'single'} has 1 class folder; a classifier needs at least two"]
    at.segmented_control(key="train.strategy").set_value("freeze").run()
    at.button(key="FormSubmitter:train.form.finetune-Start").click().run()
    _assert_clean(at)
    assert any(e.startswith("Not started: ") and "needs at least two" in e for e in _errors(at))
    assert checked == [] and spawned == []


def test_a_fine_tune_of_any_source_passes_its_strategy_data_set_and_weights(tmp_path: Path) -> None:
    from vitviz.errors import VitvizError
    from vitviz.ui import runs

    def request(**kwargs: object) -> object:
        base = {"command": "finetune", "preset": "finetune", "run_id": "ft", "runs_dir": tmp_path}
        return runs.RunRequest(**{**base, **kwargs})

    args = runs.command_line(
        request(source="timm:vit_tiny_patch16_224", pretrained=True, strategy="freeze:2", dataset="folder:/d")
    )
    assert args[3:] == [
        "finetune", "--preset", "finetune", "--from", "timm:vit_tiny_patch16_224", "--pretrained",
        "--strategy", "freeze:2", "--dataset", "folder:/d",
        "--runs-dir", str(tmp_path), "--run-id", "ft", "--no-progress",
    ]  # fmt: skip
    check = runs.check_command_line(request(source="hf:o/m", strategy="lora", lora_rank=4, dataset="shapes"))
    assert check[3:] == [
        "check", "--kind", "finetune", "--preset", "finetune", "--from", "hf:o/m",
        "--strategy", "lora", "--lora-rank", "4", "--dataset", "shapes",
    ]  # fmt: skip
    with pytest.raises(VitvizError, match="lora strategy only"):
        runs.command_line(request(source="a.safetensors", strategy="linear", lora_rank=4))


def test_training_command_line_follows_the_training_cli(tmp_path: Path) -> None:
    from vitviz.errors import VitvizError
    from vitviz.ui import runs

    overrides = runs.parse_overrides("# comment\nepochs=1\n\noptim.lr=1e-3\n")
    request = runs.RunRequest(
        command="finetune",
        preset="finetune",
        run_id="ft-1",
        runs_dir=tmp_path,
        overrides=overrides,
        source="a.safetensors",
        img_size=(96, 96),
        freeze_blocks=2,
    )
    args = runs.command_line(request)
    assert args[1:] == [
        "-m",
        "training",
        "finetune",
        "--preset",
        "finetune",
        "--from",
        "a.safetensors",
        "--img-size",
        "96",
        "96",
        "--freeze-blocks",
        "2",
        "--runs-dir",
        str(tmp_path),
        "--run-id",
        "ft-1",
        "--no-progress",
        "--set",
        "epochs=1",
        "--set",
        "optim.lr=1e-3",
    ]
    with pytest.raises(VitvizError):
        runs.command_line(runs.RunRequest(command="train", preset="tiny", run_id="../escape", runs_dir=tmp_path))


def test_tokens_page_explains_the_attention_sink_and_the_outlier_count() -> None:
    at = _open("tokens")
    captions = " ".join(_text(c) for c in at.caption)
    assert "An attention sink is a token that receives much of the patches' attention" in captions
    assert "whose norm exceeds 2 times the median patch-token norm" in captions
    assert "the head is undecided" not in captions  # the bundled default is trained: its lens is not uniform


def test_tokens_page_says_why_a_random_models_logit_lens_is_dark() -> None:
    at = _open("tokens", query={"model": "timm:vit_tiny_patch16_224"})  # random weights, 1000 classes
    captions = " ".join(_text(c) for c in at.caption)
    assert "the head is undecided" in captions and "1/1000" in captions


def test_head_maps_carry_a_colour_bar_on_the_heads_scale() -> None:
    from vitviz.plots.tokens import head_maps_figure

    attention = np.random.default_rng(0).random((3, 4, 4))
    fig = head_maps_figure(attention, attention > 0.5, query="class token", mass_share=0.6)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "attention ÷ the head's peak"


def test_compare_summary_names_fit_and_position_maps_share_one_narrow_colour_bar() -> None:
    keys = ["bundled:shapes-default-epoch-001", "bundled:shapes-default"]
    at = _open("compare", query={"compare": keys})
    summary = at.dataframe[0].value
    row = summary[summary[""] == "checkpoint"]
    assert list(row[["A", "B"]].iloc[0]) == ["shapes-default-epoch-001", "shapes-default"]  # no "(bundled" cut
    config = json.loads(at.dataframe[0].proto.columns)
    assert config["A"]["help"] == "shapes-default-epoch-001 (bundled)" and config["A"]["width"] == "large"
    _open_tab(at, "Position embeddings")
    maps = [c["data"][0] for c in _charts(at) if "difference" not in c["data"][0].get("hovertemplate", "")]
    assert len(maps) == 2
    assert [trace.get("showscale", True) for trace in maps] == [False, True]
    assert maps[1]["colorbar"]["thickness"] == 12


def test_position_one_patch_ticks_sit_against_the_map() -> None:
    at = _open("position")
    patch = next(c for c in _charts(at) if c["layout"].get("title", {}).get("text", "").startswith("Similarity with"))
    assert patch["layout"]["yaxis"]["constrain"] == "domain" and patch["layout"]["xaxis"]["constrain"] == "domain"
