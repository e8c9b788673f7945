"""Attention capture against timm's own non-fused attention, and the promises made to a shared model.

References: a deep copy of the model with ``fused_attn = False`` read through timm's AttentionExtract
(hooks on ``attn_drop``, i.e. the post-softmax probabilities timm itself computes), and finite differences.
"""

from __future__ import annotations

import copy
import functools
import importlib
import threading
import weakref
from pathlib import Path

import pytest
import timm
import torch
from timm.utils import AttentionExtract
from torch.overrides import _get_current_function_mode_stack

from tests.fakes import OpaqueAttention
from vitviz.analysis.rollout import RolloutAccumulator
from vitviz.capture import (
    KeepAllAttention,
    QueryAttention,
    attention_gradients,
    attention_maps,
    capture_attention,
    readers,
    unreadable_reason,
)
from vitviz.capture.core import Reader
from vitviz.capture.standard import plain_site
from vitviz.errors import VitvizError
from vitviz.tokens import token_layout

# name, timm overrides; covers class token, distillation token, registers without class token, relative
# position bias (per block, shared, with class-token padding), a hybrid stem, a non-square input with qk_norm.
ARCHITECTURES = {
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers_gap": ("vit_base_patch16_reg4_gap_256", dict(embed_dim=64, depth=2, num_heads=2)),
    "relpos": ("vit_relpos_small_patch16_224", dict(embed_dim=64, depth=2, num_heads=2)),
    "relpos_shared": ("vit_srelpos_small_patch16_224", dict(embed_dim=64, depth=2, num_heads=2)),
    "relpos_cls": ("vit_relpos_medium_patch16_cls_224", dict(embed_dim=64, depth=2, num_heads=2)),
    "hybrid": ("vit_tiny_r_s16_p8_224", {}),
    "non_square_qk_norm": ("vit_tiny_patch16_224", dict(img_size=(96, 64), depth=3, qk_norm=True)),
}


@functools.cache
def _model(key: str) -> torch.nn.Module:
    name, overrides = ARCHITECTURES[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **overrides).eval()
    # Random init gives near-uniform attention; sharper weights make the comparisons meaningful.
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(3.0)
    return model


def _images(model: torch.nn.Module, batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *token_layout(model).img_size, generator=generator)


def _timm_non_fused_attention(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    reference = copy.deepcopy(model)
    for block in reference.blocks:
        block.attn.fused_attn = False
    extractor = AttentionExtract(reference, method="hook")
    with torch.no_grad():
        return list(extractor(images).values())


def _hook_count(model: torch.nn.Module) -> int:
    total = 0
    for module in model.modules():
        for hooks in (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._forward_hooks_with_kwargs,
            module._forward_pre_hooks_with_kwargs,
            module._backward_hooks,
            module._backward_pre_hooks,
        ):
            total += len(hooks)
    return total


def _model_state(model: torch.nn.Module) -> dict:
    return {
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "fused": [block.attn.fused_attn for block in model.blocks],
        "hooks": _hook_count(model),
        "modules": [(id(m), id(m._modules)) for m in model.modules()],  # nothing replaced, not even a dict
        "own_forward": [name for name, m in model.named_modules() if "forward" in vars(m)],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = _model_state(model)
    assert after["hooks"] == 0
    for key in ("requires_grad", "training", "fused", "modules", "own_forward"):
        assert after[key] == before[key], key
    assert all(grad is None for grad in after["grads"])
    for name, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][name], tensor), name


@pytest.mark.parametrize("key", list(ARCHITECTURES))
def test_capture_equals_timm_non_fused_attention(key: str) -> None:
    model = _model(key)
    images = _images(model, batch=2)
    layout = token_layout(model)
    expected = _timm_non_fused_attention(model, images)
    keep = KeepAllAttention()
    logits = capture_attention(model, images, keep)
    ours = keep.result()
    assert len(ours) == len(model.blocks) == len(expected)
    for layer, (got, want) in enumerate(zip(ours, expected)):
        assert got.shape == (2, model.blocks[layer].attn.num_heads, layout.num_tokens, layout.num_tokens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"layer {layer}")
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), rtol=1e-5, atol=1e-6)  # capture leaves outputs alone


@pytest.mark.parametrize("key", ["relpos_shared", "deit_distilled"])
def test_capture_of_a_model_with_fused_attention_off(key: str) -> None:
    """Blocks with fused_attn off (some on, some off here) are read where timm passes their probabilities."""
    model = copy.deepcopy(_model(key))
    for block in model.blocks[::2]:
        block.attn.fused_attn = False
    images = _images(model, batch=2)
    expected = _timm_non_fused_attention(model, images)
    ours = attention_maps(model, images)
    assert len(ours) == len(expected) == len(model.blocks)
    for layer, (got, want) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"layer {layer}")
    assert _hook_count(model) == 0


