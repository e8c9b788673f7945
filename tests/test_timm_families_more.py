"""CaiT (talking heads, then class attention) and timm's ParallelThingsBlock (several attention branches per block),
read exactly against timm's own eager tensors, and every analysis against slow references written from the
definitions in docs/design.md ("Attention in every timm family").

Reference tensors come from a deep copy of the model with ``fused_attn = False`` on every attention, read with this
file's own hooks where timm's eager path holds them: CaiT's self-attention probabilities as proj_w takes them (and,
independently, recomputed in float64 from the attention's input and weights), CaiT's class attention and every
parallel branch at attn_drop. Weights are made peaky (q and k projections rescaled, CaiT's head-mixing maps near the
identity, layer scales 1) so a wrong token, head or layer would show. Maps agree within rtol 1e-5, atol 1e-6 (the
capture applies the scale inside the product, timm to q first: float32 rounding of large logits).
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import timm
import torch
from torch import nn

from tests.fakes import OpaqueAttention
from vitviz import pipeline
from vitviz.analysis.distance import CLASS_ATTENTION_LAYER, mean_attention_distance
from vitviz.analysis.rollout import attention_rollout, gradient_rollout
from vitviz.capture import (
    KeepAllAttention,
    attention_gradients,
    attention_maps,
    attention_modules,
    capture_attention,
    class_attention_layers,
    unreadable_reason,
)
from vitviz.models import LoadedModel, timm_meta
from vitviz.pipeline import AnalysisOptions, NotApplicable
from vitviz.tokens import token_layout

CAIT_DEPTH, CAIT_CLASS_DEPTH, PARALLEL_DEPTH = 2, 2, 2


def _peaky(module: nn.Module, generator: torch.Generator) -> None:
    """q and k projections rescaled to a standard deviation of 2.5 / sqrt(width) (CaiT's fused qkv: its q and k rows)."""
    with torch.no_grad():
        for name, linear in module.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("q", "k"):
                linear.weight.mul_(2.5 / (float(linear.weight.std()) * linear.weight.shape[1] ** 0.5))
            elif leaf == "qkv":
                rows = 2 * linear.weight.shape[0] // 3
                qk = linear.weight[:rows]
                qk.mul_(2.5 / (float(qk.std()) * linear.weight.shape[1] ** 0.5))
            elif leaf in ("proj_l", "proj_w"):  # talking heads: near the identity, so heads stay distinct
                heads = linear.weight.shape[0]
                linear.weight.copy_(torch.eye(heads) + 0.3 * torch.randn(heads, heads, generator=generator))
                linear.bias.copy_(0.05 * torch.randn(heads, generator=generator))


@functools.cache
def _model(key: str) -> nn.Module:
    torch.manual_seed(0)
    if key == "cait":
        model = timm.create_model(
            "cait_xxs24_224",
            pretrained=False,
            num_classes=10,
            depth=CAIT_DEPTH,
            depth_token_only=CAIT_CLASS_DEPTH,
            embed_dim=64,
            num_heads=4,
            img_size=64,
            init_values=1.0,
        )
    else:
        model = timm.create_model(
            "vit_small_patch16_18x2_224",
            pretrained=False,
            num_classes=10,
            depth=PARALLEL_DEPTH,
            embed_dim=64,
            num_heads=2,
            img_size=64,
        )
    _peaky(model, torch.Generator().manual_seed(3))
    return model.eval()


def _images(model: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *token_layout(model).img_size, generator=torch.Generator().manual_seed(1))


# --- timm's own tensors, and the definitions ---------------------------------------------------------------


def _cait_talking_heads_float64(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(proj_l(q k^T * scale)) over the patches, [B, H, n, n], from the attention's input and weights."""
    x = x.double()
    batch, tokens, width = x.shape
    heads = attn.num_heads
    qkv = x @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    qkv = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    logits = (qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)  # (B, H, n, n)
    mixed = torch.einsum("gh,bhqk->bgqk", attn.proj_l.weight.double(), logits)
    mixed = mixed + attn.proj_l.bias.double()[None, :, None, None]
    return mixed.softmax(dim=-1)


def _timm_eager(model: nn.Module, images: torch.Tensor, grad: bool = False) -> dict:
    """timm's eager tensors of every layer, read with hooks on a copy with fused_attn off: ("read") what each layer's
    attention is (CaiT self-attention: [B, n, n, H] at proj_w's input; class attention [B, H, 1, N]; parallel: each
    branch's [B, H, N, N]); their gradients d logit_c / d tensor (c = each image's prediction) with ``grad``."""
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    read: list[list[torch.Tensor]] = []
    recomputed: list[torch.Tensor] = []
    mixed: list[torch.Tensor] = []
    handles = []

    def keep_output(layer: list, _module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        layer.append(output)

    def keep_input(layer: list, _module: nn.Module, args: tuple) -> None:
        layer.append(args[0])

    for block in [*eager.blocks, *getattr(eager, "blocks_token_only", ())]:
        layer: list[torch.Tensor] = []
        read.append(layer)
        if hasattr(block, "attns"):  # parallel branches, in order
            for branch in block.attns:
                handles.append(branch.attn.attn_drop.register_forward_hook(functools.partial(keep_output, layer)))
        elif hasattr(block.attn, "proj_w"):  # CaiT self-attention: before and after the heads are mixed
            attn = block.attn
            handles.append(attn.proj_w.register_forward_pre_hook(functools.partial(keep_input, layer)))
            handles.append(
                attn.register_forward_pre_hook(
                    lambda _m, args, a=attn: recomputed.append(_cait_talking_heads_float64(a, args[0]))
                )
            )
            handles.append(attn.attn_drop.register_forward_hook(lambda _m, _a, out: mixed.append(out)))
        else:  # CaiT class attention
            handles.append(block.attn.attn_drop.register_forward_hook(functools.partial(keep_output, layer)))
    try:
        with torch.set_grad_enabled(grad):
            logits = eager(images.clone().requires_grad_(grad))
            gradients: list[list[torch.Tensor]] = []
            if grad:
                flat = [t for layer in read for t in layer]
                chosen = logits.gather(1, logits.argmax(-1)[:, None]).sum()
                flat_grads = list(torch.autograd.grad(chosen, flat))
                gradients = [[flat_grads.pop(0).detach() for _ in layer] for layer in read]
    finally:
        for handle in handles:
            handle.remove()
    return {
        "read": [[t.detach() for t in layer] for layer in read],
        "gradients": gradients,
        "recomputed": recomputed,
        "mixed": [t.detach() for t in mixed],
        "logits": logits.detach(),
        "eager": eager,
    }


def _full_map(model: nn.Module, layer: int, tensors: list[torch.Tensor], maps: bool = True) -> torch.Tensor:
    """The definition, written out with loops over tokens: the layer's map over the model's whole sequence.

    Parallel: the branches side by side along the head axis. CaiT self-attention (layer < depth): the class token
    (token 0) is not in the sequence yet, so its row is e_0 and no patch attends to it; patch block = the softmax.
    CaiT class attention: row 0 is the class token's attention over [class, patches]; each patch is its own row.
    For a gradient (maps False) the fixed entries are 0.
    """
    if hasattr(model.blocks[0], "attns"):
        return torch.cat(tensors, dim=1).double()
    (tensor,) = tensors
    fixed = 1.0 if maps else 0.0
    if layer < len(model.blocks):
        patches = tensor.permute(0, 3, 1, 2)  # timm's [B, n, n, H] as proj_w takes it
        batch, heads, n, _ = patches.shape
        full = torch.zeros(batch, heads, n + 1, n + 1, dtype=torch.float64)
        for b in range(batch):
            for h in range(heads):
                full[b, h, 0, 0] = fixed
                for q in range(n):
                    for k in range(n):
                        full[b, h, 1 + q, 1 + k] = float(patches[b, h, q, k])
        return full
    batch, heads, _, tokens = tensor.shape
    full = torch.zeros(batch, heads, tokens, tokens, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for k in range(tokens):
                full[b, h, 0, k] = float(tensor[b, h, 0, k])
            for q in range(1, tokens):
                full[b, h, q, q] = fixed
    return full


def _rollout_reference(maps: list[torch.Tensor], layout) -> torch.Tensor:
    """Abnar & Zuidema with mean head fusion, float64 loops: A = rows normalised (0.5 F + 0.5 I), R = A_L ... A_1,
    map = R[0, p:] (class token)."""
    batch, _, tokens, _ = maps[0].shape
    out = []
    for b in range(batch):
        rollout = torch.eye(tokens, dtype=torch.float64)
        for attn in maps:
            fused = attn[b].double().mean(dim=0)
            factor = torch.zeros(tokens, tokens, dtype=torch.float64)
            for q in range(tokens):
                row = [0.5 * float(fused[q, k]) + (0.5 if q == k else 0.0) for k in range(tokens)]
                total = sum(row)
                for k in range(tokens):
                    factor[q, k] = row[k] / total
            rollout = factor @ rollout
        out.append(rollout[0, layout.num_prefix_tokens :].reshape(layout.grid))
    return torch.stack(out)


def _gradient_rollout_reference(maps: list[torch.Tensor], grads: list[torch.Tensor], layout) -> torch.Tensor:
    """Chefer et al.: R = I, R = R + mean_h (G * A)^+ R per layer in order; map = R[0, p:]."""
    batch, _, tokens, _ = maps[0].shape
    out = []
    for b in range(batch):
        rollout = torch.eye(tokens, dtype=torch.float64)
        for attn, grad in zip(maps, grads):
            weighted = (grad[b].double() * attn[b].double()).clamp(min=0).mean(dim=0)
            rollout = rollout + weighted @ rollout
        out.append(rollout[0, layout.num_prefix_tokens :].reshape(layout.grid))
    return torch.stack(out)


def _distance_reference(maps: list[torch.Tensor], layout, skip: tuple[int, ...]) -> tuple[list[int], torch.Tensor]:
    """Paper mode with loops: per layer with patch queries, head, image: mean over patch queries q of
    sum_k attn[q, k] * |centre_q - centre_k| over patch keys; then the mean over images."""
    centres = layout.patch_centers(torch.float64)
    p, n = layout.num_prefix_tokens, layout.num_patches
    layers, values = [], []
    for layer, attn in enumerate(maps):
        if layer in skip:
            continue
        batch, heads = attn.shape[:2]
        per = torch.zeros(batch, heads, dtype=torch.float64)
        for b in range(batch):
            for h in range(heads):
                total = 0.0
                for q in range(n):
                    for k in range(n):
                        total += float(attn[b, h, p + q, p + k]) * float((centres[q] - centres[k]).norm())
                per[b, h] = total / n
        layers.append(layer)
        values.append(per.mean(dim=0))
    return layers, torch.stack(values)


# --- the tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["cait", "parallel"])
def test_maps_equal_timm_eager_and_the_model_is_untouched(key: str) -> None:
    model = _model(key)
    layout = token_layout(model)
    images = _images(model)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert fused and all(fused)  # fused attention stays on: the capture reads the fused calls
    with torch.no_grad():
        plain = model(images)
    want = _timm_eager(model, images)
    keep = KeepAllAttention()
    logits = capture_attention(model, images, [keep])
    depth = len(model.blocks) + len(getattr(model, "blocks_token_only", ()))
    assert len(keep.result()) == len(want["read"]) == depth == len(attention_modules(model))
    for layer, (got, tensors) in enumerate(zip(keep.result(), want["read"])):
        expected = _full_map(model, layer, tensors)
        assert got.shape == expected.shape and got.shape[-1] == layout.num_tokens
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6, msg=f"layer {layer}")
        torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), rtol=0, atol=1e-5)  # probabilities
    assert max(float(a.amax(-1).mean()) for a in keep.result()) > 3.0 / layout.num_tokens  # peaky, not uniform
    torch.testing.assert_close(logits, want["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-6)  # capture leaves the outputs alone
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused
    assert not any(m.training for m in model.modules())
    if key == "cait":
        assert class_attention_layers(model) == (2, 3)
        heads = model.blocks[0].attn.num_heads
        # The map is the softmax before the heads are mixed: timm's tensor, our float64 recomputation, and what
        # the block multiplies v by (proj_w of it) all agree.
        for layer in range(CAIT_DEPTH):
            softmax = keep.result()[layer][:, :, 1:, 1:]
            torch.testing.assert_close(softmax.double(), want["recomputed"][layer], rtol=0, atol=1e-5)
            proj_w = model.blocks[layer].attn.proj_w
            after = proj_w(softmax.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            torch.testing.assert_close(after, want["mixed"][layer], rtol=1e-5, atol=1e-6)
            assert heads == softmax.shape[1]
    else:
        assert class_attention_layers(model) == ()
        assert keep.result()[0].shape[1] == 2 * model.blocks[0].attns[0].attn.num_heads  # K branches x H heads


@pytest.mark.parametrize("key", ["cait", "parallel"])
def test_rollout_and_distance_equal_the_definitions(key: str) -> None:
    model = _model(key)
    layout = token_layout(model)
    images = _images(model)
    want = _timm_eager(model, images)
    maps = [_full_map(model, layer, tensors) for layer, tensors in enumerate(want["read"])]
    captured = attention_maps(model, images)
    torch.testing.assert_close(
        attention_rollout(captured, layout), _rollout_reference(maps, layout), rtol=1e-5, atol=1e-9
    )
    skip = class_attention_layers(model)
    result = mean_attention_distance(captured, layout, "paper", skip)
    layers, pixels = _distance_reference(maps, layout, skip)
    assert list(result.layers) == layers
    assert result.not_applicable == tuple((layer, CLASS_ATTENTION_LAYER) for layer in skip)
    torch.testing.assert_close(result.pixels, pixels, rtol=1e-5, atol=1e-6)
    if key == "cait":  # the class-attention layers are left out, not reported as zeros
        assert layers == [0, 1] and result.pixels.shape[0] == CAIT_DEPTH
    else:  # branch-major heads: the first H columns are branch 0's own distances
        heads = model.blocks[0].attns[0].attn.num_heads
        _, branch0 = _distance_reference([m[:, :heads] for m in maps], layout, ())
        torch.testing.assert_close(result.pixels[:, :heads], branch0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", ["cait", "parallel"])
def test_gradients_and_gradient_rollout_equal_timm_eager_autograd(key: str) -> None:
    model = _model(key)
    layout = token_layout(model)
    images = _images(model)
    want = _timm_eager(model, images, grad=True)
    maps = [_full_map(model, layer, tensors) for layer, tensors in enumerate(want["read"])]
    grads = [_full_map(model, layer, tensors, maps=False) for layer, tensors in enumerate(want["gradients"])]
    result = attention_gradients(model, images)
    assert len(result.gradients) == len(grads)
    for layer, (a, b, ga, gb) in enumerate(zip(result.attentions, maps, result.gradients, grads)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=f"attention, layer {layer}")
        scale = float(gb.abs().max())
        assert scale > 0, f"layer {layer} has no gradient"
        torch.testing.assert_close(ga.double(), gb, rtol=1e-4, atol=1e-5 * scale, msg=f"gradient, layer {layer}")
    torch.testing.assert_close(
        gradient_rollout(result.attentions, result.gradients, layout),
        _gradient_rollout_reference(maps, grads, layout),
        rtol=1e-4,
        atol=1e-8,
    )


def _loaded(key: str) -> LoadedModel:
    model = _model(key)
    name = "cait_xxs24_224" if key == "cait" else "vit_small_patch16_18x2_224"
    return LoadedModel(model=model, meta=timm_meta(name, model), source=f"timm:{name}", content_hash=key)


@pytest.mark.parametrize("key", ["cait", "parallel"])
def test_every_image_analysis_is_computed_or_not_applicable_with_a_reason(key: str) -> None:
    from vitviz.cli import image_sections

    loaded = _loaded(key)
    model = loaded.model
    layout = token_layout(model)
    assert unreadable_reason(model) is None and pipeline.attention_not_applicable(loaded) is None
    images = _images(model, batch=3)
    options = AnalysisOptions(batch_size=2)
    results = pipeline.image_analyses(loaded, images, pipeline.IMAGE_ANALYSES, options)
    maps = attention_maps(model, images)
    np.testing.assert_allclose(results.rollout_maps, attention_rollout(maps, layout).numpy(), rtol=1e-5, atol=1e-9)
    assert len(results.gradients) == 3 and len(results.top5) == 3
    assert isinstance(results.distance, pipeline.DistanceResult)
    # head maps: the last layer's class-token row (CaiT: the last class-attention layer)
    last = maps[-1][:, :, 0, layout.num_prefix_tokens :].double().reshape(3, -1, *layout.grid)
    got = np.stack([h.attention for h in results.head_maps])  # batches of 2 against one of 3: float32 rounding
    np.testing.assert_allclose(got, last.numpy(), rtol=1e-5, atol=1e-9)
    sections = image_sections(results, [f"im{i}" for i in range(3)])
    card = pipeline.model_card(loaded)
    if key == "cait":
        assert results.distance.layers == (0, 1)
        assert [layer for layer, _ in results.distance.not_applicable_layers] == [2, 3]
        assert sections["distance"]["layers"] == [0, 1]
        assert [d["layer"] for d in sections["distance"]["not_applicable_layers"]] == [2, 3]
        assert all("class-attention" in d["reason"] for d in sections["distance"]["not_applicable_layers"])
        for value in (results.tokens, results.logit_lens):  # the blocks' outputs are the patches alone
            assert isinstance(value, NotApplicable) and "16 tokens" in value.reason
        assert card.num_heads == 4
    else:
        assert results.distance.layers == (0, 1) and not results.distance.not_applicable_layers
        assert "not_applicable_layers" not in sections["distance"]
        assert isinstance(results.tokens, pipeline.TokensResult) and len(results.logit_lens) == 3
        assert card.num_heads == maps[0].shape[1] == 4
    assert np.asarray(sections["distance"]["pixels"]).shape == (2, maps[0].shape[1])
    for name in ("rollout", "gradient_rollout"):
        assert len(sections[name]) == 3
    # the app's disk cache keeps the layers
    again = pipeline.DistanceResult.from_arrays(results.distance.to_arrays())
    assert again.layers == results.distance.layers
    assert again.not_applicable_layers == results.distance.not_applicable_layers
    # a start layer among CaiT's class-attention layers is a layer of the model
    last_layer = len(maps) - 1
    AnalysisOptions(start_layer=last_layer).check_model(loaded, ("rollout",))


@pytest.mark.parametrize("key", ["cait", "parallel"])
def test_an_unknown_attention_in_these_families_is_refused_in_one_line(key: str) -> None:
    from vitviz.errors import VitvizError

    model = copy.deepcopy(_model(key))
    block = model.blocks[1]
    owner = block.attns[1] if key == "parallel" else block
    owner.attn = OpaqueAttention(model.embed_dim)
    model.eval()
    reason = unreadable_reason(model)
    assert reason is not None and "\n" not in reason and "block 1" in reason
    expected = "ParallelThingsBlock" if key == "parallel" else "OpaqueAttention"
    assert expected in reason
    with pytest.raises(VitvizError, match="cannot read the attention"):
        attention_maps(model, _images(model))
