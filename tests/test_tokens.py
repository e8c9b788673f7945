"""What tokens carry (docs/design.md): token norms, prefix attention, outliers, patch-feature PCA, head maps and
the logit lens, checked against direct computations: timm's blocks run by hand on non-fused attention, numpy's
PCA, loops over patches and a sort-by-hand mass threshold."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from vitviz import pipeline
from vitviz.analysis.tokens import mass_threshold_masks, token_names
from vitviz.cli import main
from vitviz.errors import VitvizError
from vitviz.models import load_model
from vitviz.models.checkpoint import LoadedModel
from vitviz.models.sources import timm_meta
from vitviz.pipeline import AnalysisOptions, NotApplicable
from vitviz.tokens import token_layout

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
HYBRID = ROOT / "assets" / "checkpoints" / "shapes-hybrid.safetensors"
IMAGES = [ROOT / "assets" / "samples" / name for name in ("circle.png", "star.png", "triangle.png")]
NEW = ("tokens", "features", "head-maps", "logit-lens")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCHITECTURES = {
    "class_token": ("vit_tiny_patch16_224", dict(img_size=64, depth=3)),
    "distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64, depth=2)),
    "registers_no_class_token": (
        "vit_tiny_patch16_224",
        dict(img_size=(64, 48), depth=2, class_token=False, reg_tokens=4, global_pool="avg"),
    ),
}


@functools.cache
def _timm(key: str) -> torch.nn.Module:
    name, overrides = ARCHITECTURES[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7, **overrides).eval()
    with torch.no_grad():  # peaky attention: random init is near uniform
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.embed_dim].mul_(4.0)
    return model


def _wrap(model: torch.nn.Module, name: str) -> LoadedModel:
    return LoadedModel(model=model, meta=timm_meta(name, model), source=f"timm:{name}", content_hash=name)


def _loaded(key: str) -> LoadedModel:
    if key == "hybrid":
        return load_model(str(HYBRID))
    return _wrap(_timm(key), ARCHITECTURES[key][0])


def _images(model: torch.nn.Module, batch: int = 3, seed: int = 1) -> torch.Tensor:
    """Noise, with a bright square over the first patches of each image so some tokens stand out."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *token_layout(model).img_size, generator=generator)
    for index in range(batch):
        images[index, :, : 16 * (index + 1), :16] *= 25.0
    return images