def test_attention_maps_rows_are_probabilities_and_batch_independent() -> None:
    model = _model("deit_distilled")
    images = _images(model, batch=3)
    together = attention_maps(model, images)
    for attn in together:
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]), rtol=1e-5, atol=1e-5)
    for index in range(3):
        alone = attention_maps(model, images[index : index + 1])
        for layer in range(len(together)):
            torch.testing.assert_close(alone[layer][0], together[layer][index], rtol=1e-5, atol=1e-6)


def test_query_attention_is_the_query_row_of_every_layer_and_head() -> None:
    model = _model("registers_gap")
    images = _images(model, batch=2)
    query = 37
    keep, rows = KeepAllAttention(), QueryAttention(query)
    capture_attention(model, images, [keep, rows])
    got = rows.result()
    expected = torch.stack([attn[:, :, query, :] for attn in keep.result()])
    assert got.shape == (len(model.blocks), 2, 2, token_layout(model).num_tokens)
    assert torch.equal(got, expected)
    # a second forward adds images
    capture_attention(model, images[:1], rows)
    assert rows.result().shape[1] == 3
    with pytest.raises(VitvizError, match="query token"):
        capture_attention(model, images, QueryAttention(10_000))


def test_model_unchanged_and_hooks_gone_after_capture() -> None:
    model = _model("relpos_shared")
    model.blocks[0].attn.qkv.weight.requires_grad_(False)  # a mixed pattern must survive as it is
    try:
        before = _model_state(model)
        images = _images(model, batch=2)
        attention_maps(model, images)
        _assert_unchanged(model, before)
        attention_gradients(model, images)
        _assert_unchanged(model, before)
    finally:
        model.blocks[0].attn.qkv.weight.requires_grad_(True)


class _FailingConsumer:
    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        if layer_index == self.fail_at:
            raise KeyError("consumer failed")

    def result(self) -> None:
        return None


def test_hooks_removed_when_a_consumer_raises() -> None:
    model = _model("vit_tiny")
    before = _model_state(model)
    with pytest.raises(KeyError, match="consumer failed"):
        capture_attention(model, _images(model, batch=1), [KeepAllAttention(), _FailingConsumer(fail_at=5)])
    _assert_unchanged(model, before)
    # the model works normally afterwards and a new capture is complete
    assert len(attention_maps(model, _images(model, batch=1))) == 12


@pytest.mark.parametrize("fused", [True, False])
def test_attention_maps_stop_after_the_last_layer_and_leave_no_mode(fused: bool) -> None:
    """`attention_maps` reads nothing after the last layer's attention: the last block's MLP and the final norm do
    not run, the maps are those of a full capture, and no hook or function mode is left behind."""
    model = copy.deepcopy(_model("deit_distilled"))
    for block in model.blocks:
        block.attn.fused_attn = fused
    before = _model_state(model)
    images = _images(model, batch=2)
    keep = KeepAllAttention()
    capture_attention(model, images, keep)  # the whole forward, for reference
    ran = []
    handles = [
        model.blocks[-1].mlp.register_forward_hook(lambda *_: ran.append("last mlp")),
        model.norm.register_forward_hook(lambda *_: ran.append("norm")),
    ]
    try:
        maps = attention_maps(model, images)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == []
    assert len(maps) == len(keep.result()) == len(model.blocks)
    for got, want in zip(maps, keep.result()):
        assert torch.equal(got, want)
    assert _get_current_function_mode_stack() == []
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="with_logits=False"):
        capture_attention(model, images, keep, stop_after_attention=True)


@pytest.mark.parametrize("key", ["vit_tiny", "relpos_cls"])
def test_both_softmax_paths_equal_timm_eager_attention(key: str) -> None:
    """Without autograd the softmax runs in place over the scores; under autograd (attention_gradients) it
    writes a new tensor. Both give timm's own non-fused probabilities, every layer."""
    model = _model(key)
    images = _images(model, batch=2)
    expected = _timm_non_fused_attention(model, images)
    in_place = attention_maps(model, images)
    new_tensor = attention_gradients(model, images, target_class=1).attentions
    assert len(in_place) == len(new_tensor) == len(expected) == len(model.blocks)
    for layer, (a, b, want) in enumerate(zip(in_place, new_tensor, expected, strict=True)):
        torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6, msg=f"in place, layer {layer}")
        torch.testing.assert_close(b, want, rtol=1e-5, atol=1e-6, msg=f"new tensor, layer {layer}")


