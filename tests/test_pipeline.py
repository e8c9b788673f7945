"""The analysis service: the CLI and the app compute the same numbers through it, its options are checked
once for everyone, its batch loop reports progress, and its top-k breaks ties the same way every time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fakes import OpaqueAttention
from vitviz import pipeline
from vitviz.analysis.rollout import RolloutAccumulator
from vitviz.cli import main
from vitviz.errors import VitvizError
from vitviz.images import decode_image, load_for_model
from vitviz.models import LoadedModel, file_sha256, load_model
from vitviz.pipeline import AnalysisOptions, NotApplicable, top_k
from vitviz.tokens import token_layout

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
HYBRID = ROOT / "assets" / "checkpoints" / "shapes-hybrid.safetensors"
NOPOS = ROOT / "assets" / "checkpoints" / "shapes-nopos.safetensors"
IMAGES = [ROOT / "assets" / "samples" / name for name in ("circle.png", "star.png", "triangle.png")]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def app_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("VITVIZ_CACHE_DIR", str(folder))
    return folder


def _input_images() -> list:
    """The sample images as the app's pickers hand them to the analyses."""
    from vitviz.ui.analyses import InputImage

    return [InputImage(name=p.name, digest=file_sha256(p), pixels=np.asarray(decode_image(p))) for p in IMAGES]


# --- the CLI and the app agree -------------------------------------------------------------------------


def test_cli_and_app_compute_identical_numbers(app_cache: Path, tmp_path: Path, capsys) -> None:
    from vitviz.ui import analyses

    out = tmp_path / "out.json"
    argv = ["analyze", str(DEFAULT), "--images", *map(str, IMAGES), "--json", str(out), "--components", "8"]
    argv += ["--head-fusion", "max", "--discard-ratio", "0.25", "--start-layer", "1", "--batch-size", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text(encoding="utf-8"))

    loaded = load_model(str(DEFAULT))
    images = _input_images()
    rollout_options = AnalysisOptions(head_fusion="max", discard_ratio=0.25, start_layer=1)
    for _ in range(2):  # computed and stored, then read back from the disk cache
        filters = analyses.filters(loaded)
        assert doc["filters"]["explained_variance_ratio"] == filters.explained_variance_ratio[:8].tolist()
        assert doc["filters"]["components"] == filters.components[:8].reshape(8, -1).tolist()
        assert doc["position"]["similarity"] == analyses.position(loaded).matrix().tolist()

        distance = analyses.attention_distance(loaded, images, AnalysisOptions(batch_size=1))
        assert doc["distance"] == {
            "mode": "paper",
            "pixels": distance.pixels.tolist(),
            "std": distance.std.tolist(),
            "fraction": distance.fraction.tolist(),
            "num_images": 3,
        }
        for index, image in enumerate(images):
            attention = analyses.image_attention(loaded, image, rollout_options)
            entry = doc["rollout"][index]
            assert entry["map"] == attention.rollout.map.tolist()
            assert (entry["head_fusion"], entry["discard_ratio"], entry["start_layer"]) == ("max", 0.25, 1)
            top5 = top_k(attention.probabilities, loaded.meta.class_names)
            assert entry["top5"] == [[p.name, round(p.probability, 6)] for p in top5]
            gradient = analyses.gradient_map(loaded, image, None)
            assert doc["gradient_rollout"][index]["map"] == gradient.map.tolist()
            assert doc["gradient_rollout"][index]["target_class"] == gradient.target_class == top5[0].index
    stored = sorted(p.parent.parent.name for p in app_cache.rglob("*.npz"))
    assert stored == ["distance"] + ["gradient-rollout"] * 3 + ["image-attention"] * 3


def test_the_app_recomputes_a_cache_entry_of_an_older_layout(app_cache: Path) -> None:
    from vitviz.ui import analyses
    from vitviz.ui.diskcache import DiskCache, cache_key

    loaded = load_model(str(DEFAULT))
    images = _input_images()[:2]
    key = cache_key("distance", model=loaded.content_hash, images=[i.digest for i in images], mode="paper")
    DiskCache(app_cache / "analyses").put("distance", key, {"pixels": np.zeros((4, 3))})  # no std, mode, ...
    distance = analyses.attention_distance(loaded, images, AnalysisOptions())
    tensors = torch.stack([load_for_model(p, input_size=(32, 32), mean=loaded.meta.mean, std=loaded.meta.std,
                                          in_chans=3) for p in IMAGES[:2]])  # fmt: skip
    expected = pipeline.image_analyses(loaded, tensors, ["distance"], AnalysisOptions()).distance
    assert distance.num_images == 2 and np.array_equal(distance.pixels, expected.pixels)
    assert np.array_equal(distance.per_image, expected.per_image)
    assert analyses.attention_distance(loaded, images, AnalysisOptions()).pixels.tolist() == expected.pixels.tolist()


