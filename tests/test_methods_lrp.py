"""The ``attnlrp`` map method (vitviz.methods_lrp): lxt's rules re-run the model exactly, relevance is conserved
except what the biases and the softmax absorb (every rule's loss measured, float64), the map is the patch tokens'
relevance, the model is left as it was, and models it does not cover get one line."""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path

import lxt.explicit.functional as lf
import lxt.explicit.rules as lr
import pytest
import timm
import torch
from torch import nn

from tests.test_hf import _save
from tests.test_methods_gradcam import _bundled, _images, _timm_registers
from vitviz.capture import KeepAllAttention, capture_attention
from vitviz.errors import VitvizError
from vitviz.faithfulness import FaithfulnessOptions, explanation_maps, run_faithfulness
from vitviz.methods import get_method
from vitviz.methods_lrp import input_tokens, lrp_logits, token_relevance
from vitviz.models import load_model
from vitviz.tokens import token_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RULES = ("linear_epsilon", "layer_norm", "softmax", "matmul", "add2", "mean", "mul2")
CONSERVING = ("matmul", "add2", "mean", "mul2", "identity")  # no bias: what comes in goes out


def _layer_scale() -> nn.Module:
    """A class token, LayerScale on both branches, peaky attention, non-zero biases."""
    torch.manual_seed(1)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=4, init_values=0.5
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
            if name.endswith("attn.qkv.weight"):
                parameter[: 2 * parameter.shape[1]].mul_(4.0)
    return model.eval()


BUILDS = {"bundled": _bundled, "timm-registers": _timm_registers, "timm-layerscale": _layer_scale}


class _Probe(torch.autograd.Function):
    """Identity forward; on the way back, adds the relevance passing through to ``sums[key]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sums: dict, key: str) -> torch.Tensor:
        ctx.sums, ctx.key = sums, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):
        ctx.sums[ctx.key] = (
            ctx.sums[ctx.key] + relevance.to(torch.float64).sum(dim=tuple(range(1, relevance.dim()))).cpu()
        )
        return relevance, None, None


def _probed(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Wrap every lxt rule the method uses: sums["<rule>"] = relevance lost in it (out minus in), per image."""
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))

    def wrap(rule, name: str, tensor_args: int):
        def probed(*args, **kwargs):
            args = list(args)
            for i in range(tensor_args):
                if isinstance(args[i], torch.Tensor) and args[i].requires_grad:
                    args[i] = _Probe.apply(args[i], sums, f"{name}.in")
            return _Probe.apply(rule(*args, **kwargs), sums, f"{name}.out")

        return probed

    for name in RULES:
        monkeypatch.setattr(lf, name, wrap(getattr(lf, name), name, 2 if name in ("matmul", "add2", "mul2") else 1))
    original = lr.identity
    monkeypatch.setattr(lr, "identity", lambda fn, x: wrap(lambda t: original(fn, t), "identity", 1)(x))
    return sums


