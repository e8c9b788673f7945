"""SAM's windowed attention and differential attention: capture exact against timm's own eager tensors, and
rollout, mean attention distance and gradient rollout equal to slow float64 references written from the
definitions in docs/design.md ("Attention in every timm family").

References: a deep copy of each model with ``fused_attn = False`` on every attention, read where timm's
non-fused path passes its softmax through ``attn_drop``:
- SAM: the windows' probabilities [B * windows * heads, n, n]; the reference grid map puts every (query, key)
  pair of real tokens at its grid position with plain loops over windows and tokens, zero elsewhere.
- differential: the two maps per head [B, 2H, N, N] (heads 2h, 2h + 1) and timm's own ``_compute_lambda()``;
  the reference is S1 - lambda S2 in float64. Its gradient is d logit / d S1: M = S1 - lambda S2 enters the
  forward only through M @ v, so the chain rule through the subtraction gives d/dS1 = d/dM (and
  d/dS2 = -lambda d/dM, checked too).
Weights are peaky (q and k projections rescaled to a standard deviation of 2 / sqrt(width)); SAM's relative
position tables are random (timm starts them at zero) and lambda is set per layer, one layer with lambda > 1
(rows of M sum to 1 - lambda < 0), so a wrong window, bias, head pairing or lambda would show.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from vitviz import pipeline
from vitviz.analysis.distance import DistanceAccumulator, mean_attention_distance
from vitviz.analysis.rollout import RolloutAccumulator, attention_rollout, gradient_rollout
from vitviz.capture import (
    KeepAllAttention,
    attention_gradients,
    attention_maps,
    capture_attention,
    unreadable_reason,
)
from vitviz.errors import VitvizError
from vitviz.models import timm_meta
from vitviz.models.checkpoint import LoadedModel
from vitviz.tokens import token_layout

SMALL = dict(depth=2, embed_dim=64, num_heads=2, img_size=64, num_classes=10)
# A 5 x 4 grid in windows of 3 x 3: padded to 6 x 6, four windows, each holding pad tokens; block 1 is global.
SAM_SMALL = dict(SMALL, depth=3, img_size=(80, 64), window_size=3, global_attn_indexes=(1,))
FAMILIES = {
    "sam_relpos": ("samvit_base_patch16", SAM_SMALL),
    "sam_rope": ("samvit_base_patch16", dict(SAM_SMALL, use_rel_pos=False, use_rope=True)),
    "diff_attention": ("vit_dwee_patch16_reg1_gap_256", SMALL),
    "diff_parallel": ("vit_dpwee_patch16_reg1_gap_256", SMALL),
}
SAM_KEYS = ("sam_relpos", "sam_rope")
DIFF_KEYS = ("diff_attention", "diff_parallel")
LAMBDAS = (1.3, 0.45)  # per layer of the differential models: rows of M sum to -0.3, then 0.55

_PEAKY = ("qkv", "in_proj")


def _set_lambda(module: nn.Module, value: float) -> None:
    """timm's lambda = exp(q1 . k1) - exp(q2 . k2) + lambda_init: set it to `value` through its parameters."""
    first = value - module.lambda_init + 1.0  # exp(q2 . k2) = 1
    for name, entry in (("lambda_q1", 1.0), ("lambda_k1", math.log(first)), ("lambda_q2", 1.0), ("lambda_k2", 0.0)):
        parameter = getattr(module, name)
        parameter.zero_()
        parameter[0] = entry


def _build(name: str, overrides: dict, lambdas: tuple[float, ...] = LAMBDAS) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **overrides).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module_name, module in model.blocks.named_modules():
            if module_name.rsplit(".", 1)[-1] in _PEAKY:
                module.weight.mul_(2.0 / (float(module.weight.std()) * module.weight.shape[1] ** 0.5))
            for table in ("rel_pos_h", "rel_pos_w"):
                if getattr(module, table, None) is not None:
                    getattr(module, table).copy_(torch.randn(getattr(module, table).shape, generator=generator))
        for block, value in zip(model.blocks, lambdas):
            if hasattr(block, "lambda_q1"):  # DiffParallelScalingBlock
                _set_lambda(block, value)
            elif hasattr(getattr(block, "attn", None), "lambda_q1"):  # DiffAttention
                _set_lambda(block.attn, value)
    return model