def _by_hand(model: torch.nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every block's output and attention [B, H, N, N], the blocks run one by one on timm's non-fused path."""
    reference = copy.deepcopy(model)
    outputs, attentions = [], []
    with torch.no_grad():
        x = reference.norm_pre(reference.patch_drop(reference._pos_embed(reference.patch_embed(images))))
        for block in reference.blocks:
            attn = block.attn
            h = block.norm1(x)
            batch, tokens, width = h.shape
            qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, width // attn.num_heads).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            attentions.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).double())
            x = block(x)
            outputs.append(x.double())
    return outputs, attentions


MODELS = ["class_token", "distilled", "registers_no_class_token", "hybrid"]


@functools.cache
def _case(key: str) -> tuple:
    loaded = _loaded(key)
    images = _images(loaded.model)
    options = AnalysisOptions(batch_size=2, outlier_factor=1.2, mass_share=0.6)
    results = pipeline.image_analyses(loaded, images, NEW, options)
    outputs, attentions = _by_hand(loaded.model, images)
    return loaded, images, results, outputs, attentions


@pytest.mark.parametrize("key", MODELS)
def test_norms_and_prefix_attention_equal_the_blocks_run_by_hand(key: str) -> None:
    loaded, _, results, outputs, attentions = _case(key)
    layout = token_layout(loaded.model)
    p = layout.num_prefix_tokens
    tokens = results.tokens
    want_norms = np.stack([o.norm(dim=-1).mean(dim=0).numpy() for o in outputs])
    np.testing.assert_allclose(tokens.norms, want_norms, rtol=1e-5)
    want_prefix = np.stack([a[:, :, p:, :p].sum(-1).mean(-1).mean(0).numpy() for a in attentions])
    np.testing.assert_allclose(tokens.prefix_attention, want_prefix, atol=1e-6)
    if p:
        assert tokens.prefix_attention.max() > 0.01, "some head should look at the prefix"
    assert tokens.num_images == 3 and len(tokens.token_names) == layout.num_tokens


def test_token_names_follow_the_models_own_order() -> None:
    assert token_names(token_layout(_timm("class_token")))[:2] == ["cls", "r0c0"]
    assert token_names(token_layout(_timm("distilled")))[:3] == ["cls", "dist", "r0c0"]
    names = token_names(token_layout(_timm("registers_no_class_token")))
    assert names[:5] == ["reg0", "reg1", "reg2", "reg3", "r0c0"] and names[-1] == "r3c2"  # 4 x 3 patches
    # timm puts the registers where the names say: the register tokens' outputs are the sequence's first four
    model = _timm("registers_no_class_token")
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(_images(model, 1)))
    torch.testing.assert_close(x[0, :4] - model.pos_embed[0, :4], model.reg_token[0])


@pytest.mark.parametrize("key", MODELS)
def test_outliers_equal_a_loop_over_patches(key: str) -> None:
    loaded, _, results, outputs, _attentions = _case(key)
    layout = token_layout(loaded.model)
    p, (gh, gw) = layout.num_prefix_tokens, layout.grid
    want = []
    for image in range(3):
        for layer, output in enumerate(outputs):
            norms = [float(output[image, p + i].norm()) for i in range(gh * gw)]
            median = float(np.median(norms))
            for i, norm in enumerate(norms):
                if norm > 1.2 * median:
                    want.append((image, layer, i // gw, i % gw, norm, norm / median))
    t = results.tokens
    got = list(zip(t.outlier_image, t.outlier_layer, t.outlier_row, t.outlier_col, t.outlier_norm, t.outlier_ratio))
    assert len(want) > 0 and [g[:4] for g in got] == [w[:4] for w in want]
    np.testing.assert_allclose([g[4:] for g in got], [w[4:] for w in want], rtol=1e-5)
    assert t.outlier_counts.tolist() == [sum(1 for w in want if w[1] == layer) for layer in range(len(outputs))]


@pytest.mark.parametrize("key", MODELS)
def test_feature_pca_equals_a_direct_pca(key: str) -> None:
    loaded, images, results, _outputs, _attentions = _case(key)
    p, (gh, gw) = token_layout(loaded.model).num_prefix_tokens, token_layout(loaded.model).grid
    with torch.no_grad():
        patches = loaded.model.forward_features(images)[:, p:].double().numpy()  # (B, P, D)
    x = patches.reshape(-1, patches.shape[-1])
    centred = x - x.mean(axis=0)
    _u, singular, vt = np.linalg.svd(centred, full_matrices=False)
    ratio = singular**2 / (singular**2).sum()
    features = results.features
    np.testing.assert_allclose(features.explained_variance_ratio, ratio[:3], rtol=1e-6, atol=1e-9)
    for component in range(3):
        want = (centred @ vt[component]).reshape(3, gh, gw)
        got = features.projections[..., component]
        sign = np.sign(np.sum(got * want))
        assert sign != 0
        np.testing.assert_allclose(got, sign * want, atol=1e-4 * np.abs(want).max())
        loading = features.components[component]
        assert loading[np.argmax(np.abs(loading))] > 0  # the sign convention


@pytest.mark.parametrize("key", MODELS)
def test_head_maps_are_the_last_layers_class_token_row_or_mean_patch_query(key: str) -> None:
    loaded, _, results, _outputs, attentions = _case(key)
    layout = token_layout(loaded.model)
    p = layout.num_prefix_tokens
    last = attentions[-1]
    want = last[:, :, 0, p:] if layout.has_class_token else last[:, :, p:, p:].mean(dim=2)
    assert len(results.head_maps) == 3
    for image, maps in enumerate(results.head_maps):
        assert maps.uses_class_token == layout.has_class_token
        assert maps.query == ("class token" if layout.has_class_token else "mean patch query")
        np.testing.assert_allclose(maps.attention, want[image].reshape(-1, *layout.grid).numpy(), atol=1e-6)
        np.testing.assert_array_equal(maps.masks, _slow_masks(maps.attention, 0.6))


def _slow_masks(maps: np.ndarray, share: float) -> np.ndarray:
    """The mass threshold by hand: walk each map's patches from the largest, stop once `share` is held."""
    out = np.zeros(maps.shape, dtype=bool)
    for h in range(maps.shape[0]):
        flat = maps[h].reshape(-1).tolist()
        order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
        total, held = sum(flat), 0.0
        for i in order:
            out[h].reshape(-1)[i] = True
            held += flat[i]
            if held >= share * total * (1 - 1e-12):
                break
    return out


@pytest.mark.parametrize("share", [0.05, 0.3, 0.6, 0.9, 1.0])
def test_mass_threshold_equals_sorting_by_hand(share: float) -> None:
    generator = np.random.default_rng(3)
    maps = generator.random((5, 6, 7)) ** 4
    maps[0, 0, :3] = maps[0, 1, :3] = 0.5  # ties are broken by the lower index
    got = mass_threshold_masks(maps, share)
    np.testing.assert_array_equal(got, _slow_masks(maps, share))
    assert (got.sum(axis=(1, 2)) >= 1).all()
    held = (maps * got).sum(axis=(1, 2))
    assert (held >= share * maps.sum(axis=(1, 2)) * (1 - 1e-12)).all()


@pytest.mark.parametrize("key", MODELS)
def test_logit_lens_equals_each_layer_through_the_head(key: str) -> None:
    loaded, images, results, outputs, _attentions = _case(key)
    model, layout = loaded.model, token_layout(loaded.model)
    with torch.no_grad():
        targets = model(images).argmax(dim=-1)
        for image, lens in enumerate(results.logit_lens):
            assert lens.target_class == int(targets[image])
            for layer, output in enumerate(outputs):
                tokens = output[image, layout.num_prefix_tokens :].float()
                probs = model.head(model.fc_norm(model.norm(tokens))).softmax(dim=-1)[:, lens.target_class]
                np.testing.assert_allclose(lens.probabilities[layer].reshape(-1), probs.numpy(), atol=1e-5)


def test_batches_combine_into_the_same_result_as_one_forward() -> None:
    loaded, images, results, _outputs, _attentions = _case("distilled")
    one = pipeline.image_analyses(loaded, images, NEW, AnalysisOptions(batch_size=3, outlier_factor=1.2))
    np.testing.assert_allclose(one.tokens.norms, results.tokens.norms, rtol=1e-6)
    np.testing.assert_allclose(one.tokens.prefix_attention, results.tokens.prefix_attention, atol=1e-7)
    np.testing.assert_array_equal(one.tokens.outlier_image, results.tokens.outlier_image)
    np.testing.assert_allclose(one.features.projections, results.features.projections, atol=1e-4)


def test_logit_lens_without_a_head_is_not_applicable() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=0).eval()
    loaded = _wrap(model, "vit_tiny_patch16_224")
    results = pipeline.image_analyses(loaded, _images(model, 1), ("logit-lens", "tokens"), AnalysisOptions())
    assert isinstance(results.logit_lens, NotApplicable) and "classification head" in results.logit_lens.reason
    assert results.tokens is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(outlier_factor=1.0), "--outlier-factor must be a number above 1, got 1.0"),
        (dict(outlier_factor=0.5), "--outlier-factor must be a number above 1, got 0.5"),
        (dict(outlier_factor=float("inf")), "--outlier-factor must be a number above 1, got inf"),
        (dict(mass_share=0.0), "--mass-share must be in (0, 1], got 0.0"),
        (dict(mass_share=1.5), "--mass-share must be in (0, 1], got 1.5"),
    ],
)
def test_bad_options_are_refused_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(VitvizError) as raised:
        AnalysisOptions(**kwargs)
    assert str(raised.value) == message


