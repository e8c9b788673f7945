"""The ``grad-cam`` map method (vitviz.methods_gradcam) against Grad-CAM written out from its definition: a hook on
the last block's first norm, one autograd gradient per image, loops over channels and patches in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from tests.test_hf import _save
from vitviz.errors import VitvizError
from vitviz.faithfulness import FaithfulnessOptions, explanation_maps, run_faithfulness
from vitviz.methods import BASELINE, get_method
from vitviz.models import load_model
from vitviz.tokens import token_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "checkpoints" / "shapes-default.safetensors"


def _peaky_(model: nn.Module) -> nn.Module:
    """Queries and keys scaled by 4, so the attention is far from uniform."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                parameter[: 2 * parameter.shape[1]].mul_(4.0)
            elif name.endswith(("query.weight", "key.weight")):
                parameter.mul_(4.0)
    return model


def _timm_registers() -> nn.Module:
    """No class token, two registers, average pooling: two prefix tokens that are not a class token."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=5,
        reg_tokens=2,
        class_token=False,
        global_pool="avg",
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # timm starts biases and the head at 0
    return _peaky_(model).eval()


def _bundled() -> nn.Module:
    return _peaky_(load_model(str(CHECKPOINT)).model)


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _reference(model: nn.Module, layer: nn.Module, images: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Grad-CAM from the definition: weights = grid mean of d logit / d activation per channel, map = ReLU(sum)."""
    layout = token_layout(model)
    prefix, (gh, gw) = layout.num_prefix_tokens, layout.grid
    kept: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: kept.append(output))
    maps = torch.zeros(len(targets), gh, gw, dtype=torch.float64)
    try:
        for b, target in enumerate(targets):
            kept.clear()
            logits = model(images[b : b + 1])
            (activation,) = kept
            (gradient,) = torch.autograd.grad(logits[0, target], activation)
            a = activation[0].detach().to(torch.float64)
            g = gradient[0].to(torch.float64)
            channels = a.shape[1]
            weights = [sum(float(g[prefix + p, c]) for p in range(gh * gw)) / (gh * gw) for c in range(channels)]
            for p in range(gh * gw):
                value = sum(weights[c] * float(a[prefix + p, c]) for c in range(channels))
                maps[b, p // gw, p % gw] = max(value, 0.0)
    finally:
        handle.remove()
    return maps


@pytest.mark.parametrize("build", [_bundled, _timm_registers], ids=["bundled", "timm-registers"])
def test_grad_cam_is_the_definition_on_the_patch_tokens(build) -> None:
    model = build()
    images = _images()
    targets = [1, 4, 0]
    got = explanation_maps(model, images, "grad-cam", torch.tensor(targets), batch_size=2)
    want = _reference(model, model.blocks[-1].norm1, images, targets)
    assert got.shape == want.shape == (3, *token_layout(model).grid) and got.dtype == torch.float64
    assert (want > 0).any() and (want == 0).any()  # the ReLU matters on these weights
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    for parameter in model.parameters():
        assert parameter.grad is None  # the package's backward leaves nothing behind


def test_grad_cam_on_a_transformers_deit_drops_both_prefix_tokens(tmp_path: Path) -> None:
    _save("deit", tmp_path)
    model = _peaky_(load_model(f"hf:{tmp_path}").model)
    assert token_layout(model).num_prefix_tokens == 2
    layer = model.blocks[-1].layernorm_before
    images = _images(2)
    got = explanation_maps(model, images, "grad-cam", torch.tensor([2, 0]))
    torch.testing.assert_close(got, _reference(model, layer, images, [2, 0]), rtol=1e-4, atol=1e-7)


def test_grad_cam_is_a_baseline_and_says_where_it_does_not_apply() -> None:
    method = get_method("grad-cam")
    assert method.kind == BASELINE and "baseline" in method.description.lower()
    assert method.not_applicable(_timm_registers()) is None

    class NoNorm(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    model = _timm_registers()
    model.blocks[-1] = NoNorm(model.blocks[-1])
    reason = method.not_applicable(model)
    assert reason is not None and "\n" not in reason and "NoNorm" in reason and "first norm" in reason
    with pytest.raises(VitvizError, match="NoNorm"):
        explanation_maps(model, _images(), "grad-cam", torch.zeros(3, dtype=torch.long))

    headless = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    headless.reset_classifier(0)
    reason = method.not_applicable(headless.eval())
    assert reason is not None and "no classifier head" in reason and "grad-cam" in reason


def test_grad_cam_runs_through_the_faithfulness_protocol() -> None:
    model = _bundled()
    result = run_faithfulness(model, _images(2), ["a", "b"], FaithfulnessOptions(methods=("grad-cam",), steps=4))
    curves = result.methods["grad-cam"].per_image
    assert [c.map.shape for c in curves] == [(8, 8), (8, 8)]
    assert all(0.0 <= c.deletion_auc <= 1.0 and 0.0 <= c.insertion_auc <= 1.0 for c in curves)