@functools.cache
def _model(key: str) -> nn.Module:
    return _build(*FAMILIES[key])


def _images(model: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *token_layout(model).img_size, generator=torch.Generator().manual_seed(1))


def _unfused(model: nn.Module) -> nn.Module:
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return copied


def _differential(module: nn.Module) -> nn.Module:
    return module if hasattr(module, "lambda_q1") else module.attn


def _sam_grid(windows: torch.Tensor, batch: int, heads: int, grid: tuple[int, int], window: int) -> torch.Tensor:
    """The reference grid map [B, heads, N, N] float64 from timm's windows [B * windows * heads, n, n]."""
    height, width = grid
    count = height * width
    if window == 0:
        return windows.double().reshape(batch, heads, count, count)
    across = -(-width // window)
    per_image = -(-height // window) * across
    windows = windows.double().reshape(batch, per_image, heads, window * window, window * window)
    out = torch.zeros(batch, heads, count, count, dtype=torch.float64)
    for index in range(per_image):
        top, left = index // across * window, index % across * window
        for q in range(window * window):
            qy, qx = top + q // window, left + q % window
            for k in range(window * window):
                ky, kx = top + k // window, left + k % window
                if qy < height and qx < width and ky < height and kx < width:
                    out[:, :, qy * width + qx, ky * width + kx] = windows[:, index, :, q, k]
    return out


def _reference(
    key: str, images: torch.Tensor, grad: bool = False, dtype: torch.dtype = torch.float32
) -> tuple[list, list, torch.Tensor]:
    """timm's eager maps, as the definitions read them, in float64, with d logit_c / d map (c = prediction); the
    model runs in `dtype` (the images' own)."""
    model = _model(key)
    eager = _unfused(model).to(dtype)
    kept: list[torch.Tensor] = []
    drops = [m for block in eager.blocks for n, m in block.named_modules() if n.rsplit(".", 1)[-1] == "attn_drop"]
    assert len(drops) == len(eager.blocks)
    handles = [drop.register_forward_hook(lambda _m, _a, out: kept.append(out)) for drop in drops]
    try:
        with torch.set_grad_enabled(grad):
            logits = eager(images.clone().requires_grad_(grad))
            raw_grads: list[torch.Tensor] = []
            if grad:
                target = logits.argmax(-1)
                raw_grads = list(torch.autograd.grad(logits.gather(1, target[:, None]).sum(), kept))
    finally:
        for handle in handles:
            handle.remove()
    batch, layout = images.shape[0], token_layout(model)
    maps, grads = [], []
    for layer, (block, probabilities) in enumerate(zip(eager.blocks, kept)):
        probabilities = probabilities.detach()
        if key in SAM_KEYS:
            heads, window = block.attn.num_heads, block.window_size
            maps.append(_sam_grid(probabilities, batch, heads, layout.grid, window))
            if grad:
                grads.append(_sam_grid(raw_grads[layer], batch, heads, layout.grid, window))
        else:
            lam = _differential(block)._compute_lambda().double().detach()
            pairs = probabilities.double().unflatten(1, (-1, 2))  # (B, H, 2, N, N): heads 2h and 2h + 1
            maps.append(pairs[:, :, 0] - lam * pairs[:, :, 1])
            if grad:
                grad_pairs = raw_grads[layer].double().unflatten(1, (-1, 2))
                scale = float(grad_pairs[:, :, 0].abs().max())
                torch.testing.assert_close(grad_pairs[:, :, 1], -lam * grad_pairs[:, :, 0], atol=1e-6 * scale, rtol=0)
                grads.append(grad_pairs[:, :, 0])
    return maps, grads, logits.detach()


# --- slow references written from the definitions --------------------------------------------------------------


def _readout(rollout: torch.Tensor, prefix: int) -> torch.Tensor:
    """No class token in these families: the mean of the patch rows over the patch columns."""
    return rollout[:, prefix:, prefix:].mean(dim=1)


def _rollout_reference(maps: list[torch.Tensor], prefix: int, fusion: str = "mean") -> torch.Tensor:
    batch, _, count, _ = maps[0].shape
    rollout = torch.eye(count, dtype=torch.float64).repeat(batch, 1, 1)
    for attn in maps:
        fused = {"mean": attn.mean(1), "max": attn.amax(1), "min": attn.amin(1)}[fusion].double()
        factor = 0.5 * fused + 0.5 * torch.eye(count, dtype=torch.float64)
        factor = factor / factor.sum(-1, keepdim=True)
        rollout = factor @ rollout
    return _readout(rollout, prefix)


def _gradient_rollout_reference(maps: list[torch.Tensor], grads: list[torch.Tensor], prefix: int) -> torch.Tensor:
    batch, _, count, _ = maps[0].shape
    rollout = torch.eye(count, dtype=torch.float64).repeat(batch, 1, 1)
    for attn, grad in zip(maps, grads):
        rollout = rollout + (grad.double() * attn.double()).clamp(min=0).mean(1) @ rollout
    return _readout(rollout, prefix)


def _distance_reference(maps: list[torch.Tensor], model: nn.Module, mode: str) -> torch.Tensor:
    """[L, H]: per query sum_k w[q, k] * |centre q - centre k| over the patch block (renormalised: divided by
    the row's sum when it is not zero, whatever its sign); mean over queries, then images."""
    layout = token_layout(model)
    (gh, gw), (sh, sw), prefix = layout.grid, layout.stride, layout.num_prefix_tokens
    centres = [((i + 0.5) * sh, (j + 0.5) * sw) for i in range(gh) for j in range(gw)]
    distances = torch.tensor([[math.dist(a, b) for b in centres] for a in centres], dtype=torch.float64)
    table = torch.zeros(len(maps), maps[0].shape[1], dtype=torch.float64)
    for layer, attn in enumerate(maps):
        weights = attn[:, :, prefix:, prefix:].double()
        per_query = (weights * distances).sum(-1)
        if mode == "renormalised":
            sums = weights.sum(-1)
            per_query = torch.where(sums != 0, per_query / torch.where(sums != 0, sums, 1.0), 0.0)
        table[layer] = per_query.mean(-1).mean(0)
    return table


# --- tests ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "non-fused"])
@pytest.mark.parametrize("key", FAMILIES)
def test_capture_equals_timm_eager_maps_and_leaves_the_output_alone(key: str, fused: bool) -> None:
    # In float64 both sides differ only by their own rounding: with logits of magnitude ~50 over three layers,
    # about 1e-12 (float32's unit roundoff, 6e-8, would leave them 1e-5 apart on some kernel paths).
    model = copy.deepcopy(_model(key) if fused else _unfused(_model(key))).double()
    layout = token_layout(model)
    images = _images(model).double()
    want, _, want_logits = _reference(key, images, dtype=torch.float64)
    keep, rollout, distance = KeepAllAttention(), RolloutAccumulator(layout), DistanceAccumulator(layout)
    logits = capture_attention(model, images, [keep, rollout, distance])
    assert len(keep.result()) == len(want) == len(model.blocks)
    for layer, (got, ref) in enumerate(zip(keep.result(), want)):
        assert got.shape == (2, 2, layout.num_tokens, layout.num_tokens)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6, msg=f"layer {layer}")
    assert max(float(a.amax(-1).mean()) for a in want) > 3.0 / layout.num_tokens  # the maps are not uniform
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, model(images), rtol=1e-5, atol=1e-6)  # capture leaves outputs alone
    torch.testing.assert_close(
        rollout.result(), _rollout_reference(want, layout.num_prefix_tokens).reshape(2, *layout.grid)
    )
    torch.testing.assert_close(
        distance.result().pixels, _distance_reference(want, model, "paper"), atol=1e-5, rtol=1e-5
    )