def test_function_mode_spans_only_the_attention_call() -> None:
    """qkv and proj run as in a plain forward (no torch function mode); the attention call is caught."""
    model = _model("relpos_shared")
    seen: list[tuple[str, int]] = []
    attn = model.blocks[0].attn
    handles = [
        attn.qkv.register_forward_hook(lambda *_: seen.append(("qkv", len(_get_current_function_mode_stack())))),
        attn.proj.register_forward_hook(lambda *_: seen.append(("proj", len(_get_current_function_mode_stack())))),
    ]
    try:
        maps = attention_maps(model, _images(model, batch=1))
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [("qkv", 0), ("proj", 0)]
    assert len(maps) == len(model.blocks) and len(_get_current_function_mode_stack()) == 0


def test_refuses_training_mode_and_unsupported_models() -> None:
    model = copy.deepcopy(_model("non_square_qk_norm")).train()
    with pytest.raises(ValueError, match="eval"):
        attention_maps(model, _images(model, batch=1))
    assert _hook_count(model) == 0 and model.training
    opaque = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    opaque.blocks[1].attn = OpaqueAttention(opaque.embed_dim)  # an attention class capture does not know
    opaque.eval()
    with pytest.raises(VitvizError, match=r"vit_tiny_patch16_224.*block 1 has attention class .*OpaqueAttention"):
        attention_maps(opaque, torch.zeros(1, 3, 64, 64))
    assert _hook_count(opaque) == 0
    resnet = timm.create_model("resnet18", pretrained=False).eval()
    with pytest.raises(VitvizError, match="no transformer blocks"):
        attention_maps(resnet, torch.zeros(1, 3, 64, 64))


class _OwnForwardAttention(timm.layers.Attention):
    """timm's attention with a forward of its own (the same computation): no reader in the declared list takes
    it until a family declares one."""

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return super().forward(*args, **kwargs)


def test_a_new_family_is_one_reader_in_the_declared_list(monkeypatch: pytest.MonkeyPatch) -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = attention_maps(model, images)
    own = copy.deepcopy(model)
    for block in own.blocks:
        block.attn.__class__ = _OwnForwardAttention
    assert "_OwnForwardAttention" in (unreadable_reason(own) or "")

    def own_site(block: torch.nn.Module, model: torch.nn.Module) -> object:
        return plain_site(block.attn) if isinstance(getattr(block, "attn", None), _OwnForwardAttention) else None

    monkeypatch.setattr(readers, "READERS", (*readers.READERS, Reader("own attention", own_site)))
    assert unreadable_reason(own) is None
    for got, want in zip(attention_maps(own, images), expected, strict=True):
        assert torch.equal(got, want)
    assert _hook_count(own) == 0


def test_every_family_module_declares_a_reader_in_the_declared_list() -> None:
    """A family module whose reader is not listed would never be asked; every listed reader is some module's."""
    package = Path(readers.__file__).parent
    core = {"__init__", "api", "consumers", "core", "explicit", "readers", "view"}
    declared = []
    for path in sorted(package.glob("*.py")):
        if path.stem in core:
            continue
        module = importlib.import_module(f"vitviz.capture.{path.stem}")
        found = [value for value in vars(module).values() if isinstance(value, Reader)]
        assert found, f"{path.name} declares no Reader"
        declared.extend(found)
    assert set(declared) == set(readers.READERS) and len(readers.READERS) == len(set(readers.READERS))


class _LiveAttentionTracker:
    """Records, at every layer, the bytes of all attention tensors handed out so far that are still alive."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.live_bytes: list[int] = []

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        self.refs.append(weakref.ref(attn))
        alive = [ref() for ref in self.refs]
        self.live_bytes.append(sum(t.numel() * t.element_size() for t in alive if t is not None))

    def result(self) -> int:
        return max(self.live_bytes)


def _deep_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=96,
        patch_size=4,
        embed_dim=32,
        depth=24,
        num_heads=2,
        num_classes=10,
    ).eval()  # 577 tokens: attention dominates memory


def test_streaming_holds_one_layer_while_keep_all_holds_every_layer() -> None:
    # Counts the attention tensors still alive at each layer; whole-process memory targets live in bench/.
    model = _deep_model()
    layout = token_layout(model)
    images = torch.randn(1, 3, 96, 96)
    layer_bytes = 1 * 2 * layout.num_tokens**2 * 4

    streaming_tracker = _LiveAttentionTracker()
    capture_attention(model, images, [streaming_tracker, RolloutAccumulator(layout)], with_logits=False)
    assert streaming_tracker.live_bytes == [layer_bytes] * 24

    keep_tracker = _LiveAttentionTracker()
    capture_attention(model, images, [keep_tracker, KeepAllAttention()], with_logits=False)
    assert keep_tracker.live_bytes == [layer_bytes * (layer + 1) for layer in range(24)]


def _reference_gradients(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """d logit / d attn from timm's non-fused path, read with tensor hooks on the attn_drop outputs."""
    reference = copy.deepcopy(model)
    saved: list[torch.Tensor] = []
    for block in reference.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: saved.append(out))
    logits = reference(images)
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), saved)
    return list(grads)


