"""The patch-feature PCA in two passes (docs/design.md, "What tokens carry"): the moments first, then the
projections batch by batch. Checked against scikit-learn's PCA over all patch tokens of several images, with the
features from timm's own forward_features, and by inspecting what the accumulators hold after every forward."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from sklearn.decomposition import PCA

from vitviz import pipeline
from vitviz.analysis import tokens as token_analysis
from vitviz.cli import main
from vitviz.models.checkpoint import LoadedModel
from vitviz.models.sources import timm_meta
from vitviz.pipeline import AnalysisOptions
from vitviz.tokens import token_layout

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
SAMPLES = sorted((ROOT / "assets" / "samples").glob("*.png"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODELS = {
    "class_token": ("vit_tiny_patch16_224", dict(img_size=64, depth=2)),
    "registers_no_class_token": (
        "vit_tiny_patch16_224",
        dict(img_size=(64, 48), depth=2, class_token=False, reg_tokens=4, global_pool="avg"),
    ),
}


@functools.cache
def _loaded(key: str) -> LoadedModel:
    name, overrides = MODELS[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **overrides).eval()
    with torch.no_grad():  # peaky attention, so a wrong token or a mixed-up image shows in the features
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.embed_dim].mul_(6.0)
    return LoadedModel(model=model, meta=timm_meta(name, model), source=f"timm:{name}", content_hash=key)


def _images(model: torch.nn.Module, count: int, seed: int = 3) -> torch.Tensor:
    """Noise with a bright patch in a different place per image, so images differ in more than noise."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, *token_layout(model).img_size, generator=generator)
    for index in range(count):
        row, col = 16 * (index % 3), 16 * (index % 2)
        images[index, :, row : row + 16, col : col + 16] *= 20.0
    return images


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_two_pass_pca_equals_sklearn_over_every_patch_token(key: str, batch_size: int) -> None:
    """7 images: one forward per image, three batches of 3, 3 and 1 (the kept batch is the short one), one batch."""
    loaded = _loaded(key)
    model, layout = loaded.model, token_layout(loaded.model)
    images = _images(model, 7)
    results = pipeline.image_analyses(loaded, images, ["features"], AnalysisOptions(batch_size=batch_size))
    with torch.no_grad():
        patches = model.forward_features(images)[:, layout.num_prefix_tokens :].double().numpy()  # (B, P, D)
    x = patches.reshape(-1, patches.shape[-1])
    reference = PCA(n_components=3, svd_solver="full").fit(x)
    basis = reference.components_.copy()
    for row in basis:  # the sign convention: each component's largest-|loading| entry positive
        row *= np.sign(row[np.argmax(np.abs(row))])
    want = ((x - reference.mean_) @ basis.T).reshape(7, *layout.grid, 3)
    got = results.features
    np.testing.assert_allclose(got.mean, reference.mean_, atol=1e-5 * np.abs(x).max())
    np.testing.assert_allclose(got.explained_variance_ratio, reference.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(got.components, basis, atol=1e-5)
    assert got.projections.shape == (7, *layout.grid, 3)
    np.testing.assert_allclose(got.projections, want, atol=1e-5 * np.abs(want).max())


def _held(obj: object, seen: set[int] | None = None) -> int:
    """Numbers in every tensor or array reachable from an object's attributes (lists, tuples, dicts, dataclasses)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor | np.ndarray):
        return int(obj.numel() if isinstance(obj, torch.Tensor) else obj.size)
    if isinstance(obj, list | tuple):
        return sum(_held(item, seen) for item in obj)
    if isinstance(obj, dict):
        return sum(_held(item, seen) for item in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type | torch.nn.Module):
        return sum(_held(item, seen) for item in vars(obj).values())
    return 0


# The kernel's own classes, before any test replaces them (a recording subclass must not subclass another).
_FEATURE_MOMENTS = token_analysis.FeatureMoments
_FEATURE_PROJECTIONS = token_analysis.FeatureProjections


def _peak_holdings(monkeypatch: pytest.MonkeyPatch, loaded: LoadedModel, count: int, batch: int) -> dict[str, int]:
    """Run the features analysis with accumulators that record what they hold after every forward they see."""
    peaks = {"moments": 0, "projections": 0}

    def record(name: str, accumulator: object) -> None:
        peaks[name] = max(peaks[name], _held(accumulator))

    class Moments(_FEATURE_MOMENTS):
        def consume_features(self, features: torch.Tensor) -> None:
            super().consume_features(features)
            record("moments", self)

    class Projections(_FEATURE_PROJECTIONS):
        def consume_patches(self, patches: torch.Tensor) -> None:
            super().consume_patches(patches)
            record("projections", self)

    # The features analysis (vitviz/analyses/features.py) takes its accumulators from the kernel module when it runs.
    monkeypatch.setattr(token_analysis, "FeatureMoments", Moments)
    monkeypatch.setattr(token_analysis, "FeatureProjections", Projections)
    images = _images(loaded.model, count)
    results = pipeline.image_analyses(loaded, images, ["features"], AnalysisOptions(batch_size=batch))
    assert results.features is not None and results.features.projections.shape[0] == count
    return peaks


def test_the_pca_holds_the_moments_one_batch_and_the_projections_never_every_images_features(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded = _loaded("registers_no_class_token")
    layout = token_layout(loaded.model)
    d, p, k, batch = loaded.model.embed_dim, layout.num_patches, 3, 2
    few = _peak_holdings(monkeypatch, loaded, count=2, batch=batch)
    many = _peak_holdings(monkeypatch, loaded, count=11, batch=batch)
    # First pass: Σx, Σxxᵀ and the latest forward's [batch, P, D], the same for 2 images as for 11 (keeping every
    # image's features, as the analysis once did, would add 9·P·D numbers).
    assert few["moments"] == many["moments"] <= d + d * d + batch * layout.num_tokens * d
    # Second pass: the mean, components and ratios, and each image's [gh, gw, k] projections; no features.
    pca_numbers = d + k * d + k
    assert many["projections"] == pca_numbers + 11 * p * k
    assert few["projections"] == pca_numbers + 2 * p * k


def test_the_app_and_the_command_line_give_the_same_pca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten sample images in batches of 3: three batches recomputed in the second pass, the last one kept. The
    command line runs the page's four analyses, so the first pass's forward is the same (attention captured)."""
    from vitviz.images import decode_image
    from vitviz.models import file_sha256, load_model
    from vitviz.ui.analyses import InputImage, model_input
    from vitviz.ui.token_analyses import token_analyses

    assert len(SAMPLES) == 10
    out = tmp_path / "out.json"
    argv = [
        "analyze",
        str(DEFAULT),
        "--images",
        *map(str, SAMPLES),
        "--json",
        str(out),
        "--analyses",
        "tokens,features,head-maps,logit-lens",
    ]
    assert main([*argv, "--batch-size", "3"]) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))["features"]
    monkeypatch.setenv("VITVIZ_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_model(str(DEFAULT))
    images = [InputImage(name=p.name, digest=file_sha256(p), pixels=np.asarray(decode_image(p))) for p in SAMPLES]
    app = token_analyses(loaded, images, AnalysisOptions(batch_size=3)).features
    np.testing.assert_array_equal(app.projections, np.asarray(doc["projections"]))
    np.testing.assert_array_equal(app.explained_variance_ratio, doc["explained_variance_ratio"])
    # One forward over all ten (nothing recomputed) agrees up to float32 rounding of the recomputed batches.
    inputs = torch.stack([model_input(loaded, image) for image in images])
    everything = pipeline.image_analyses(loaded, inputs, ["features"], AnalysisOptions(batch_size=10)).features
    assert everything is not None
    np.testing.assert_allclose(
        app.projections, everything.projections, atol=1e-5 * np.abs(everything.projections).max()
    )