def test_sam_maps_are_the_windows_on_the_grid_without_the_pad_keys() -> None:
    model = copy.deepcopy(_model("sam_relpos")).double()  # float64: the row sums below hold to ~1e-15
    layout = token_layout(model)
    assert (layout.grid, layout.num_prefix_tokens, layout.has_class_token) == ((5, 4), 0, False)
    assert unreadable_reason(model) is None
    images = _images(model).double()
    maps = attention_maps(model, images)
    eager = _unfused(model)
    kept: list[torch.Tensor] = []
    for block in eager.blocks:
        block.attn.attn_drop.register_forward_hook(lambda _m, _a, out: kept.append(out))
    with torch.no_grad():
        eager(images)
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(4), indexing="ij")
    window_of = (rows // 3 * 2 + cols // 3).reshape(-1)  # window (row-major, 2 across) of each grid token
    same_window = window_of[:, None] == window_of[None, :]
    for layer in (0, 2):  # windowed blocks
        assert bool((maps[layer][..., ~same_window] == 0).all())  # zero between windows
        windows = kept[layer].reshape(2, 4, 2, 9, 9)  # (B, window, head, query, key) on the padded 6 x 6 grid
        pad_mass = torch.zeros(2, 2, 20, dtype=torch.float64)
        for index in range(4):
            top, left = index // 2 * 3, index % 2 * 3
            for q in range(9):
                qy, qx = top + q // 3, left + q % 3
                if qy < 5 and qx < 4:
                    pads = [k for k in range(9) if top + k // 3 >= 5 or left + k % 3 >= 4]
                    pad_mass[:, :, qy * 4 + qx] = windows[:, index, :, q, pads].sum(-1)
        # a row sums to 1 minus what its query gives the pad tokens; the top-left window holds none
        torch.testing.assert_close(maps[layer].sum(-1), 1.0 - pad_mass, rtol=0, atol=1e-12)
        assert bool((pad_mass[..., window_of == 0] == 0).all()) and float(pad_mass.max()) > 0.05
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 2, 20, dtype=torch.float64))  # global: rows sum to 1


