"""`python -m vitviz info|analyze`: every success path of the contract and every bad-input path.

The analyses' numbers are checked against slow references in test_analysis*; here the JSON must carry
exactly what those functions return, in the shapes docs/design.md gives, and mistakes must give one line and status 2.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitviz.analysis.distance import mean_attention_distance
from vitviz.analysis.filters import filter_pca, patch_embedding_filters
from vitviz.analysis.position import position_similarity
from vitviz.analysis.rollout import attention_rollout, gradient_rollout
from vitviz.capture import attention_gradients, attention_maps
from vitviz.cli import main
from vitviz.images import load_for_model
from vitviz.models import ModelMeta, ViTConfig, build_model, load_model, patch_position_embeddings, save_checkpoint
from vitviz.tokens import token_layout

ROOT = Path(__file__).resolve().parents[1]


def _tiny_checkpoint(folder: Path, **overrides: object) -> Path:
    fields = dict(img_size=(32, 48), patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=4)
    fields.update(overrides)
    cfg = ViTConfig(**fields)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    meta = ModelMeta(
        arch="vitviz",
        config=cfg,
        class_names=["circle", "square", "triangle", "star"],
        input_size=cfg.img_size,
        in_chans=cfg.in_chans,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        training={"dataset": "shapes", "epochs": 1, "steps": 10, "run_id": "test"},
        resolution_history=[],
    )
    path = folder / f"tiny-{cfg.pos_embed}-{cfg.stem}.safetensors"
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 20), dtype=np.uint8)).save(images / "c.webp")
    return folder


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    return _tiny_checkpoint(workdir)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_json_matches_the_analysis_functions(workdir: Path, checkpoint: Path, capsys) -> None:
    out_json = workdir / "out.json"
    code, _, err = run_cli(
        capsys,
        "analyze",
        str(checkpoint),
        "--images",
        str(workdir / "images"),
        "--json",
        str(out_json),
        "--components",
        "5",
        "--head-fusion",
        "max",
        "--discard-ratio",
        "0.5",
        "--start-layer",
        "1",
        "--distance-mode",
        "renormalised",
        "--target-class",
        "2",
    )
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert set(doc) == {"model", "filters", "position", "distance", "rollout", "gradient_rollout"}
    assert doc["model"] == {
        "source": str(checkpoint),
        "arch": "vitviz",
        "img_size": [32, 48],
        "grid": [4, 6],
        "stride": [8, 8],
        "num_prefix_tokens": 1,
        "depth": 3,
        "num_heads": 2,
        "embed_dim": 32,
        "num_classes": 4,
    }
    loaded = load_model(str(checkpoint))
    model, meta, layout = loaded.model, loaded.meta, token_layout(loaded.model)
    files = sorted((workdir / "images").iterdir())
    images = torch.stack(
        [load_for_model(f, input_size=meta.input_size, mean=meta.mean, std=meta.std, in_chans=3) for f in files]
    )
    pca = filter_pca(patch_embedding_filters(model), 5)
    assert np.allclose(doc["filters"]["explained_variance_ratio"], pca.explained_variance_ratio.numpy(), rtol=1e-5)
    assert np.array(doc["filters"]["components"]).shape == (5, 3 * 8 * 8)
    similarity = position_similarity(patch_position_embeddings(model), layout.grid).reshape(24, 24)
    assert np.allclose(doc["position"]["similarity"], similarity.numpy(), rtol=1e-5, atol=1e-7)
    attns = attention_maps(model, images)
    distance = mean_attention_distance(attns, layout, mode="renormalised")
    assert doc["distance"]["mode"] == "renormalised" and doc["distance"]["num_images"] == 3
    assert np.allclose(doc["distance"]["pixels"], distance.pixels.numpy(), rtol=1e-5)
    assert np.allclose(doc["distance"]["fraction"], (distance.pixels / 48).numpy(), rtol=1e-5)
    rollout = attention_rollout(attns, layout, head_fusion="max", discard_ratio=0.5, start_layer=1)
    assert [entry["image"] for entry in doc["rollout"]] == [str(f) for f in files]
    for entry, expected in zip(doc["rollout"], rollout):
        assert (entry["head_fusion"], entry["discard_ratio"], entry["start_layer"]) == ("max", 0.5, 1)
        assert np.array(entry["map"]).shape == (4, 6)
        assert np.allclose(entry["map"], expected.numpy(), rtol=1e-5)
        assert len(entry["top5"]) == 4 and entry["top5"][0][0] in meta.class_names
        probs = [p for _, p in entry["top5"]]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
    grads = attention_gradients(model, images, 2)
    expected_grad = gradient_rollout(grads.attentions, grads.gradients, layout)
    for entry, expected in zip(doc["gradient_rollout"], expected_grad):
        assert entry["target_class"] == 2
        assert np.allclose(entry["map"], expected.numpy(), rtol=1e-5)


def test_json_to_stdout_and_subset_of_analyses(checkpoint: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "analyze", str(checkpoint), "--analyses", "filters,position", "--json", "-")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"model", "filters", "position"}
    assert len(doc["filters"]["explained_variance_ratio"]) == 28  # the paper's 28 components by default


def test_figures_are_written_as_png_and_svg(workdir: Path, checkpoint: Path, capsys) -> None:
    figures = workdir / "figures"
    code, _, err = run_cli(
        capsys, "analyze", str(checkpoint), "--images", str(workdir / "images" / "a.png"), "--figures", str(figures)
    )
    assert code == 0, err
    names = sorted(p.name for p in figures.iterdir())
    for stem in ("filters", "position", "distance", "rollout-000-a", "gradient-rollout-000-a"):
        assert f"{stem}.png" in names and f"{stem}.svg" in names
        assert Image.open(figures / f"{stem}.png").size[0] > 100


def test_not_applicable_analyses_say_why(workdir: Path, capsys) -> None:
    hybrid = _tiny_checkpoint(workdir, stem="hybrid", hybrid_layers=(1, 1), pos_embed="none")
    code, out, err = run_cli(capsys, "analyze", str(hybrid), "--analyses", "filters,position", "--json", "-")
    assert code == 0, err
    doc = json.loads(out)
    assert "hybrid" in doc["filters"]["not_applicable"].lower()
    assert "position" in doc["position"]["not_applicable"].lower()


def test_no_images_skips_image_analyses_unless_asked(checkpoint: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "analyze", str(checkpoint), "--json", "-")
    assert code == 0 and set(json.loads(out)) == {"model", "filters", "position"}
    assert "skipping" in err
    code, _, err = run_cli(capsys, "analyze", str(checkpoint), "--analyses", "rollout", "--json", "-")
    assert code == 2 and "need images" in err


def test_info_prints_the_model_card(checkpoint: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "info", str(checkpoint))
    assert code == 0
    assert "4x6 patches of 8x8 px + 1 prefix token" in out and "circle" in out
    code, out, _ = run_cli(capsys, "info", str(checkpoint), "--json")
    card = json.loads(out)
    assert card["grid"] == [4, 6] and card["config"]["pos_embed"] == "learned"
    assert card["parameters"] == sum(p.numel() for p in load_model(str(checkpoint)).model.parameters())


def test_timm_source_with_local_weights(workdir: Path, capsys) -> None:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=3)
    weights = workdir / "weights.pth"
    torch.save(model.state_dict(), weights)
    code, _out, err = run_cli(capsys, "info", "timm:vit_tiny_patch16_224", "--weights", str(weights), "--json")
    assert code == 2 and "vitviz: error:" in err and len(err.strip().splitlines()) == 1  # depth 12 != 2


def _one_error_line(code: int, err: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["info", "timm:no_such_model_xyz"], "no_such_model_xyz"),
        (["info", "/nonexistent/model.safetensors"], "no such"),
        (["analyze", "CHECKPOINT", "--images", "/nonexistent.png", "--json", "-"], "nonexistent"),
        (["analyze", "CHECKPOINT", "--analyses", "bogus", "--json", "-"], "bogus"),
        (["analyze", "CHECKPOINT", "--head-fusion", "median", "--json", "-"], "median"),
        (["analyze", "CHECKPOINT", "--discard-ratio", "1.5", "--json", "-"], "discard"),
        (["analyze", "CHECKPOINT", "--components", "0", "--json", "-"], "components"),
        (["analyze", "CHECKPOINT", "--images", "IMAGES", "--target-class", "9", "--json", "-"], "target"),
        (["analyze", "CHECKPOINT", "--images", "IMAGES", "--start-layer", "7", "--json", "-"], "start-layer"),
        (["analyze", "CHECKPOINT"], "nothing to write"),
        (["analyze", "CHECKPOINT", "--components", "many"], "invalid int"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_mistakes_give_one_line_and_status_2(
    argv: list[str], needle: str, workdir: Path, checkpoint: Path, capsys
) -> None:
    argv = [str(checkpoint) if a == "CHECKPOINT" else str(workdir / "images") if a == "IMAGES" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert needle in _one_error_line(code, err)


def test_unreadable_and_hostile_inputs(workdir: Path, checkpoint: Path, capsys) -> None:
    bad_image = workdir / "broken.png"
    bad_image.write_bytes(b"this is not an image")
    code, _, err = run_cli(capsys, "analyze", str(checkpoint), "--images", str(bad_image), "--json", "-")
    assert "broken.png" in _one_error_line(code, err)

    marker = workdir / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = workdir / "evil.pth"
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}))
    code, _, err = run_cli(capsys, "info", "timm:vit_tiny_patch16_224", "--weights", str(evil))
    _one_error_line(code, err)
    renamed = workdir / "evil.safetensors"
    renamed.write_bytes(evil.read_bytes())
    code, _, err = run_cli(capsys, "info", str(renamed))
    _one_error_line(code, err)
    assert not marker.exists()


def test_real_entry_point_runs_as_a_module(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.json"
    done = subprocess.run(
        [sys.executable, "-m", "vitviz", "analyze", str(checkpoint), "--analyses", "position", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["position"]["similarity"]
    done = subprocess.run(
        [sys.executable, "-m", "vitviz", "info", str(tmp_path / "missing.safetensors")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_cait_sections_are_computed_or_not_applicable_with_a_reason(workdir: Path, capsys) -> None:
    analyses = "filters,position,distance,rollout,gradient-rollout,tokens,features,head-maps,logit-lens"
    images = str(workdir / "images" / "a.png")
    argv = ["analyze", "timm:cait_xxs24_224", "--images", images, "--analyses", analyses, "--json", "-"]
    code, out, err = run_cli(capsys, *argv, "--figures", str(workdir / "cait-figures"))
    assert code == 0, err
    doc = json.loads(out)
    # 24 self-attention layers have a distance; the 2 class-attention layers are listed, not reported as zeros
    assert doc["distance"]["layers"] == list(range(24))
    assert np.asarray(doc["distance"]["pixels"]).shape == (24, 4)
    assert [entry["layer"] for entry in doc["distance"]["not_applicable_layers"]] == [24, 25]
    assert all("class-attention" in entry["reason"] for entry in doc["distance"]["not_applicable_layers"])
    for section in ("rollout", "gradient_rollout", "head_maps"):
        assert len(doc[section]) == 1, section
    for section in ("tokens", "logit_lens"):  # the self-attention blocks' outputs are the patches alone
        assert "196 tokens" in doc[section]["not_applicable"], section
    assert len(doc["position"]["similarity"]) == 14 * 14 and "explained_variance_ratio" in doc["filters"]
    assert np.asarray(doc["features"]["projections"]).shape == (1, 14, 14, 3)
    stems = ("filters", "position", "distance", "rollout-000-a", "gradient-rollout-000-a", "head-maps-000-a")
    assert sorted(p.name for p in (workdir / "cait-figures").iterdir()) == sorted(
        f"{stem}.{ext}" for stem in (*stems, "features-000-a") for ext in ("png", "svg")
    )