@pytest.mark.parametrize("key", ["deit_distilled", "relpos_cls", "non_square_qk_norm"])
def test_gradients_equal_timm_non_fused_autograd(key: str) -> None:
    model = _model(key)
    images = _images(model, batch=2)
    targets = torch.tensor([3, 7])
    result = attention_gradients(model, images, target_class=targets)
    expected = _reference_gradients(model, images, targets)
    assert result.target_class.tolist() == [3, 7]
    for layer, (got, want) in enumerate(zip(result.gradients, expected)):
        scale = want.abs().max()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(scale), msg=f"layer {layer}")
    torch.testing.assert_close(result.attentions[0], attention_maps(model, images)[0], rtol=1e-5, atol=1e-6)


def test_gradients_match_finite_differences_in_float64() -> None:
    torch.manual_seed(0)
    model = (
        timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            num_classes=5,
        )
        .eval()
        .double()
    )
    torch.nn.init.normal_(model.head.weight)  # a non-zero head so that gradients are far from 0
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    result = attention_gradients(model, images)
    target = int(result.target_class[0])
    assert target == int(result.logits.argmax())

    reference = copy.deepcopy(model)
    for block in reference.blocks:
        block.attn.fused_attn = False
    generator = torch.Generator().manual_seed(2)
    step = 1e-6
    for layer in range(2):
        for _ in range(4):
            index = tuple(int(torch.randint(0, size, (1,), generator=generator)) for size in (1, 2, 17, 17))

            def logit_with(delta: float, layer: int = layer, index: tuple[int, ...] = index) -> float:
                def perturb(_module, _inputs, out):
                    out = out.clone()
                    out[index] += delta
                    return out

                handle = reference.blocks[layer].attn.attn_drop.register_forward_hook(perturb)
                try:
                    with torch.no_grad():
                        return float(reference(images)[0, target])
                finally:
                    handle.remove()

            numeric = (logit_with(step) - logit_with(-step)) / (2 * step)
            assert result.gradients[layer][index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_gradients_work_under_no_grad_and_inference_mode_with_frozen_parameters() -> None:
    model = copy.deepcopy(_model("non_square_qk_norm")).requires_grad_(False)
    images = _images(model, batch=1)
    free = attention_gradients(model, images, target_class=2)
    with torch.no_grad():
        under_no_grad = attention_gradients(model, images, target_class=2)
    with torch.inference_mode():
        under_inference = attention_gradients(model, images.clone(), target_class=2)
    for other in (under_no_grad, under_inference):
        for got, want in zip(other.gradients, free.gradients):
            torch.testing.assert_close(got, want)
    assert any(float(g.abs().max()) > 0 for g in free.gradients)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(VitvizError, match="out of range"):
        attention_gradients(model, images, target_class=10)


def test_concurrent_captures_on_one_shared_model_match_single_threaded() -> None:
    model = _model("non_square_qk_norm")
    layout = token_layout(model)
    inputs = [_images(model, batch=1 + index % 3, seed=100 + index) for index in range(8)]

    def work(index: int) -> dict:
        images = inputs[index]
        keep, rollout = KeepAllAttention(), RolloutAccumulator(layout, head_fusion="max")
        logits = capture_attention(model, images, [keep, rollout])
        out = {"logits": logits, "attn": keep.result(), "rollout": rollout.result()}
        with torch.no_grad():
            out["plain"] = model(images)  # a forward without capture, amid other threads' captures
        if index % 2 == 0:
            out["grads"] = attention_gradients(model, images, target_class=index).gradients
        return out

    expected = [work(index) for index in range(8)]
    results: list[list[dict]] = [[] for _ in range(8)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def run(index: int) -> None:
        try:
            barrier.wait()
            for _ in range(4):
                results[index].append(work(index))
        except BaseException as error:  # reported below with the thread's index
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert _hook_count(model) == 0
    for index in range(8):
        for got in results[index]:
            want = expected[index]
            torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got["plain"], want["plain"], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got["rollout"], want["rollout"], rtol=1e-6, atol=1e-9)
            for a, b in zip(got["attn"], want["attn"], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            for a, b in zip(got.get("grads", []), want.get("grads", []), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