@pytest.mark.parametrize("key", DIFF_KEYS)
def test_differential_rows_sum_to_one_minus_lambda(key: str) -> None:
    model = _model(key)
    maps = attention_maps(model, _images(model))
    for attn, lam in zip(maps, LAMBDAS):
        torch.testing.assert_close(attn.sum(-1), torch.full(attn.shape[:-1], 1.0 - lam), rtol=0, atol=2e-6)
    assert float(maps[0].min()) < -0.05  # signed: the second map's weight shows


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "non-fused"])
@pytest.mark.parametrize("key", FAMILIES)
def test_gradients_and_gradient_rollout_equal_timm_autograd(key: str, fused: bool) -> None:
    model = _model(key) if fused else _unfused(_model(key))
    layout = token_layout(model)
    images = _images(model)
    want_maps, want_grads, _ = _reference(key, images, grad=True)
    result = attention_gradients(model, images)
    for layer, (a, b, ga, gb) in enumerate(zip(result.attentions, want_maps, result.gradients, want_grads)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=f"attention, layer {layer}")
        scale = float(gb.abs().max())
        assert scale > 0
        torch.testing.assert_close(ga.double(), gb, rtol=1e-4, atol=1e-5 * scale, msg=f"gradient, layer {layer}")
    torch.testing.assert_close(
        gradient_rollout(result.attentions, result.gradients, layout),
        _gradient_rollout_reference(want_maps, want_grads, layout.num_prefix_tokens).reshape(2, *layout.grid),
        rtol=1e-4,
        atol=1e-8,
    )