def test_typed_results_survive_the_array_round_trip() -> None:
    loaded = load_model(str(DEFAULT))
    image = load_for_model(IMAGES[1], input_size=(32, 32), mean=loaded.meta.mean, std=loaded.meta.std, in_chans=3)
    options = AnalysisOptions(head_fusion="min", discard_ratio=0.5, start_layer=2)
    attention = pipeline.image_attention(loaded, image, options, query_index=5)
    back = pipeline.ImageAttention.from_arrays(attention.to_arrays())
    assert back.rollout.head_fusion == "min" and back.rollout.discard_ratio == 0.5 and back.rollout.start_layer == 2
    assert np.array_equal(back.rollout.map, attention.rollout.map)
    assert np.array_equal(back.probabilities, attention.probabilities)
    assert back.query.query_index == 5 and np.array_equal(back.query.grid, attention.query.grid)
    gradient = pipeline.gradient_rollout_map(loaded, image, 3)
    back_gradient = pipeline.GradientRolloutResult.from_arrays(gradient.to_arrays())
    assert back_gradient.target_class == gradient.target_class == 3
    assert np.array_equal(back_gradient.map, gradient.map)


# --- what the results hold -----------------------------------------------------------------------------


def test_query_attention_grid_is_the_patch_part_of_the_attention_row() -> None:
    loaded = load_model(str(DEFAULT))
    image = load_for_model(IMAGES[0], input_size=(32, 32), mean=loaded.meta.mean, std=loaded.meta.std, in_chans=3)
    layout = token_layout(loaded.model)
    query_index = layout.num_prefix_tokens + 2 * layout.grid[1] + 5  # patch (2, 5)
    query = pipeline.image_attention(loaded, image, AnalysisOptions(), query_index=query_index).query
    depth, heads = len(loaded.model.blocks), loaded.model.blocks[0].attn.num_heads
    assert query.attention.shape == (depth, heads, layout.num_tokens)
    np.testing.assert_allclose(query.attention.sum(axis=-1), 1.0, rtol=1e-5)  # softmax rows
    gh, gw = layout.grid
    for row in range(gh):
        for col in range(gw):
            token = layout.num_prefix_tokens + row * gw + col
            assert np.array_equal(query.grid[:, :, row, col], query.attention[:, :, token])


def test_not_applicable_results_say_why() -> None:
    hybrid = load_model(str(HYBRID))
    assert isinstance(pipeline.filters(hybrid), NotApplicable)
    assert "hybrid" in pipeline.filters(hybrid).reason
    nopos = load_model(str(NOPOS))
    assert isinstance(pipeline.position(nopos), NotApplicable)
    assert "position" in pipeline.position(nopos).reason


def test_filters_components_are_a_prefix_of_all_components() -> None:
    loaded = load_model(str(DEFAULT))
    everything = pipeline.filters(loaded)
    five = pipeline.filters(loaded, 5)
    weight = loaded.model.patch_embed.proj.weight.detach()
    assert everything.weight.shape == tuple(weight.shape) and np.array_equal(everything.weight, weight.numpy())
    assert len(everything.explained_variance_ratio) == min(weight.shape[0], weight[0].numel())
    assert np.array_equal(five.components, everything.components[:5])
    assert abs(everything.explained_variance_ratio.sum() - 1.0) < 1e-9


def test_resampled_position_copies_the_model_and_reports_the_method() -> None:
    loaded = load_model(str(DEFAULT))
    before = pipeline.position(loaded).similarity.copy()
    resampled = pipeline.resampled_position(loaded, (48, 48))
    assert (resampled.old_grid, resampled.new_grid, resampled.method) == ((8, 8), (12, 12), "bicubic")
    assert resampled.position.similarity.shape == (12, 12, 12, 12)
    assert np.array_equal(pipeline.position(loaded).similarity, before)