@pytest.mark.parametrize("flag", [["--outlier-factor", "1"], ["--mass-share", "1.01"]])
def test_cli_bad_values_exit_2_with_one_line(flag: list[str], capsys) -> None:
    argv = ["analyze", str(DEFAULT), "--images", str(IMAGES[0]), "--analyses", "tokens", "--json", "-", *flag]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag[0] in err


def test_cli_writes_the_new_sections_from_the_service(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.json"
    argv = ["analyze", str(DEFAULT), "--images", *map(str, IMAGES), "--json", str(out), "--analyses", ",".join(NEW)]
    assert main([*argv, "--outlier-factor", "1.5", "--mass-share", "0.5"]) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert list(doc) == ["model", "tokens", "features", "head_maps", "logit_lens"]
    loaded = load_model(str(DEFAULT))
    from vitviz.images import load_for_model

    meta = loaded.meta
    images = torch.stack(
        [
            load_for_model(p, input_size=tuple(meta.input_size), mean=meta.mean, std=meta.std, in_chans=meta.in_chans)
            for p in IMAGES
        ]
    )
    want = pipeline.image_analyses(loaded, images, NEW, AnalysisOptions(outlier_factor=1.5, mass_share=0.5))
    tokens = doc["tokens"]
    assert tokens["norms"] == want.tokens.norms.tolist()
    assert tokens["token_names"][0] == "cls" and tokens["num_prefix_tokens"] == 1
    assert tokens["prefix_attention"] == want.tokens.prefix_attention.tolist()
    assert tokens["outlier_counts"] == want.tokens.outlier_counts.tolist()
    assert len(tokens["outliers"]) == int(want.tokens.outlier_counts.sum())
    assert all(o["ratio"] > 1.5 and o["image"] in map(str, IMAGES) for o in tokens["outliers"])
    assert doc["features"]["projections"] == want.features.projections.tolist()
    assert len(doc["features"]["explained_variance_ratio"]) == 3
    assert [h["image"] for h in doc["head_maps"]] == [str(p) for p in IMAGES]
    assert doc["head_maps"][0]["masks"] == want.head_maps[0].masks.astype(int).tolist()
    assert doc["head_maps"][0]["mass_share"] == 0.5 and doc["head_maps"][0]["query"] == "class token"
    assert doc["logit_lens"][1]["probabilities"] == want.logit_lens[1].probabilities.tolist()


def test_the_default_analyses_stay_the_papers_five() -> None:
    assert pipeline.parse_analyses(None) == ["filters", "position", "distance", "rollout", "gradient-rollout"]
    assert pipeline.parse_analyses("tokens,head-maps") == ["tokens", "head-maps"]
    with pytest.raises(VitvizError, match="unknown analysis token"):
        pipeline.parse_analyses("token")


# --- the app ---------------------------------------------------------------------------------------------


def test_tokens_page_renders_on_the_bundled_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("VITVIZ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VITVIZ_RUNS_DIR", str(tmp_path / "runs"))
    (tmp_path / "runs").mkdir()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=240)
    at.run()
    at.switch_page("vitviz/ui/tokens.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "What tokens carry"
    headings = [m.value for m in at.markdown]
    for heading in ("Token norms after every block", "Attention to prefix tokens", "Head maps", "Logit lens"):
        assert f"##### {heading}" in headings
    assert not at.error


def test_the_page_cache_returns_what_the_service_computed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitviz.images import decode_image
    from vitviz.models import file_sha256
    from vitviz.ui.analyses import InputImage, model_input
    from vitviz.ui.token_analyses import token_analyses

    monkeypatch.setenv("VITVIZ_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_model(str(DEFAULT))
    images = [InputImage(name=p.name, digest=file_sha256(p), pixels=np.asarray(decode_image(p))) for p in IMAGES]
    options = AnalysisOptions(outlier_factor=1.5, mass_share=0.5, batch_size=2)
    first = token_analyses(loaded, images, options)
    second = token_analyses(loaded, images, options)  # read back from the disk cache
    assert list((tmp_path / "cache").rglob("*.npz")), "nothing was stored"
    np.testing.assert_array_equal(first.tokens.norms, second.tokens.norms)
    assert first.tokens.token_names == second.tokens.token_names
    np.testing.assert_array_equal(first.features.projections, second.features.projections)
    np.testing.assert_array_equal(first.head_maps[2].masks, second.head_maps[2].masks)
    assert second.head_maps[2].masks.dtype == bool and second.head_maps[0].uses_class_token
    np.testing.assert_array_equal(first.logit_lens[1].probabilities, second.logit_lens[1].probabilities)
    tensors = torch.stack([model_input(loaded, image) for image in images])
    direct = pipeline.image_analyses(loaded, tensors, NEW, options)
    np.testing.assert_allclose(second.tokens.norms, direct.tokens.norms, rtol=1e-12)
    np.testing.assert_array_equal(second.tokens.outlier_layer, direct.tokens.outlier_layer)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_hooks_go_away_and_the_model_is_unchanged_even_when_a_forward_fails() -> None:
    loaded = _loaded("distilled")
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pipeline.image_analyses(loaded, _images(model, 2), NEW, AnalysisOptions())
    assert _hook_count(model) == 0
    wrong = torch.zeros(1, 3, 32, 32)  # the wrong input size: the forward raises inside the hooks' block
    with pytest.raises(Exception):  # noqa: B017  (whatever timm raises for a bad size)
        pipeline.image_analyses(loaded, wrong, NEW, AnalysisOptions())
    assert _hook_count(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_figures_for_the_token_analyses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    samples = ROOT / "assets" / "samples"
    argv = ["analyze", str(ROOT / "assets" / "checkpoints" / "shapes-default.safetensors")]
    argv += ["--images", str(samples / "circle.png"), str(samples / "star.png")]
    argv += ["--analyses", "tokens,features,head-maps,logit-lens", "--figures", str(tmp_path)]
    assert main(argv) == 0
    stems = {p.stem for p in tmp_path.iterdir() if p.suffix == ".png"}
    per_image = {f"{kind}-{i:03d}-{name}" for kind in ("outliers", "features", "head-maps", "logit-lens")
                 for i, name in enumerate(("circle", "star"))}  # fmt: skip
    assert stems == {"token-norms", "prefix-attention"} | per_image
    assert {p.stem for p in tmp_path.iterdir() if p.suffix == ".svg"} == stems
