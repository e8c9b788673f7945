"""Capture on every attention family vitviz reads, exact against timm's own eager attention.

Reference: a deep copy of each model with ``fused_attn = False`` on every attention, whose post-softmax
probabilities (rope applied, relative-position bias added by timm itself) are read where timm passes them
through ``attn_drop``, and whose gradients come from autograd on those tensors. Weights are made peaky (q and
k projections rescaled to a standard deviation of 2 / sqrt(width)) so a wrong token, bias or rope would show.
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from torch import nn

from tests.fakes import OpaqueAttention
from vitviz.analysis.distance import DistanceAccumulator, mean_attention_distance
from vitviz.analysis.rollout import RolloutAccumulator, attention_rollout, gradient_rollout
from vitviz.capture import attention_gradients, attention_modules, capture_attention, unreadable_reason
from vitviz.errors import VitvizError
from vitviz.tokens import token_layout

SMALL = dict(depth=2, embed_dim=64, num_heads=2, img_size=64)

# One or two names per family, at depth 2 and tiny width.
FAMILIES = {
    "eva02_rope_swiglu": ("eva02_tiny_patch14_224", dict(SMALL, img_size=56)),
    "dinov3_rope_registers": ("vit_small_patch16_dinov3", SMALL),
    "rope_vit_registers_gap": ("vit_base_patch16_rope_reg1_gap_256", SMALL),
    "rope_mixed_ape": ("vit_base_patch16_rope_mixed_ape_224", SMALL),
    "beit_relpos": ("beit_base_patch16_224", SMALL),
    "beitv2_shared_relpos": (
        "beitv2_base_patch16_224",
        dict(SMALL, use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
    ),
    "parallel_scaling": ("vit_pwee_patch16_reg1_gap_256", SMALL),
    # any input size: the grid comes from the input size its config names (here a non-square one)
    "naflexvit_registers": (
        "naflexvit_base_patch16_gap",
        dict(depth=2, embed_dim=64, num_heads=2, pretrained_cfg_overlay=dict(input_size=(3, 64, 48))),
    ),
    "naflexvit_class_token": (
        "naflexvit_base_patch16_radio_v3",
        dict(depth=2, embed_dim=64, num_heads=2, pretrained_cfg_overlay=dict(input_size=(3, 48, 80))),
    ),
}

_PEAKY = ("qkv", "q_proj", "k_proj", "in_proj")


@functools.cache
def _model(key: str) -> nn.Module:
    name, overrides = FAMILIES[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **overrides).eval()
    with torch.no_grad():
        for module_name, module in model.blocks.named_modules():
            if module_name.rsplit(".", 1)[-1] in _PEAKY:
                module.weight.mul_(2.0 / (float(module.weight.std()) * module.weight.shape[1] ** 0.5))
    return model


def _images(model: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *token_layout(model).img_size, generator=torch.Generator().manual_seed(1))


def _eager(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """A copy with timm's non-fused path everywhere and each block's attn_drop (where timm passes the
    probabilities), found by name, in block order."""
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    drops = [
        module
        for block in eager.blocks
        for name, module in block.named_modules()
        if name.rsplit(".", 1)[-1] == "attn_drop"
    ]
    assert len(drops) == len(eager.blocks)
    return eager, drops


def _eager_attention(model: nn.Module, images: torch.Tensor, grad: bool = False) -> tuple[list, list, torch.Tensor]:
    """timm's own eager probabilities per layer, and d logit_c / d attn for c = each image's prediction."""
    eager, drops = _eager(model)
    kept: list[torch.Tensor] = []
    handles = [drop.register_forward_hook(lambda _m, _a, out: kept.append(out)) for drop in drops]
    try:
        with torch.set_grad_enabled(grad):
            logits = eager(images.clone().requires_grad_(grad))
            gradients: list[torch.Tensor] = []
            if grad:
                target = logits.argmax(-1)
                gradients = list(torch.autograd.grad(logits.gather(1, target[:, None]).sum(), kept))
    finally:
        for handle in handles:
            handle.remove()
    return [a.detach() for a in kept], [g.detach() for g in gradients], logits.detach()


@pytest.mark.parametrize("key", FAMILIES)
def test_capture_rollout_and_distance_equal_timm_eager(key: str) -> None:
    model = _model(key)
    layout = token_layout(model)
    images = _images(model)
    want, _, want_logits = _eager_attention(model, images)
    assert all(a.shape[-1] == layout.num_tokens for a in want)
    assert max(float(a.amax(-1).mean()) for a in want) > 2.0 / layout.num_tokens  # the maps are not uniform
    rollout = RolloutAccumulator(layout)
    distance = DistanceAccumulator(layout)
    got: list[torch.Tensor] = []

    class Keep:
        def consume(self, layer: int, attn: torch.Tensor) -> None:
            got.append(attn.clone())

        def result(self) -> None:
            return None

    logits = capture_attention(model, images, [rollout, distance, Keep()])
    assert len(got) == len(want) == len(model.blocks)
    for layer, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"layer {layer}")
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, model(images), rtol=1e-5, atol=1e-6)  # capture leaves outputs alone
    torch.testing.assert_close(rollout.result(), attention_rollout(want, layout), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(
        distance.result().pixels, mean_attention_distance(want, layout).pixels, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("key", FAMILIES)
def test_gradients_and_gradient_rollout_equal_timm_eager_autograd(key: str) -> None:
    model = _model(key)
    layout = token_layout(model)
    images = _images(model)
    want_attn, want_grad, _ = _eager_attention(model, images, grad=True)
    result = attention_gradients(model, images)
    for layer, (a, b, ga, gb) in enumerate(zip(result.attentions, want_attn, result.gradients, want_grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"attention, layer {layer}")
        scale = gb.abs().max()
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5 * float(scale), msg=f"gradient, layer {layer}")
    torch.testing.assert_close(
        gradient_rollout(result.attentions, result.gradients, layout),
        gradient_rollout(want_attn, want_grad, layout),
        rtol=1e-4,
        atol=1e-8,
    )


def test_naflexvit_layout_follows_the_input_size() -> None:
    model = _model("naflexvit_class_token")
    layout = token_layout(model)
    assert (layout.img_size, layout.grid, layout.stride) == ((48, 80), (3, 5), (16, 16))
    assert (layout.num_prefix_tokens, layout.has_class_token, layout.num_reg_tokens) == (8, True, 7)
    assert token_layout(model, (96, 32)).grid == (6, 2)
    with torch.no_grad():  # the sequence the model really runs: prefix tokens + grid
        tokens = model.forward_features(torch.zeros(1, 3, 96, 32))
    assert tokens.shape[1] == 8 + 6 * 2


def test_parallel_block_is_its_own_attention_module() -> None:
    model = _model("parallel_scaling")
    assert attention_modules(model) == list(model.blocks)
    assert unreadable_reason(model) is None


@pytest.mark.parametrize("what", ["foreign attention", "block without attention"])
def test_an_unreadable_model_gets_one_line_naming_model_and_attention_class(what: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32).eval()
    if what == "foreign attention":
        model.blocks[1].attn = OpaqueAttention(model.embed_dim)
        expected = "OpaqueAttention"
    else:
        del model.blocks[1].attn
        expected = "Block"
    model.eval()
    images = torch.zeros(1, 3, 32, 32)
    for call in (
        lambda: capture_attention(model, images, [RolloutAccumulator(token_layout(model))]),
        lambda: attention_gradients(model, images),
        lambda: attention_modules(model),
    ):
        with pytest.raises(VitvizError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message
        assert "vit_tiny_patch16_224" in message and expected in message and "block 1" in message