def test_model_card_matches_the_model_and_its_json_section() -> None:
    loaded = load_model(str(DEFAULT))
    card = pipeline.model_card(loaded)
    assert card.parameters == sum(p.numel() for p in loaded.model.parameters())
    assert (card.depth, card.num_heads, card.embed_dim, card.num_classes) == (4, 3, 96, 10)
    assert card.model_section() == {k: card.to_dict()[k] for k in card.model_section()}
    card.to_dict()["training"]["dataset"] = "changed"
    assert card.training["dataset"] != "changed"  # the dict handed out is a copy


# --- one validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_discard_ratio_rule_is_the_same_for_options_and_the_accumulator(ratio: float) -> None:
    layout = token_layout(load_model(str(DEFAULT)).model)
    with pytest.raises(VitvizError, match=r"discard ratio must be in \[0, 1\)") as from_options:
        AnalysisOptions(discard_ratio=ratio)
    with pytest.raises(VitvizError, match=r"discard ratio must be in \[0, 1\)") as from_accumulator:
        RolloutAccumulator(layout, discard_ratio=ratio)
    assert str(from_options.value) == str(from_accumulator.value)


def test_a_discard_ratio_just_under_one_is_accepted_by_both() -> None:
    layout = token_layout(load_model(str(DEFAULT)).model)
    assert AnalysisOptions(discard_ratio=0.99).discard_ratio == 0.99
    assert RolloutAccumulator(layout, discard_ratio=0.99).discard_ratio == 0.99


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"components": 0}, "components"),
        ({"distance_mode": "far"}, "distance-mode"),
        ({"head_fusion": "median"}, "head-fusion"),
        ({"start_layer": -1}, "start-layer"),
        ({"batch_size": 0}, "batch-size"),
    ],
)
def test_bad_options_are_refused_when_made(fields: dict, needle: str) -> None:
    with pytest.raises(VitvizError, match=needle):
        AnalysisOptions(**fields)


def test_options_that_do_not_fit_the_model_are_refused_before_any_forward() -> None:
    loaded = load_model(str(DEFAULT))
    images = torch.zeros(1, 3, 32, 32)
    with pytest.raises(VitvizError, match="start-layer 4 is past the last layer"):
        pipeline.image_analyses(loaded, images, ["rollout"], AnalysisOptions(start_layer=4))
    with pytest.raises(VitvizError, match="target-class 10 is out of range"):
        pipeline.image_analyses(loaded, images, ["gradient-rollout"], AnalysisOptions(target_class=10))
    # Each check applies only to the analysis the option belongs to.
    assert pipeline.image_analyses(loaded, images, ["distance"], AnalysisOptions(start_layer=4)).distance is not None


# --- the batch loop and top-k --------------------------------------------------------------------------


def test_batch_loop_reports_progress_and_keeps_image_order() -> None:
    loaded = load_model(str(DEFAULT))
    meta = loaded.meta
    tensors = [load_for_model(p, input_size=(32, 32), mean=meta.mean, std=meta.std, in_chans=3) for p in IMAGES]
    seen: list[tuple[int, int]] = []
    options = AnalysisOptions(batch_size=2)
    analyses = ["distance", "rollout", "gradient-rollout"]
    lazily = pipeline.image_analyses(loaded, tensors, analyses, options, lambda d, t: seen.append((d, t)))
    assert seen == [(2, 3), (3, 3)]
    assert len(lazily.rollouts) == len(lazily.top5) == len(lazily.gradients) == 3 and not lazily.queries
    assert lazily.distance.num_images == 3 and lazily.probabilities.shape == (3, 10)
    one_by_one = [pipeline.image_attention(loaded, t, AnalysisOptions()) for t in tensors]
    for result, single in zip(lazily.rollouts, one_by_one):
        np.testing.assert_allclose(result.map, single.rollout.map, rtol=1e-6, atol=1e-9)
    stacked = pipeline.image_analyses(loaded, torch.stack(tensors), ["rollout"], AnalysisOptions(batch_size=2))
    assert np.array_equal(stacked.rollout_maps, lazily.rollout_maps)
    with pytest.raises(VitvizError, match="no images"):
        pipeline.image_analyses(loaded, [], analyses, options)