@pytest.mark.parametrize("key", list(BUILDS))
def test_the_rules_rerun_the_model_exactly(key: str) -> None:
    model = BUILDS[key]()
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(lrp_logits(model, input_tokens(model, images)), model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["bundled", "timm-registers"])
@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no-biases"])
def test_relevance_is_conserved_but_for_biases_and_softmax(
    key: str, biases: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tolerance: float64 rounding (1e-9 of the logit) once every absorber is counted. The relevance over the input
    equals the target logit minus what the rules lose; only the epsilon rule of a layer with a bias (linear,
    LayerNorm) and the softmax's Taylor decomposition (its bias term) lose more than rounding; with every bias 0 the
    linear layers lose only what lxt's stabiliser (z + 1e-6 in the denominator) takes, below 1e-4 of the logit, and
    the rest of the gap is the softmax's."""
    model = copy.deepcopy(BUILDS[key]()).double()
    if not biases:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear | nn.LayerNorm) and module.bias is not None:
                    module.bias.zero_()
    images = _images().double()
    targets = torch.tensor([0, 3, 1])
    sums = _probed(monkeypatch)
    relevance, logits = token_relevance(model, images, targets)
    lost = {name: sums[f"{name}.out"] - sums[f"{name}.in"] for name in (*RULES, "identity")}
    total = relevance.sum(dim=(1, 2)).to(torch.float64)
    scale = float(logits.abs().max())
    torch.testing.assert_close(total + sum(lost.values()), logits, rtol=0, atol=1e-9 * scale)
    for name in CONSERVING:
        assert float(lost[name].abs().max()) < 1e-6 * scale, name
    assert float(lost["softmax"].abs().max()) > 1e-3 * scale  # AttnLRP's softmax rule does absorb
    if not biases:
        for name in ("linear_epsilon", "layer_norm"):
            assert float(lost[name].abs().max()) < 1e-4 * scale, name
        torch.testing.assert_close(total, logits - lost["softmax"], rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("key", ["bundled", "timm-registers"])
def test_the_map_is_the_patch_tokens_relevance(key: str) -> None:
    model = BUILDS[key]()
    images, targets = _images(), torch.tensor([2, 0, 1])
    layout = token_layout(model)
    relevance, _ = token_relevance(model, images, targets)
    got = explanation_maps(model, images, "attnlrp", targets, batch_size=2)
    gh, gw = layout.grid
    tiny = 1e-5 * float(got.abs().max())  # float32, batches of 2 against one batch of 3
    for b in range(3):
        for p in range(gh * gw):
            want = float(relevance[b, layout.num_prefix_tokens + p].to(torch.float64).sum())
            assert float(got[b, p // gw, p % gw]) == pytest.approx(want, rel=1e-5, abs=tiny)


def test_the_model_is_not_patched_and_capture_still_works() -> None:
    model = _bundled()
    images = _images(2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    forwards = {cls: cls.forward for cls in (nn.LayerNorm, nn.Linear, nn.GELU, nn.MultiheadAttention)}
    with torch.no_grad():
        logits = model(images)
    keep = KeepAllAttention()
    capture_attention(model, images, keep, with_logits=False)
    explanation_maps(model, images, "attnlrp", torch.tensor([0, 1]))
    assert all(cls.forward is forward for cls, forward in forwards.items())
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(images), logits)
    again = KeepAllAttention()
    capture_attention(model, images, again, with_logits=False)
    assert all(torch.equal(a, b) for a, b in zip(keep.result(), again.result()))


def test_attnlrp_runs_through_the_faithfulness_protocol() -> None:
    result = run_faithfulness(
        _layer_scale(), _images(2), ["a", "b"], FaithfulnessOptions(methods=("attnlrp", "grad-cam"), steps=4)
    )
    assert list(result.methods) == ["attnlrp", "grad-cam"]
    assert all(c.map.shape == (4, 4) for m in result.methods.values() for c in m.per_image)


def test_models_without_rules_get_one_line(tmp_path: Path) -> None:
    method = get_method("attnlrp")
    _save("vit", tmp_path)
    hf = load_model(f"hf:{tmp_path}")
    cases = {"HFVisionTransformer": hf.model}
    pooled = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=3, global_pool="map"
    )
    cases["'map'"] = pooled.eval()
    gated = _timm_registers()
    gated.blocks[1].mlp = timm.layers.SwiGLU(192, 384)
    cases["blocks.1.mlp is a SwiGLU"] = gated.eval()
    distilled = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=3
    )
    cases["VisionTransformerDistilled"] = distilled.eval()
    for needle, model in cases.items():
        reason = method.not_applicable(model)
        assert reason is not None and "\n" not in reason and needle in reason, (needle, reason)
        with pytest.raises(VitvizError, match="attnlrp"):
            explanation_maps(model, _images(1), "attnlrp", torch.zeros(1, dtype=torch.long))
    assert method.not_applicable(hf) is not None  # a LoadedModel too
