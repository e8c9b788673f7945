"""Mean attention distance, attention rollout, gradient rollout and the pointing game.

Every number is checked against a slow reference written here from the definitions in docs/design.md (python loops,
numpy, float64) on attention captured from six timm architectures, and against closed cases.
Geometry in the references (prefix tokens, grid, stride) is written down per architecture, not read from
the model, so a wrong token layout fails too.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import timm
import torch

from vitviz.analysis.distance import (
    DistanceAccumulator,
    mean_attention_distance,
    query_attention_distance,
)
from vitviz.analysis.rollout import (
    RolloutAccumulator,
    attention_rollout,
    gradient_rollout,
    patch_grid,
    pointing_game,
)
from vitviz.capture import KeepAllAttention, QueryAttention, attention_gradients, capture_attention
from vitviz.errors import VitvizError
from vitviz.tokens import TokenLayout, token_layout


@dataclass(frozen=True)
class Arch:
    name: str
    overrides: dict
    num_prefix_tokens: int
    has_class_token: bool
    grid: tuple[int, int]
    stride: tuple[int, int]
    img_size: tuple[int, int]


ARCHS = {
    "vit_tiny": Arch("vit_tiny_patch16_224", dict(depth=4), 1, True, (14, 14), (16, 16), (224, 224)),
    "deit_distilled": Arch("deit_tiny_distilled_patch16_224", dict(depth=4), 2, True, (14, 14), (16, 16), (224, 224)),
    "registers_gap": Arch(
        "vit_base_patch16_reg4_gap_256",
        dict(embed_dim=64, depth=2, num_heads=2),
        4,
        False,
        (16, 16),
        (16, 16),
        (256, 256),
    ),
    "relpos": Arch(
        "vit_relpos_small_patch16_224",
        dict(embed_dim=64, depth=2, num_heads=2),
        0,
        False,
        (14, 14),
        (16, 16),
        (224, 224),
    ),
    "hybrid": Arch("vit_tiny_r_s16_p8_224", {}, 1, True, (7, 7), (32, 32), (224, 224)),
    "non_square": Arch(
        "vit_tiny_patch16_224", dict(img_size=(96, 64), depth=3, qk_norm=True), 1, True, (6, 4), (16, 16), (96, 64)
    ),
}


@functools.cache
def _model(key: str) -> torch.nn.Module:
    arch = ARCHS[key]
    torch.manual_seed(0)
    model = timm.create_model(arch.name, pretrained=False, num_classes=10, **arch.overrides).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(3.0)  # sharper than random init, so fusions and discards matter
        torch.nn.init.normal_(model.head.weight, std=0.5)  # non-zero head: non-zero attention gradients
    return model


def _images(key: str, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(batch, 3, *ARCHS[key].img_size, generator=generator)


@functools.cache
def _captured(key: str) -> tuple[TokenLayout, list[torch.Tensor]]:
    model = _model(key)
    layout = token_layout(model)
    arch = ARCHS[key]
    assert (layout.num_prefix_tokens, layout.has_class_token, layout.grid, layout.stride) == (
        arch.num_prefix_tokens,
        arch.has_class_token,
        arch.grid,
        arch.stride,
    )
    keep = KeepAllAttention()
    capture_attention(model, _images(key), keep, with_logits=False)
    return layout, keep.result()


def _numpy_layers(attentions: list[torch.Tensor]) -> list[np.ndarray]:
    return [attn.numpy().astype(np.float64) for attn in attentions]


# ---------------------------------------------------------------- references written from the definitions


def reference_pixel_distances(grid: tuple[int, int], stride: tuple[int, int]) -> list[list[float]]:
    """D[q][k]: distance in pixels between the centres of patches q and k, row-major patches."""
    centres = [((i + 0.5) * stride[0], (j + 0.5) * stride[1]) for i in range(grid[0]) for j in range(grid[1])]
    return [[math.hypot(a[0] - b[0], a[1] - b[1]) for b in centres] for a in centres]


def reference_mean_distance(
    layers: list[np.ndarray], prefix: int, grid: tuple[int, int], stride: tuple[int, int], mode: str
) -> np.ndarray:
    """Per-image values [L, B, H]: mean over patch queries of sum_k w[q, k] D[q, k]."""
    distances = np.array(reference_pixel_distances(grid, stride))
    num_layers, (batch, heads) = len(layers), layers[0].shape[:2]
    per_image = np.zeros((num_layers, batch, heads))
    for layer in range(num_layers):
        for image in range(batch):
            for head in range(heads):
                w = layers[layer][image, head, prefix:, prefix:]
                total = 0.0
                for query in range(w.shape[0]):
                    row = w[query]
                    if mode == "renormalised":
                        row = row / row.sum()
                    total += float(np.dot(row, distances[query]))
                per_image[layer, image, head] = total / w.shape[0]
    return per_image


def reference_rollout(
    layers: list[np.ndarray],
    prefix: int,
    has_class_token: bool,
    grid: tuple[int, int],
    head_fusion: str,
    discard_count: int,
    start_layer: int,
) -> np.ndarray:
    maps = []
    batch, _, num_tokens, _ = layers[0].shape
    for image in range(batch):
        rollout = np.eye(num_tokens)
        for layer in range(start_layer, len(layers)):
            heads = layers[layer][image]
            fused = {"mean": heads.mean(axis=0), "max": heads.max(axis=0), "min": heads.min(axis=0)}[head_fusion]
            flat = fused.flatten().copy()
            for index in np.argsort(flat, kind="stable")[:discard_count]:
                if index != 0:  # entry (0, 0) is kept
                    flat[index] = 0.0
            mixed = 0.5 * flat.reshape(num_tokens, num_tokens) + 0.5 * np.eye(num_tokens)
            for row in range(num_tokens):
                mixed[row] = mixed[row] / mixed[row].sum()
            rollout = mixed @ rollout
        values = rollout[0, prefix:] if has_class_token else rollout[prefix:, prefix:].mean(axis=0)
        maps.append(values.reshape(grid))
    return np.stack(maps)


def reference_gradient_rollout(
    layers: list[np.ndarray], grads: list[np.ndarray], prefix: int, has_class_token: bool, grid: tuple[int, int]
) -> np.ndarray:
    maps = []
    batch, _, num_tokens, _ = layers[0].shape
    for image in range(batch):
        rollout = np.eye(num_tokens)
        for attn, grad in zip(layers, grads):
            weighted = np.maximum(grad[image] * attn[image], 0.0).mean(axis=0)
            rollout = rollout + weighted @ rollout
        values = rollout[0, prefix:] if has_class_token else rollout[prefix:, prefix:].mean(axis=0)
        maps.append(values.reshape(grid))
    return np.stack(maps)


def reference_pointing_game(maps: np.ndarray, masks: np.ndarray, stride: tuple[int, int]) -> tuple[list, list]:
    hits, chances = [], []
    for image in range(maps.shape[0]):
        gh, gw = maps.shape[1:]
        best, best_value = (0, 0), -math.inf
        for i in range(gh):
            for j in range(gw):
                if maps[image, i, j] > best_value:  # strict: first maximum in row-major order
                    best, best_value = (i, j), maps[image, i, j]

        def overlaps(i: int, j: int, image: int = image) -> bool:
            rows = range(i * stride[0], (i + 1) * stride[0])
            cols = range(j * stride[1], (j + 1) * stride[1])
            return any(masks[image, y, x] for y in rows for x in cols)

        hits.append(overlaps(*best))
        chances.append(sum(overlaps(i, j) for i in range(gh) for j in range(gw)) / (gh * gw))
    return hits, chances


# ---------------------------------------------------------------- mean attention distance


@pytest.mark.parametrize("key", list(ARCHS))
@pytest.mark.parametrize("mode", ["paper", "renormalised"])
def test_mean_attention_distance_matches_reference(key: str, mode: str) -> None:
    layout, attentions = _captured(key)
    arch = ARCHS[key]
    result = mean_attention_distance(attentions, layout, mode)
    per_image = reference_mean_distance(_numpy_layers(attentions), arch.num_prefix_tokens, arch.grid, arch.stride, mode)
    np.testing.assert_allclose(result.per_image.numpy(), per_image, rtol=1e-5)  # _image_distance: about 2e-6
    np.testing.assert_allclose(result.pixels.numpy(), per_image.mean(axis=1), rtol=1e-5)
    # The spread is a difference of per-image values, so it carries their absolute error: float32 attention is
    # summed in its own precision (relative error about 2e-6, see _image_distance). Hold the spread to 1e-5 of
    # the largest distance, a ten-thousandth of a pixel at ViT scale.
    np.testing.assert_allclose(
        result.std.numpy(), per_image.std(axis=1), rtol=1e-5, atol=1e-5 * float(np.abs(per_image).max())
    )
    np.testing.assert_allclose(result.fraction.numpy(), per_image.mean(axis=1) / arch.img_size[1], rtol=1e-5)
    assert result.num_images == 2 and result.mode == mode


@pytest.mark.parametrize("mode", ["paper", "renormalised"])
def test_distance_streams_over_batches_and_through_capture(mode: str) -> None:
    model, key = _model("deit_distilled"), "deit_distilled"
    layout, attentions = _captured(key)
    whole = mean_attention_distance(attentions, layout, mode)
    accumulator = DistanceAccumulator(layout, mode)
    images = _images(key)
    capture_attention(model, images[:1], accumulator, with_logits=False)
    capture_attention(model, images[1:], accumulator, with_logits=False)
    streamed = accumulator.result()
    assert streamed.num_images == 2
    torch.testing.assert_close(streamed.pixels, whole.pixels, rtol=1e-5, atol=0)
    # the spread carries the per-image values' absolute error (see the reference test above)
    torch.testing.assert_close(streamed.std, whole.std, rtol=1e-4, atol=1e-5 * float(whole.pixels.max()))


def test_distance_accumulator_takes_batches_of_any_size_and_precision() -> None:
    """Batches of different sizes and precisions add up (2 images, then 1, then bf16 attention in float32)."""
    key = "registers_gap"
    arch = ARCHS[key]
    layout, attentions = _captured(key)
    accumulator = DistanceAccumulator(layout, "paper")
    for part in (slice(0, 2), slice(0, 1)):
        for layer_index, attn in enumerate(attentions):
            accumulator.consume(layer_index, attn[part])
    halves = [attn.to(torch.bfloat16) for attn in attentions]
    for layer_index, attn in enumerate(halves):
        accumulator.consume(layer_index, attn[1:])
    got = accumulator.result().per_image.numpy()  # (L, 4, H)
    full = reference_mean_distance(_numpy_layers(attentions), arch.num_prefix_tokens, arch.grid, arch.stride, "paper")
    half = reference_mean_distance(
        _numpy_layers([attn.float() for attn in halves]), arch.num_prefix_tokens, arch.grid, arch.stride, "paper"
    )
    np.testing.assert_allclose(got[:, :2], full, rtol=1e-5)
    np.testing.assert_allclose(got[:, 2:3], full[:, :1], rtol=1e-5)
    np.testing.assert_allclose(got[:, 3:], half[:, 1:], rtol=1e-5)  # bf16 values, summed in float32


def _layout(grid: tuple[int, int], stride: tuple[int, int], prefix: int, has_class_token: bool) -> TokenLayout:
    return TokenLayout(
        img_size=(grid[0] * stride[0], grid[1] * stride[1]),
        grid=grid,
        stride=stride,
        num_prefix_tokens=prefix,
        has_class_token=has_class_token,
        has_dist_token=False,
        num_reg_tokens=0 if has_class_token else prefix,
    )


def test_identity_attention_over_patches_is_zero_pixels() -> None:
    layout = _layout((5, 3), (16, 8), prefix=1, has_class_token=True)
    attn = torch.eye(layout.num_tokens).expand(2, 3, -1, -1)
    for mode in ("paper", "renormalised"):
        result = mean_attention_distance([attn], layout, mode)
        assert torch.equal(result.pixels, torch.zeros(1, 3, dtype=torch.float64))


def test_uniform_attention_over_14x14_at_stride_16_is_about_116_5_pixels() -> None:
    layout = _layout((14, 14), (16, 16), prefix=0, has_class_token=False)
    attn = torch.full((1, 2, 196, 196), 1 / 196, dtype=torch.float64)
    centres = [((i + 0.5) * 16, (j + 0.5) * 16) for i in range(14) for j in range(14)]  # pixel centres
    closed = sum(math.dist(a, b) for a in centres for b in centres) / 196**2
    result = mean_attention_distance([attn], layout, "paper")
    assert result.pixels[0, 0].item() == pytest.approx(closed, rel=1e-12)
    assert closed == pytest.approx(116.5, abs=0.05)  # the value docs/design.md quotes
    assert result.fraction[0, 1].item() == pytest.approx(closed / 224, rel=1e-12)


def test_paper_and_renormalised_differ_by_the_row_sums() -> None:
    layout = _layout((4, 6), (16, 16), prefix=2, has_class_token=True)
    generator = torch.Generator().manual_seed(3)
    attn = torch.randn(2, 3, layout.num_tokens, layout.num_tokens, generator=generator, dtype=torch.float64)
    attn = (attn * 2).softmax(dim=-1)
    paper = query_attention_distance(attn, layout, "paper")
    renormalised = query_attention_distance(attn, layout, "renormalised")
    row_sums = attn[:, :, 2:, 2:].sum(dim=-1)  # patch-column mass of every patch query
    torch.testing.assert_close(paper, row_sums * renormalised, rtol=1e-12, atol=0)
    assert bool((renormalised > paper).all())  # prefix mass makes the paper's numbers smaller


def test_distance_spread_over_images_is_the_population_std() -> None:
    layout = _layout((14, 14), (16, 16), prefix=0, has_class_token=False)
    identity = torch.eye(196, dtype=torch.float64)[None, None]
    uniform = torch.full((1, 1, 196, 196), 1 / 196, dtype=torch.float64)
    result = mean_attention_distance([torch.cat([identity, uniform])], layout, "paper")
    far = reference_mean_distance([uniform.numpy()], 0, (14, 14), (16, 16), "paper")[0, 0, 0]
    assert result.pixels.item() == pytest.approx(far / 2, rel=1e-12)
    assert result.std.item() == pytest.approx(far / 2, rel=1e-12)


def test_bad_distance_mode_is_a_user_error() -> None:
    layout = _layout((2, 2), (16, 16), prefix=0, has_class_token=False)
    with pytest.raises(VitvizError, match="distance mode"):
        DistanceAccumulator(layout, "renormalized-typo")


# ---------------------------------------------------------------- attention rollout

ROLLOUT_OPTIONS = [("mean", 0.0, 0), ("max", 0.9, 0), ("min", 0.5, 1), ("mean", 0.9, 1)]


@pytest.mark.parametrize("key", list(ARCHS))
@pytest.mark.parametrize(("head_fusion", "discard_ratio", "start_layer"), ROLLOUT_OPTIONS)
def test_rollout_matches_reference(key: str, head_fusion: str, discard_ratio: float, start_layer: int) -> None:
    layout, attentions = _captured(key)
    arch = ARCHS[key]
    got = attention_rollout(
        attentions, layout, head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer
    )
    num_tokens = layout.num_tokens
    discard_count = math.floor(discard_ratio * num_tokens * num_tokens + 1e-9)
    want = reference_rollout(
        _numpy_layers(attentions),
        arch.num_prefix_tokens,
        arch.has_class_token,
        arch.grid,
        head_fusion,
        discard_count,
        start_layer,
    )
    assert got.shape == (2, *arch.grid)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-12)


def test_streaming_rollout_through_capture_equals_rollout_of_kept_attention() -> None:
    key = "registers_gap"
    layout, attentions = _captured(key)
    model, images = _model(key), _images(key)
    expected = attention_rollout(attentions, layout, head_fusion="max", discard_ratio=0.5)
    streaming = RolloutAccumulator(layout, head_fusion="max", discard_ratio=0.5)
    capture_attention(model, images, streaming)
    torch.testing.assert_close(streaming.result(), expected, rtol=1e-10, atol=0)
    # image by image through one accumulator: the maps come back in order
    per_image = RolloutAccumulator(layout, head_fusion="max", discard_ratio=0.5)
    for index in range(2):
        capture_attention(model, images[index : index + 1], per_image)
    torch.testing.assert_close(per_image.result(), expected, rtol=1e-5, atol=1e-12)


def test_rollout_of_identity_attention() -> None:
    with_class = _layout((3, 4), (16, 16), prefix=2, has_class_token=True)
    attn = torch.eye(with_class.num_tokens).expand(1, 2, -1, -1)
    assert torch.equal(attention_rollout([attn, attn], with_class)[0], torch.zeros(3, 4, dtype=torch.float64))
    without_class = _layout((3, 4), (16, 16), prefix=1, has_class_token=False)
    attn = torch.eye(without_class.num_tokens).expand(1, 2, -1, -1)
    torch.testing.assert_close(
        attention_rollout([attn], without_class)[0], torch.full((3, 4), 1 / 12, dtype=torch.float64)
    )


def test_discard_keeps_entry_0_0_and_counts_exactly() -> None:
    # No class token: the map averages every patch row, so any discarded patch-row entry shows.
    layout = _layout((3, 3), (16, 16), prefix=1, has_class_token=False)  # N = 10
    generator = torch.Generator().manual_seed(5)
    attn = torch.rand(1, 1, 10, 10, generator=generator, dtype=torch.float64) + 0.01
    attn[0, 0, 0, 0] = 0.0001  # (0, 0) is the smallest entry: always among the discarded, always kept
    attn = attn / attn.sum(-1, keepdim=True)
    layers = _numpy_layers([attn])
    # floor(0.47 * 10 * 10) = 47 exactly ((0, 0) kept, 46 zeroed), though 0.47 * 10 * 10 < 47 in floats
    got = attention_rollout([attn], layout, discard_ratio=0.47)
    want = reference_rollout(layers, 1, False, (3, 3), "mean", 47, 0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    off_by_one = reference_rollout(layers, 1, False, (3, 3), "mean", 46, 0)
    assert not np.allclose(want, off_by_one, rtol=1e-9, atol=0)
    # a ratio that selects only (0, 0) changes nothing
    np.testing.assert_allclose(
        attention_rollout([attn], layout, discard_ratio=0.01).numpy(),
        reference_rollout(layers, 1, False, (3, 3), "mean", 0, 0),
        rtol=1e-12,
    )


def test_rollout_options_are_checked() -> None:
    layout = _layout((2, 2), (16, 16), prefix=1, has_class_token=True)
    with pytest.raises(VitvizError, match="head fusion"):
        RolloutAccumulator(layout, head_fusion="median")
    with pytest.raises(VitvizError, match="discard ratio"):
        RolloutAccumulator(layout, discard_ratio=1.5)
    attn = torch.full((1, 1, 5, 5), 0.2)
    with pytest.raises(VitvizError, match="start layer"):
        attention_rollout([attn, attn], layout, start_layer=2)


def test_query_attention_rows_as_patch_maps() -> None:
    key = "deit_distilled"
    layout, attentions = _captured(key)
    rows = QueryAttention(0)
    capture_attention(_model(key), _images(key), rows, with_logits=False)
    maps = patch_grid(rows.result(), layout)  # [L, B, H, gh, gw]
    assert maps.shape == (4, 2, 3, 14, 14)
    for layer in (0, 3):
        for head in range(3):
            expected = attentions[layer][1, head, 0, 2:].reshape(14, 14)
            assert torch.equal(maps[layer, 1, head], expected)


# ---------------------------------------------------------------- gradient-weighted rollout


@pytest.mark.parametrize("key", ["deit_distilled", "registers_gap", "hybrid", "non_square"])
def test_gradient_rollout_matches_reference(key: str) -> None:
    arch = ARCHS[key]
    model = _model(key)
    captured = attention_gradients(model, _images(key))
    layout = token_layout(model)
    got = gradient_rollout(captured.attentions, captured.gradients, layout)
    want = reference_gradient_rollout(
        _numpy_layers(captured.attentions),
        _numpy_layers(captured.gradients),
        arch.num_prefix_tokens,
        arch.has_class_token,
        arch.grid,
    )
    assert got.shape == (2, *arch.grid)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-12)
    assert float(np.abs(want - (0 if arch.has_class_token else 1 / np.prod(arch.grid))).max()) > 0  # not trivial


def test_gradient_rollout_with_zero_gradients_is_the_identity_readout() -> None:
    layout = _layout((2, 3), (16, 16), prefix=1, has_class_token=False)
    attn = torch.full((2, 2, 7, 7), 1 / 7)
    got = gradient_rollout([attn, attn], [torch.zeros_like(attn)] * 2, layout)
    torch.testing.assert_close(got, torch.full((2, 2, 3), 1 / 6, dtype=torch.float64))


# ---------------------------------------------------------------- pointing game


@pytest.mark.parametrize(
    ("grid", "stride", "image_size"), [((7, 7), (32, 32), (224, 224)), ((6, 4), (16, 16), (96, 70))]
)
def test_pointing_game_matches_reference(grid: tuple, stride: tuple, image_size: tuple) -> None:
    generator = torch.Generator().manual_seed(11)
    batch = 6
    maps = torch.rand(batch, *grid, generator=generator, dtype=torch.float64)
    maps[0] = 1.0  # all tied: the first patch counts
    masks = torch.zeros(batch, *image_size, dtype=torch.bool)
    for image in range(1, batch):  # a random rectangle per image; image 0 has an empty mask
        top = int(torch.randint(0, image_size[0] - 10, (1,), generator=generator))
        left = int(torch.randint(0, image_size[1] - 10, (1,), generator=generator))
        height = int(torch.randint(1, image_size[0] - top, (1,), generator=generator))
        width = int(torch.randint(1, image_size[1] - left, (1,), generator=generator))
        masks[image, top : top + height, left : left + width] = True
    masks[2, :, :] = False
    masks[2, 0, stride[1]] = True  # one pixel in patch (0, 1)
    maps[2, 0, 1] = 5.0  # pointed at exactly: a hit
    result = pointing_game(maps, masks, stride)
    hits, chances = reference_pointing_game(maps.numpy(), masks.numpy(), stride)
    assert result.hits.tolist() == hits
    np.testing.assert_allclose(result.random_chance.numpy(), chances, rtol=1e-12)
    assert hits[2] and not hits[0]
    assert chances[2] == pytest.approx(1 / (grid[0] * grid[1]))
    assert result.hit_rate == pytest.approx(sum(hits) / batch)
    assert result.random_rate == pytest.approx(sum(chances) / batch)


# --- precision at 1,000+ tokens ------------------------------------------------------------------------


@functools.cache
def _many_tokens() -> tuple[TokenLayout, list[torch.Tensor]]:
    """A tiny-width timm ViT at 128 px with 4 px patches: 32x32 patches + class token = 1,025 tokens, peaky."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=128, patch_size=4, embed_dim=16, num_heads=2, depth=2
    ).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.embed_dim].mul_(30.0)
    layout = token_layout(model)
    keep = KeepAllAttention()
    capture_attention(model, torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)), [keep])
    return layout, keep.result()


def test_distance_and_rollout_hold_1e_5_of_float64_at_1025_tokens() -> None:
    layout, attentions = _many_tokens()
    assert layout.num_tokens == 1025 and attentions[0].dtype == torch.float32
    assert max(float(a.max()) for a in attentions) > 0.5  # peaky: a wrong weighting would show
    layers = _numpy_layers(attentions)  # float64 copies of the same float32 maps
    want = reference_mean_distance(layers, layout.num_prefix_tokens, layout.grid, layout.stride, "paper")
    got = mean_attention_distance(attentions, layout, "paper").per_image.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    want_maps = reference_rollout(layers, layout.num_prefix_tokens, True, layout.grid, "mean", 0, 0)
    got_maps = attention_rollout(attentions, layout).numpy()
    np.testing.assert_allclose(got_maps, want_maps, rtol=1e-5, atol=1e-12)
