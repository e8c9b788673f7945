"""The capture's view of a plain model (vitviz/capture/view.py): the maps of the hooks and function mode, bit for
bit, with neither, on every family it takes; the model untouched; the model's own hooks still fired."""

from __future__ import annotations

import contextlib
import functools
import gc
import weakref

import pytest
import timm
import torch
from torch import nn

from vitviz.capture import KeepAllAttention, attention_maps, capture_attention
from vitviz.capture import api as capture_api
from vitviz.capture.core import CaptureSession
from vitviz.capture.readers import attention_sites
from vitviz.capture.view import attention_view

# Every plain forward the view answers: timm Attention (with registers, qk_norm), EvaAttention with rope,
# AttentionRope, BEiT's attention (its bias as a float mask), RelPosAttention (class-token padding).
FAMILIES = {
    "vit_registers_qk_norm": ("vit_base_patch16_reg4_gap_256", dict(img_size=64, qk_norm=True)),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56)),
    "rope": ("vit_small_patch16_rope_224", dict(img_size=64)),
    "beit": ("beit_base_patch16_224", dict(img_size=64)),
    "relpos_cls": ("vit_relpos_medium_patch16_cls_224", dict(img_size=64)),
}


@functools.cache
def _model(key: str) -> nn.Module:
    name, overrides = FAMILIES[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, embed_dim=32, depth=2, num_heads=2, **overrides)
    with torch.no_grad():  # peaky maps (q and k scaled): a wrong layer or token cannot hide in a near-uniform one
        for block in model.blocks:
            attn = block.attn
            if getattr(attn, "qkv", None) is not None:
                attn.qkv.weight[: 2 * attn.qkv.in_features].mul_(20.0)
            for name in ("q_proj", "k_proj"):
                if getattr(attn, name, None) is not None:
                    getattr(attn, name).weight.mul_(20.0)
            for name in ("q_norm", "k_norm"):
                if getattr(getattr(attn, name, None), "weight", None) is not None:
                    getattr(attn, name).weight.mul_(4.0)
    return model.eval()


def _images(model: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(3))


def _through_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture_api, "attention_view", lambda *_args: contextlib.nullcontext())


@pytest.mark.parametrize("key", list(FAMILIES))
def test_the_view_gives_the_function_modes_maps_and_logits_without_hooks(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(key)
    images = _images(model)
    sites = attention_sites(model)
    with attention_view(model, sites, CaptureSession(sites, lambda *_: None)) as view:
        assert view is not None
    with monkeypatch.context() as patched:
        _through_hooks(patched)
        mode_maps = attention_maps(model, images)
        mode_keep = KeepAllAttention()
        mode_logits = capture_attention(model, images, mode_keep)

    def no_hooks(_session: CaptureSession) -> None:
        raise AssertionError("the view installs no hooks")

    monkeypatch.setattr(CaptureSession, "installed", no_hooks)
    view_maps = attention_maps(model, images)
    view_keep = KeepAllAttention()
    view_logits = capture_attention(model, images, view_keep)
    assert len(view_maps) == len(mode_maps) == len(model.blocks)
    for got, want in zip(view_maps + view_keep.result(), mode_maps + mode_keep.result(), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(view_logits, mode_logits)
    with torch.no_grad():
        torch.testing.assert_close(view_logits, model(images), rtol=1e-5, atol=1e-5)  # the fused forward's
    assert min(float(m.amax(-1).mean()) for m in view_maps) > 0.3  # peaky: the equalities above mean something


def test_the_model_is_untouched_and_its_own_hooks_fire_once() -> None:
    model = _model("eva02")
    modules = [(module, module._modules, dict(module._modules)) for module in model.modules()]
    fired: list[str] = []
    handles = [
        model.blocks[1].register_forward_hook(lambda *_: fired.append("block 1")),
        model.blocks[1].mlp.register_forward_hook(lambda *_: fired.append("block 1 mlp")),
        model.blocks[0].attn.register_forward_pre_hook(lambda *_: fired.append("attention 0")),
        model.norm.register_forward_hook(lambda *_: fired.append("norm")),
    ]
    try:
        capture_attention(model, _images(model), KeepAllAttention())
    finally:
        for handle in handles:
            handle.remove()
    assert fired == ["attention 0", "block 1 mlp", "block 1", "norm"]
    for module, children, before in modules:
        assert module._modules is children and module._modules == before
        assert "forward" not in vars(module)
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


class _BlocksByList(timm.models.vision_transformer.VisionTransformer):
    """Runs its blocks from a plain list rather than through ``self.blocks``: the view cannot reach them."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pos_embed(self.patch_embed(x))
        for block in self.__dict__["block_list"]:
            x = block(x)
        return self.norm(x)


def test_a_forward_the_view_does_not_reach_is_read_with_the_hooks() -> None:
    config = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    torch.manual_seed(0)
    model = _BlocksByList(**config).eval()
    model.__dict__["block_list"] = list(model.blocks)
    images = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model, images)  # the view's forward reaches no attention: read again with the hooks
    reference = timm.models.vision_transformer.VisionTransformer(**config).eval()  # read through the view
    reference.load_state_dict(model.state_dict())
    for got, want in zip(maps, attention_maps(reference, images), strict=True):
        assert torch.equal(got, want)


def test_the_view_and_the_consumers_are_freed_without_the_garbage_collector() -> None:
    """The view's forwards refer to their own modules and to the session: left in place they would keep the
    consumers (and all they hold) alive until a cyclic collection."""
    model = _model("beit")
    keep = KeepAllAttention()
    watched = weakref.ref(keep)
    gc.disable()
    try:
        capture_attention(model, _images(model), keep)
        del keep
        assert watched() is None
    finally:
        gc.enable()


def test_a_bias_is_added_in_place_only_where_the_sum_keeps_the_scores_dtype() -> None:
    """The explicit scores take the bias in place; a bias of another dtype still promotes them as timm's sum does."""
    from timm.layers.attention import maybe_add_mask

    from vitviz.capture.explicit import explicit_probabilities

    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 5, 4, generator=generator) * 3 for _ in range(2))
    for bias in (torch.randn(2, 5, 5, generator=generator), torch.randn(2, 5, 5, generator=generator).double()):
        with torch.no_grad():
            got = explicit_probabilities(q, k, attn_mask=bias)
        want = maybe_add_mask((q * 0.5) @ k.transpose(-2, -1), bias).softmax(-1)  # timm's non-fused path
        assert got.dtype == want.dtype
        # The float32 scores (four products, |q k| up to ~40) may be summed in another order by the two kernels:
        # each logit within 4 eps sum|q_i k_i| ~ 1e-5, so each probability within about 2e-5 of itself.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