def test_top_k_is_sorted_and_breaks_ties_towards_the_lower_class_index() -> None:
    probabilities = np.array([0.1, 0.3, 0.05, 0.3, 0.2, 0.05], dtype=np.float32)
    names = ["a", "b", "c", "d", "e"]  # class 5 has no name
    top = top_k(probabilities, names, k=6)
    assert [p.index for p in top] == [1, 3, 4, 0, 2, 5]
    assert [p.name for p in top] == ["b", "d", "e", "a", "c", "5"]
    assert top[0].probability == pytest.approx(0.3)
    assert len(top_k(probabilities, names)) == 5 and len(top_k(probabilities[:3], names)) == 3
    assert [p.index for p in top_k(torch.from_numpy(probabilities), names, k=2)] == [1, 3]


# --- one section never stops the others ----------------------------------------------------------------


def _timm_loaded(name: str, **overrides: object) -> LoadedModel:
    import timm

    from vitviz.models import timm_meta

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, img_size=64, **overrides).eval()
    return LoadedModel(model=model, meta=timm_meta(name, model), source=f"timm:{name}", content_hash=name)


def _unreadable(loaded: LoadedModel) -> LoadedModel:
    """The model with its first block's attention (the first branch's, in a parallel block) made opaque."""
    block = loaded.model.blocks[0]
    owner = block.attns[0] if hasattr(block, "attns") else block
    owner.attn = OpaqueAttention(loaded.model.embed_dim)
    loaded.model.eval()
    return loaded


@pytest.mark.parametrize(
    ("name", "overrides", "lens_applies"),
    [
        ("cait_xxs24_224", dict(depth=2), False),  # blocks run on the patches only
        ("vit_small_patch16_18x2_224", dict(depth=2), True),  # parallel attention branches
    ],
)
def test_unreadable_attention_leaves_the_other_analyses_running(name: str, overrides: dict, lens_applies: bool) -> None:
    from vitviz.capture import unreadable_reason

    loaded = _unreadable(_timm_loaded(name, **overrides))
    reason = unreadable_reason(loaded.model)
    assert reason is not None and name in reason
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    results = pipeline.image_analyses(loaded, images, pipeline.ANALYSES, AnalysisOptions(batch_size=2))
    for value in (results.distance, results.rollouts, results.gradients, results.tokens, results.head_maps):
        assert value == NotApplicable(reason)
    assert results.rollout_maps is None and results.probabilities is None
    # Features run on a plain forward: the final patch tokens, checked against the model's own features.
    assert isinstance(results.features, pipeline.FeaturesResult)
    with torch.no_grad():
        final = loaded.model.forward_features(images)
    patches = final[:, token_layout(loaded.model).num_prefix_tokens :].double().reshape(-1, final.shape[-1])
    np.testing.assert_allclose(results.features.mean, patches.mean(0).numpy(), rtol=1e-6, atol=1e-7)
    if lens_applies:
        assert len(results.logit_lens) == 3
    else:
        assert isinstance(results.logit_lens, NotApplicable) and "16 tokens" in results.logit_lens.reason
    # The single-image helpers have no result to return: one line.
    with pytest.raises(VitvizError, match="cannot read the attention"):
        pipeline.gradient_rollout_map(loaded, images[0])
    with pytest.raises(VitvizError, match="cannot read the attention"):
        pipeline.image_attention(loaded, images[0], AnalysisOptions())
    assert pipeline.attention_not_applicable(loaded) == NotApplicable(reason)


def test_cait_position_is_its_patch_table() -> None:
    loaded = _timm_loaded("cait_xxs24_224", depth=2)
    result = pipeline.position(loaded)
    assert isinstance(result, pipeline.PositionResult)
    table = loaded.model.pos_embed.detach()[0].double()  # CaiT: one entry per patch, none for the class token
    unit = table / table.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(result.matrix(), (unit @ unit.T).numpy(), rtol=1e-6, atol=1e-9)
    assert pipeline.attention_not_applicable(_timm_loaded("vit_tiny_patch16_224", depth=1)) is None


def test_app_analyses_of_an_unreadable_model_give_one_line_and_cache_nothing(app_cache: Path) -> None:
    from vitviz.ui.analyses import attention_distance
    from vitviz.ui.token_analyses import token_analyses

    loaded = _unreadable(_timm_loaded("cait_xxs24_224", depth=2))
    images = _input_images()[:1]
    for run in (
        lambda: attention_distance(loaded, images, AnalysisOptions()),
        lambda: token_analyses(loaded, images, AnalysisOptions()),
    ):
        with pytest.raises(VitvizError, match="(does|do) not apply to this model: .*OpaqueAttention") as caught:
            run()
        assert "\n" not in str(caught.value)
    assert not any(p.is_file() for p in app_cache.rglob("*"))