@pytest.mark.parametrize("key", FAMILIES)
def test_rollout_and_distance_modes_equal_float64_references(key: str) -> None:
    model = _model(key)
    layout = token_layout(model)
    images = _images(model)
    want, _, _ = _reference(key, images)
    got = attention_maps(model, images)
    prefix = layout.num_prefix_tokens
    for fusion in ("mean", "max"):
        torch.testing.assert_close(
            attention_rollout(got, layout, head_fusion=fusion),
            _rollout_reference(want, prefix, fusion).reshape(2, *layout.grid),
            msg=fusion,
        )
    for mode in ("paper", "renormalised"):
        torch.testing.assert_close(
            mean_attention_distance(got, layout, mode).pixels,
            _distance_reference(want, model, mode),
            rtol=1e-5,
            atol=1e-5,
            msg=mode,
        )


def test_signed_distance_reads_the_map_as_it_is() -> None:
    """Differential attention's distance is linear in M = S1 - lambda S2: the first map's distance minus lambda
    times the second's (paper mode), so it is below the first map's alone when the second looks as far."""
    model = _model("diff_attention")
    images = _images(model)
    layout = token_layout(model)
    eager = _unfused(model)
    kept: list[torch.Tensor] = []
    eager.blocks[0].attn.attn_drop.register_forward_hook(lambda _m, _a, out: kept.append(out))
    with torch.no_grad():
        eager(images)
    pairs = kept[0].unflatten(1, (-1, 2))
    first = mean_attention_distance([pairs[:, :, 0]], layout).pixels[0]
    second = mean_attention_distance([pairs[:, :, 1]], layout).pixels[0]
    got = mean_attention_distance(attention_maps(model, images)[:1], layout).pixels[0]
    torch.testing.assert_close(got, first - LAMBDAS[0] * second, rtol=1e-5, atol=1e-5)


def test_rollout_refuses_rows_that_do_not_sum_to_a_positive_number() -> None:
    model = _build(*FAMILIES["diff_attention"], lambdas=(3.0, 0.5))  # mean fusion: rows of A sum to 1 - 3/2
    layout = token_layout(model)
    maps = attention_maps(model, _images(model))
    for discard in (0.0, 0.2):
        with pytest.raises(VitvizError) as caught:
            attention_rollout(maps, layout, discard_ratio=discard)
        assert "\n" not in str(caught.value) and "positive" in str(caught.value)


def _loaded(key: str, **overrides: object) -> LoadedModel:
    name, options = FAMILIES[key]
    model = _build(name, {**options, **overrides})
    return LoadedModel(model=model, meta=timm_meta(name, model), source=f"timm:{name}", content_hash=key)


@pytest.mark.parametrize(("key", "head"), [("sam_relpos", True), ("sam_relpos", False), ("diff_parallel", True)])
def test_every_section_is_computed_or_not_applicable_with_a_reason(key: str, head: bool) -> None:
    loaded = _loaded(key) if head else _loaded(key, num_classes=0)
    layout = token_layout(loaded.model)
    images = _images(loaded.model, batch=3)
    options = pipeline.AnalysisOptions(batch_size=2)
    results = pipeline.image_analyses(loaded, images, pipeline.IMAGE_ANALYSES, options)
    sam = key in SAM_KEYS
    assert isinstance(results.distance, pipeline.DistanceResult)
    assert results.distance.pixels.shape == (len(loaded.model.blocks), 2)
    assert results.rollout_maps is not None and results.rollout_maps.shape == (3, *layout.grid)
    maps = attention_maps(loaded.model, images)
    np.testing.assert_allclose(results.rollout_maps, attention_rollout(maps, layout).numpy(), rtol=1e-6)
    if head:
        assert len(results.gradients) == 3 and results.gradients[0].map.shape == layout.grid
    else:
        assert results.gradients == pipeline.NotApplicable(pipeline.NO_CLASS_LOGITS)
    assert results.features is not None and results.features.projections.shape == (3, *layout.grid, 3)
    assert len(results.head_maps) == 3
    for section in (results.tokens, results.logit_lens):
        if sam:  # the blocks keep a [B, H, W, D] grid
            assert isinstance(section, pipeline.NotApplicable) and section.reason
        else:
            assert not isinstance(section, pipeline.NotApplicable)
    if sam and not head:
        assert results.logit_lens == pipeline.NotApplicable(pipeline.NO_CLASSIFIER_HEAD)
