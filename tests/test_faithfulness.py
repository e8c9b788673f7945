"""Deletion and insertion curves, the map methods and the cascading-randomisation sanity check.

The curves are checked against a slow re-computation written here from the protocol (each masked image built
one at a time with Python loops, its own patch ordering by sorted((-value, index)), one forward per image), on
tiny timm ViTs (class token, global average pooling without class token, registers, a non-square grid) and the
bundled checkpoints (8x8 tokens of 4 px, and the hybrid whose stem has stride 4). Geometry in the references is
written down per model, not read from it.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from scipy.stats import spearmanr

from vitviz.analysis.rollout import attention_rollout, gradient_rollout
from vitviz.capture import KeepAllAttention, attention_gradients, capture_attention
from vitviz.errors import VitvizError
from vitviz.faithfulness import (
    METHODS,
    FaithfulnessOptions,
    cascading_randomisation,
    curve_auc,
    deletion_insertion_curves,
    explanation_maps,
    masked_inputs,
    parse_methods,
    patch_order,
    quantised_map,
    randomise_tensor,
    run_faithfulness,
    spearman,
    step_counts,
)
from vitviz.images import load_for_model
from vitviz.methods import ig_schedule
from vitviz.models import load_model
from vitviz.tokens import token_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "assets" / "checkpoints"
SAMPLES = ROOT / "assets" / "samples"

# key: (timm overrides, prefix tokens, has class token, grid, stride, img_size), all written down by hand
TIMM = {
    "cls": (dict(), 1, True, (4, 4), (8, 8), (32, 32)),
    "gap": (dict(class_token=False, global_pool="avg"), 0, False, (4, 4), (8, 8), (32, 32)),
    "registers": (dict(reg_tokens=2, class_token=False, global_pool="avg"), 2, False, (4, 4), (8, 8), (32, 32)),
    "cls_registers": (dict(reg_tokens=3), 4, True, (4, 4), (8, 8), (32, 32)),
    "non_square": (dict(img_size=(32, 24)), 1, True, (4, 3), (8, 8), (32, 24)),
}
BUNDLED = {"shapes-default": ((8, 8), (4, 4)), "shapes-hybrid": ((8, 8), (4, 4))}
NUM_CLASSES = 5


@functools.cache
def _timm(key: str) -> torch.nn.Module:
    overrides = {"img_size": 32, **TIMM[key][0]}
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, patch_size=8, depth=2, num_classes=NUM_CLASSES, **overrides
    ).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(3.0)  # sharper than random init, so maps are not near-uniform
        torch.nn.init.normal_(model.head.weight, std=0.5)  # a head that separates classes
    return model


def _noise(img_size: tuple[int, int], batch: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 3, *img_size, generator=torch.Generator().manual_seed(seed))


@functools.cache
def _bundled(stem: str) -> tuple[torch.nn.Module, torch.Tensor]:
    loaded = load_model(str(CHECKPOINTS / f"{stem}.safetensors"))
    meta = loaded.meta
    images = [
        load_for_model(
            SAMPLES / name, input_size=tuple(meta.input_size), mean=meta.mean, std=meta.std, in_chans=meta.in_chans
        )
        for name in ("circle.png", "cross.png")
    ]
    return loaded.model, torch.stack(images)


# ---------------------------------------------------------------- the slow reference


def reference_curves(
    model: torch.nn.Module,
    image: torch.Tensor,
    relevance: list[list[float]],
    target: int,
    steps: int,
    stride: tuple[int, int],
) -> tuple[list[float], list[float]]:
    """Deletion and insertion curves from the protocol, one masked image and one forward at a time."""
    gh, gw = len(relevance), len(relevance[0])
    n = gh * gw
    values = [relevance[r][c] for r in range(gh) for c in range(gw)]
    low, high = min(values), max(values)
    levels = [round((v - low) / (high - low) * 1_000_000) if high > low else 0 for v in values]
    order = [index for _, index in sorted((-level, index) for index, level in enumerate(levels))]
    sh, sw = stride

    def probability(x: torch.Tensor) -> float:
        with torch.no_grad():
            logits = model(x[None]).to(torch.float64)[0]
        return float(torch.exp(logits[target] - torch.logsumexp(logits, dim=0)))

    deletion, insertion = [], []
    for i in range(steps + 1):
        k = (i * n) // steps
        deleted = image.clone()
        inserted = torch.zeros_like(image)
        for patch in order[:k]:
            r, c = divmod(patch, gw)
            block = (slice(None), slice(r * sh, (r + 1) * sh), slice(c * sw, (c + 1) * sw))
            deleted[block] = 0.0
            inserted[block] = image[block]
        deletion.append(probability(deleted))
        insertion.append(probability(inserted))
    return deletion, insertion


def curve_tolerance(model: torch.nn.Module, image: torch.Tensor) -> float:
    """How far a curve point (and an AUC, a weighted mean of them with weights summing to 1) may differ between
    the batched implementation and the one-forward-at-a-time reference.

    Both run the same float32 model; a batch of 64 and a batch of 1 use different kernels that sum in different
    orders, so the logits agree only to some float32 ulps of their magnitude |z|: measured up to 4 ulps on the
    ViT and 14 on the hybrid, whose convolutional stem adds roundings; 32 ulps leaves a margin of two. The
    softmax then moves a probability by at most half the largest logit change (sum_j |dp_t/dz_j| = 2 p_t (1 -
    p_t) <= 1/2). A patch taken in the wrong order moves a point by far more (1e-3 and up on these models).
    """
    with torch.no_grad():
        magnitude = float(model(torch.stack([image, torch.zeros_like(image)])).abs().max())  # both ends
    return 0.5 * 32 * float(torch.finfo(torch.float32).eps) * max(magnitude, 1.0)


def _tied_map(grid: tuple[int, int], seed: int) -> torch.Tensor:
    """A map with many ties (values from {0, 1, 2}) so that the tie rule decides most of the order."""
    return torch.randint(0, 3, grid, generator=torch.Generator().manual_seed(seed)).to(torch.float64)


# ---------------------------------------------------------------- the protocol's pieces


def test_step_counts_floor_i_n_over_s() -> None:
    assert step_counts(10, 4).tolist() == [0, 2, 5, 7, 10]
    assert step_counts(64, 50).tolist()[:6] == [0, 1, 2, 3, 5, 6]  # 64/50 = 1.28 per step
    assert step_counts(64, 50).tolist()[-3:] == [61, 62, 64]  # 3072/50, 3136/50, 64
    assert step_counts(3, 5).tolist() == [0, 0, 1, 1, 2, 3]  # more steps than patches repeat counts
    assert step_counts(16, 1).tolist() == [0, 16]
    assert step_counts(7, 7).tolist() == list(range(8))


def test_patch_order_descending_ties_to_lower_index() -> None:
    assert patch_order(torch.tensor([[1.0, 3.0], [3.0, 0.0]])).tolist() == [1, 2, 0, 3]
    assert patch_order(torch.zeros(2, 3)).tolist() == [0, 1, 2, 3, 4, 5]
    assert patch_order(torch.tensor([[2.0, 5.0, 2.0], [5.0, 2.0, -1.0]])).tolist() == [1, 3, 0, 2, 4, 5]
    with pytest.raises(ValueError, match="non-finite"):
        patch_order(torch.tensor([[1.0, float("nan")]]))


def test_quantised_map_is_the_map_on_a_grid_of_1e6_levels() -> None:
    values = [0.25, 1.0, 0.25 + 0.4e-6, 0.25 + 0.6e-6, 0.5, -1.0]  # range 2: one level is 2e-6
    want = [round((v + 1.0) / 2.0 * 1_000_000) for v in values]
    assert quantised_map(torch.tensor(values, dtype=torch.float64)).tolist() == want
    assert want[0] == want[2] == want[3] - 0  # within a level of each other: tied, so ordered by index
    assert patch_order(torch.tensor([values], dtype=torch.float64)).tolist() == [1, 4, 0, 2, 3, 5]
    assert quantised_map(torch.full((2, 2), 3.5)).tolist() == [0, 0, 0, 0]


def test_patch_order_and_aucs_do_not_depend_on_batch_size_or_ulps() -> None:
    model = _timm("cls")
    images = _noise((32, 32))
    targets = torch.tensor([1, 3])
    at_64 = explanation_maps(model, images, "occlusion", targets, batch_size=64)
    at_1 = explanation_maps(model, images, "occlusion", targets, batch_size=1)
    for index in range(2):
        assert patch_order(at_64[index]).tolist() == patch_order(at_1[index]).tolist()
    # An occlusion map with an exact tie, as one kernel gives it, and the same map with two values one ulp
    # apart, as another may: a plain stable sort orders them differently, the protocol's order does not.
    first = at_64[0].flatten().clone()
    first[3] = first[5]
    first[7] = first[2]
    second = first.clone()
    second[7] = float(np.nextafter(first[2].item(), math.inf))
    second[9] = float(np.nextafter(first[9].item(), -math.inf))
    first, second = first.reshape(4, 4), second.reshape(4, 4)
    plain = [torch.sort(-m.flatten(), stable=True).indices.tolist() for m in (first, second)]
    assert plain[0] != plain[1]
    assert patch_order(first).tolist() == patch_order(second).tolist()
    d64, i64 = deletion_insertion_curves(model, images[0], first, 1, 16, (8, 8), batch_size=64)
    d1, i1 = deletion_insertion_curves(model, images[0], second, 1, 16, (8, 8), batch_size=1)
    tolerance = curve_tolerance(model, images[0])
    assert curve_auc(d64) == pytest.approx(curve_auc(d1), abs=tolerance)
    assert curve_auc(i64) == pytest.approx(curve_auc(i1), abs=tolerance)


def test_auc_is_the_trapezoid_on_unit_spacing() -> None:
    assert curve_auc([1.0, 0.5, 0.0]) == pytest.approx(0.5, abs=1e-15)
    assert curve_auc([0.2, 0.4, 0.9, 1.0]) == pytest.approx((0.6 + 1.3 + 1.9) / 6, abs=1e-15)
    assert curve_auc(torch.tensor([0.3, 0.3], dtype=torch.float64)) == pytest.approx(0.3, abs=1e-15)
    with pytest.raises(ValueError):
        curve_auc([0.5])


def test_masked_inputs_by_hand() -> None:
    image = torch.arange(1.0, 1.0 + 1 * 4 * 6).reshape(1, 4, 6)  # grid 2x3 at stride 2
    relevance = torch.tensor([[0.0, 5.0, 1.0], [5.0, 2.0, 2.0]])  # order 1, 3, 4, 5, 2, 0
    deletion, insertion = masked_inputs(image, relevance, torch.tensor([0, 2, 6]), (2, 2))
    assert torch.equal(deletion[0], image) and torch.equal(insertion[2], image)
    assert not insertion[0].any() and not deletion[2].any()
    removed = torch.zeros(4, 6, dtype=torch.bool)
    removed[0:2, 2:4] = True  # patch 1
    removed[2:4, 0:2] = True  # patch 3
    assert torch.equal(deletion[1][0], torch.where(removed, 0.0, image[0]))
    assert torch.equal(insertion[1][0], torch.where(removed, image[0], 0.0))


def test_pixels_outside_the_grid_are_never_masked() -> None:
    image = torch.ones(1, 5, 4)  # a 2x2 grid at stride 2 leaves row 4 off the grid
    deletion, insertion = masked_inputs(image, torch.ones(2, 2), torch.tensor([4]), (2, 2))
    assert deletion[0, 0, :4].abs().sum() == 0 and torch.equal(deletion[0, 0, 4], torch.ones(4))
    assert torch.equal(insertion[0, 0, :4], torch.ones(4, 4)) and insertion[0, 0, 4].abs().sum() == 0


# ---------------------------------------------------------------- curves against the slow reference


@pytest.mark.parametrize("key", list(TIMM))
def test_curves_match_slow_reference_on_timm_models(key: str) -> None:
    model = _timm(key)
    _, _, _, grid, stride, img_size = TIMM[key]
    images = _noise(img_size)
    for index, steps in enumerate((grid[0] * grid[1], 5)):  # S = n, and S not dividing n
        relevance = _tied_map(grid, seed=index)
        target = index % NUM_CLASSES
        deletion, insertion = deletion_insertion_curves(
            model, images[index], relevance, target, steps, stride, batch_size=4
        )
        want_deletion, want_insertion = reference_curves(
            model, images[index], relevance.tolist(), target, steps, stride
        )
        assert deletion.dtype == torch.float64 and deletion.shape == (steps + 1,)
        tolerance = curve_tolerance(model, images[index])
        np.testing.assert_allclose(deletion.numpy(), want_deletion, rtol=0, atol=tolerance)
        np.testing.assert_allclose(insertion.numpy(), want_insertion, rtol=0, atol=tolerance)


@pytest.mark.parametrize("stem", list(BUNDLED))
def test_run_faithfulness_matches_slow_reference_on_bundled_checkpoints(stem: str) -> None:
    model, images = _bundled(stem)
    grid, stride = BUNDLED[stem]
    result = run_faithfulness(model, images, ["circle", "cross"], FaithfulnessOptions(methods=("rollout", "random")))
    assert result.steps == 50  # min(64, 50); 64 is not a multiple of 50
    with torch.no_grad():
        predicted = [int(model(image[None]).argmax()) for image in images]
    for method in ("rollout", "random"):
        outcome = result.methods[method]
        for index, curves in enumerate(outcome.per_image):
            assert curves.target_class == predicted[index]
            assert curves.map.shape == grid
            want_deletion, want_insertion = reference_curves(
                model, images[index], curves.map.tolist(), predicted[index], 50, stride
            )
            tolerance = curve_tolerance(model, images[index])
            np.testing.assert_allclose(curves.deletion.numpy(), want_deletion, rtol=0, atol=tolerance)
            np.testing.assert_allclose(curves.insertion.numpy(), want_insertion, rtol=0, atol=tolerance)
            assert curves.deletion_auc == pytest.approx(
                sum(want_deletion[i] + want_deletion[i + 1] for i in range(50)) / 100, abs=tolerance
            )
            assert curves.insertion_auc == pytest.approx(
                sum(want_insertion[i] + want_insertion[i + 1] for i in range(50)) / 100, abs=tolerance
            )
        assert outcome.deletion_auc == pytest.approx(sum(c.deletion_auc for c in outcome.per_image) / 2, abs=1e-15)
        assert outcome.seconds_per_image > 0


def test_fixed_target_class_and_custom_steps() -> None:
    model = _timm("gap")
    images = _noise((32, 32))
    result = run_faithfulness(
        model, images, ["a", "b"], FaithfulnessOptions(methods=("attention-last",), steps=3, target_class=4)
    )
    for index, curves in enumerate(result.methods["attention-last"].per_image):
        assert curves.target_class == 4
        want_deletion, want_insertion = reference_curves(model, images[index], curves.map.tolist(), 4, 3, (8, 8))
        tolerance = curve_tolerance(model, images[index])
        np.testing.assert_allclose(curves.deletion.numpy(), want_deletion, rtol=0, atol=tolerance)
        np.testing.assert_allclose(curves.insertion.numpy(), want_insertion, rtol=0, atol=tolerance)


# ---------------------------------------------------------------- the methods


def _block_sum_by_loops(pixels: torch.Tensor, grid: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    out = torch.zeros(pixels.shape[0], *grid, dtype=torch.float64)
    for b in range(pixels.shape[0]):
        for r in range(grid[0]):
            for c in range(grid[1]):
                total = 0.0
                for y in range(r * stride[0], (r + 1) * stride[0]):
                    for x in range(c * stride[1], (c + 1) * stride[1]):
                        total += float(pixels[b, y, x])
                out[b, r, c] = total
    return out


def _slow_integrated_gradients(
    model: torch.nn.Module, image: torch.Tensor, target: int, steps: int
) -> tuple[torch.Tensor, float]:
    """Signed attributions [C, H, W] and the relative completeness error, one node at a time, from the rule:
    Gauss-Legendre in log alpha on [1e-7, 1] (weight w * alpha)."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    low = math.log(1e-7)
    rule = []
    for u, w in zip(nodes, weights):
        alpha = math.exp(low + (u + 1) / 2 * (0 - low))
        rule.append((alpha, w / 2 * (0 - low) * alpha))
    total = torch.zeros(image.shape, dtype=torch.float64)
    for alpha, weight in rule:
        point = (float(alpha) * image).detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(model(point[None])[0, target], point)
        total += float(weight) * gradient.to(torch.float64)
    attribution = image.to(torch.float64) * total
    with torch.no_grad():
        gap = float(model(image[None])[0, target]) - float(model(torch.zeros_like(image)[None])[0, target])
    return attribution, abs(float(attribution.sum()) - gap) / abs(gap)


@pytest.mark.parametrize("key", ["cls", "non_square"])
def test_integrated_gradients_from_its_rule_summed_over_channels_and_blocks(key: str) -> None:
    model = _timm(key)
    _, _, _, grid, stride, img_size = TIMM[key]
    images = _noise(img_size)
    targets = torch.tensor([1, 3])
    diagnostics: dict = {}
    got = explanation_maps(
        model, images, "integrated-gradients", targets, ig_steps=7, ig_max_steps=7, batch_size=5,
        diagnostics=diagnostics,
    )  # fmt: skip
    for index in range(2):
        attribution, error = _slow_integrated_gradients(model, images[index], int(targets[index]), 7)
        want = _block_sum_by_loops(attribution.abs().sum(dim=0)[None], grid, stride)[0]
        torch.testing.assert_close(got[index], want, rtol=1e-4, atol=1e-6)
        assert diagnostics["completeness_error"][index] == pytest.approx(error, rel=1e-3, abs=1e-6)
    assert diagnostics["ig_steps"] == [7, 7]
    assert all(p.grad is None for p in model.parameters())


def test_ig_schedule_integrates_polynomials_and_spikes_near_zero() -> None:
    alphas, weights = ig_schedule(50)
    assert alphas.shape == weights.shape == (50,) and alphas.min() > 0 and alphas.max() < 1
    assert float(weights.sum()) == pytest.approx(1 - 1e-7, rel=1e-9)
    assert float((weights * alphas**3).sum()) == pytest.approx(0.25, rel=1e-9)

    # g = the derivative of a smooth step from 0 to 1 around alpha = 1e-5 (what a normalised stem does to the
    # logit along alpha * x): its integral is 1; the uniform Gauss-Legendre rule of 50 nodes misses the step.
    def spike(alpha: np.ndarray) -> np.ndarray:
        rise = 1 / (1 + np.exp(-2 * (np.log(alpha) - np.log(1e-5))))
        return 2 * rise * (1 - rise) / alpha

    nodes, uniform = np.polynomial.legendre.leggauss(50)
    assert float((weights * spike(alphas)).sum()) == pytest.approx(1, abs=1e-3)
    assert abs(float((uniform / 2 * spike((nodes + 1) / 2)).sum()) - 1) > 0.5


def test_integrated_gradients_doubles_steps_until_completeness_error_is_5_percent() -> None:
    model = _timm("cls")
    images = _noise((32, 32), batch=3)
    targets = torch.tensor([0, 2, 4])
    diagnostics: dict = {}
    got = explanation_maps(
        model, images, "integrated-gradients", targets, ig_steps=1, ig_max_steps=64, diagnostics=diagnostics
    )
    steps, errors = diagnostics["ig_steps"], diagnostics["completeness_error"]
    for index in range(3):  # the rule, image by image: the first of 1, 2, 4, ... 64 whose error is <= 5%
        count = 1
        while True:
            attribution, error = _slow_integrated_gradients(model, images[index], int(targets[index]), count)
            if error <= 0.05 or count * 2 > 64:
                break
            count *= 2
        assert steps[index] == count
        assert errors[index] == pytest.approx(error, rel=1e-3, abs=1e-6)
        want = _block_sum_by_loops(attribution.abs().sum(dim=0)[None], (4, 4), (8, 8))[0]
        torch.testing.assert_close(got[index], want, rtol=1e-4, atol=1e-6)
    assert max(steps) > 1 and all(e <= 0.05 for e in errors)  # it doubled, and it stopped once converged
    capped: dict = {}
    explanation_maps(model, images, "integrated-gradients", targets, ig_steps=1, ig_max_steps=1, diagnostics=capped)
    assert capped["ig_steps"] == [1, 1, 1] and max(capped["completeness_error"]) > 0.05


def test_convergence_is_in_the_result_and_json() -> None:
    model = _timm("cls")
    options = FaithfulnessOptions(methods=("integrated-gradients", "random"), steps=2, ig_steps=1, ig_max_steps=2)
    result = run_faithfulness(model, _noise((32, 32), batch=3), ["a", "b", "c"], options)
    convergence = result.methods["integrated-gradients"].convergence
    assert result.methods["random"].convergence is None
    assert convergence is not None and convergence.start_steps == 1 and convergence.max_steps == 2
    assert len(convergence.errors) == 3 and set(convergence.steps) <= {1, 2}
    assert convergence.median_error == pytest.approx(sorted(convergence.errors)[1])
    assert convergence.converged == (convergence.median_error <= 0.05)
    document = json.loads(json.dumps(result.to_json({})))["methods"]["integrated-gradients"]["convergence"]
    assert document["steps"] == list(convergence.steps)
    assert document["relative_error"] == pytest.approx(list(convergence.errors))
    assert document["median_relative_error"] == pytest.approx(convergence.median_error)
    assert document["converged"] == convergence.converged and document["tolerance"] == 0.05
    with pytest.raises(VitvizError, match="--ig-max-steps"):
        FaithfulnessOptions(ig_steps=50, ig_max_steps=40)
    with pytest.raises(VitvizError, match="--ig-max-steps"):
        FaithfulnessOptions(ig_max_steps=10_000)


def test_random_map_reproducible_by_image_index() -> None:
    model = _timm("cls")
    images = _noise((32, 32), batch=3)
    targets = torch.zeros(3, dtype=torch.long)
    maps = explanation_maps(model, images, "random", targets, image_indices=[5, 9, 5])
    want = torch.rand(4, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert torch.equal(maps[1], want)
    assert torch.equal(maps[0], maps[2]) and not torch.equal(maps[0], maps[1])
    again = explanation_maps(model, images[:1], "random", targets[:1], image_indices=[5])
    assert torch.equal(again[0], maps[0])


@pytest.mark.parametrize("key", list(TIMM))
def test_attention_last_from_the_definition(key: str) -> None:
    model = _timm(key)
    _, prefix, has_class_token, grid, _, img_size = TIMM[key]
    images = _noise(img_size)
    keep = KeepAllAttention()
    capture_attention(model, images, keep, with_logits=False)
    last = keep.result()[-1].to(torch.float64).numpy()  # (B, H, N, N)
    got = explanation_maps(model, images, "attention-last", torch.zeros(2, dtype=torch.long))
    for b in range(2):
        for p in range(grid[0] * grid[1]):
            heads = last.shape[1]
            if has_class_token:
                want = sum(last[b, h, 0, prefix + p] for h in range(heads)) / heads
            else:
                rows = range(prefix, last.shape[2])
                want = sum(last[b, h, q, prefix + p] for h in range(heads) for q in rows) / (heads * len(rows))
            assert float(got[b].reshape(-1)[p]) == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("key", ["cls", "registers"])
def test_rollout_and_gradient_rollout_maps_are_the_analysis_functions(key: str) -> None:
    model = _timm(key)
    images = _noise(TIMM[key][5])
    targets = torch.tensor([2, 0])
    keep = KeepAllAttention()
    capture_attention(model, images, keep, with_logits=False)
    layout = token_layout(model)
    rollout = explanation_maps(model, images, "rollout", targets, batch_size=1)
    torch.testing.assert_close(rollout, attention_rollout(keep.result(), layout), rtol=1e-12, atol=0)
    grads = attention_gradients(model, images, targets)
    want = gradient_rollout(grads.attentions, grads.gradients, layout)
    torch.testing.assert_close(explanation_maps(model, images, "gradient-rollout", targets), want)


def test_occlusion_is_the_target_logit_drop_of_each_patch() -> None:
    model = _timm("non_square")
    image = _noise((32, 24), batch=1)
    got = explanation_maps(model, image, "occlusion", torch.tensor([2]))
    with torch.no_grad():
        clean = float(model(image)[0, 2])
        for r in range(4):
            for c in range(3):
                occluded = image.clone()
                occluded[:, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = 0.0
                assert float(got[0, r, c]) == pytest.approx(clean - float(model(occluded)[0, 2]), abs=1e-5)


def test_every_method_runs_on_models_without_class_token_and_with_registers() -> None:
    for key in ("gap", "registers", "cls_registers"):
        model = _timm(key)
        result = run_faithfulness(
            model, _noise((32, 32)), ["a", "b"], FaithfulnessOptions(methods=METHODS, steps=4, ig_steps=4)
        )
        for method in METHODS:
            outcome = result.methods[method]
            assert [c.map.shape for c in outcome.per_image] == [(4, 4), (4, 4)]
            for curves in outcome.per_image:
                assert torch.isfinite(curves.map).all() and curves.deletion.shape == (5,)
                assert 0.0 <= curves.deletion_auc <= 1.0 and 0.0 <= curves.insertion_auc <= 1.0


def test_model_is_not_changed() -> None:
    model = _timm("cls")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    run_faithfulness(model, _noise((32, 32)), ["a", "b"], FaithfulnessOptions(steps=2, ig_steps=2, sanity=True))
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
        assert parameter.grad is None and parameter.requires_grad
    assert not model.training


# ---------------------------------------------------------------- sanity check


def test_spearman_against_scipy_with_ties() -> None:
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        a = torch.randint(0, 4, (5, 5), generator=generator).to(torch.float64)
        b = torch.randn(5, 5, generator=generator, dtype=torch.float64)
        assert spearman(a, b) == pytest.approx(spearmanr(a.reshape(-1), b.reshape(-1)).statistic, abs=1e-12)
    x = torch.randn(16, generator=generator, dtype=torch.float64)
    assert spearman(x, x) == 1.0  # exactly
    assert spearman(x, -x) == pytest.approx(-1.0, abs=1e-15)
    assert math.isnan(spearman(torch.ones(4), x[:4]))


def test_randomise_tensor_keeps_mean_and_std() -> None:
    generator = torch.Generator().manual_seed(11)
    tensor = torch.randn(200, 100, generator=generator) * 2.0 + 3.0
    new = randomise_tensor(tensor, torch.Generator().manual_seed(0))
    assert new.shape == tensor.shape and new.dtype == tensor.dtype
    assert float(new.mean()) == pytest.approx(float(tensor.mean()), abs=0.05)
    assert float(new.std()) == pytest.approx(float(tensor.std()), rel=0.02)
    assert not torch.allclose(new, tensor)
    assert torch.equal(new, randomise_tensor(tensor, torch.Generator().manual_seed(0)))
    assert torch.equal(randomise_tensor(torch.tensor([1.5]), torch.Generator()), torch.tensor([1.5]))


def test_cascading_randomisation_stages() -> None:
    model = _timm("cls")
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen: list[str] = []
    for stage, randomised in cascading_randomisation(model):
        seen.append(stage)
        params = {name: p.detach() for name, p in randomised.named_parameters()}
        done = {"head"} | {f"blocks.{s.split()[1]}." for s in seen if s.startswith("block")}
        for name, parameter in params.items():
            was = original[name]
            touched = name.startswith("head.") or any(name.startswith(prefix) for prefix in done)
            if not touched or was.numel() == 1 or float(was.std()) == 0.0:
                assert torch.equal(parameter, was), (stage, name)
                continue
            assert not torch.equal(parameter, was), (stage, name)
            if was.numel() >= 1000:
                assert float(parameter.mean()) == pytest.approx(float(was.mean()), abs=0.1 * float(was.std()))
                assert float(parameter.std()) == pytest.approx(float(was.std()), rel=0.1)
    assert seen == ["head", "block 1", "block 0"]
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, original[name])


def test_sanity_check_rollout_ignores_the_head() -> None:
    model, images = _bundled("shapes-default")
    options = FaithfulnessOptions(methods=("rollout", "gradient-rollout", "random"), steps=2, sanity=True)
    result = run_faithfulness(model, images, ["circle", "cross"], options)
    depth = len(model.blocks)
    sanity = result.sanity
    assert sanity is not None
    want_stages = ["head"] + [f"block {i}" for i in reversed(range(depth))]
    assert list(sanity["rollout"].randomised) == want_stages
    assert sanity["rollout"].spearman[0] == 1.0  # exactly: rollout never reads the head
    assert sanity["rollout"].spearman[-1] < 0.9
    assert sanity["gradient-rollout"].spearman[0] < 0.99  # the gradients do read the head
    assert list(sanity["random"].spearman) == [1.0] * len(want_stages)
    assert sanity["rollout"].maps.shape == (len(want_stages), 2, 8, 8)
    for stage, maps in enumerate(sanity["gradient-rollout"].maps):
        original = result.methods["gradient-rollout"].per_image
        mean = sum(spearman(original[i].map, maps[i]) for i in range(2)) / 2
        assert sanity["gradient-rollout"].spearman[stage] == pytest.approx(mean, abs=1e-15)


def test_sanity_check_keeps_each_images_spearman_and_writes_it() -> None:
    """Per image and stage, Spearman of the original map with the randomised one (scipy as the reference); the
    stage means are the means of these; the JSON holds them per image (NaN as null), in image order."""
    model = _timm("cls")
    options = FaithfulnessOptions(methods=("gradient-rollout", "attention-last", "random"), steps=2, sanity=True)
    result = run_faithfulness(model, _noise((32, 32), batch=3), ["x", "y", "z"], options)
    assert result.sanity is not None
    document = json.loads(json.dumps(result.to_json({}), allow_nan=False))
    for name, sanity in result.sanity.items():
        assert len(sanity.per_image_spearman) == 3 and all(len(row) == 3 for row in sanity.per_image_spearman)
        for index, row in enumerate(sanity.per_image_spearman):
            original = result.methods[name].per_image[index].map.numpy().ravel()
            for stage, value in enumerate(row):
                want = spearmanr(original, sanity.maps[stage, index].numpy().ravel()).statistic
                assert value == pytest.approx(want, abs=1e-12)
        for stage, mean in enumerate(sanity.spearman):
            assert mean == sum(row[stage] for row in sanity.per_image_spearman) / 3
        written = document["sanity"][name]["per_image_spearman"]
        assert written == [[None if math.isnan(v) else v for v in row] for row in sanity.per_image_spearman]
    assert result.sanity["gradient-rollout"].per_image_spearman[0][0] < 0.99  # the gradients read the head
    assert result.sanity["random"].per_image_spearman == ((1.0, 1.0, 1.0),) * 3


# ---------------------------------------------------------------- the JSON and bad input


def test_json_document() -> None:
    model = _timm("cls")
    options = FaithfulnessOptions(methods=("rollout", "random"), steps=4)
    result = run_faithfulness(model, _noise((32, 32)), ["x.png", "y.png"], options)
    document = json.loads(json.dumps(result.to_json({"source": "timm:test"}), allow_nan=False))
    assert list(document) == ["model", "protocol", "methods", "comparisons"]
    assert document["model"] == {"source": "timm:test"}
    assert document["protocol"] == {"steps": 4, "baseline": "normalised-zero", "target": "predicted"}
    assert list(document["methods"]) == ["rollout", "random"]
    rollout = document["methods"]["rollout"]
    assert list(rollout) == [
        "deletion_auc",
        "insertion_auc",
        "deletion_auc_interval",
        "insertion_auc_interval",
        "seconds_per_image",
        "per_image",
    ]
    assert document["comparisons"]["num_images"] == 2
    assert [(p["first"], p["second"]) for p in document["comparisons"]["deletion"]["pairs"]] == [("rollout", "random")]
    first = rollout["per_image"][0]
    assert set(first) == {"image", "target_class", "map", "deletion", "insertion", "deletion_auc", "insertion_auc"}
    assert first["image"] == "x.png" and len(first["deletion"]) == 5 and len(first["map"]) == 4
    assert first["deletion_auc"] == pytest.approx(curve_auc(first["deletion"]), abs=1e-15)

    fixed = run_faithfulness(
        model, _noise((32, 32)), ["x", "y"], FaithfulnessOptions(methods=("random",), steps=1, target_class=2)
    )
    with_sanity = run_faithfulness(
        model, _noise((32, 32)), ["x", "y"], FaithfulnessOptions(methods=("random",), steps=1, sanity=True)
    )
    assert fixed.to_json({})["protocol"]["target"] == 2
    assert with_sanity.to_json({})["sanity"] == {
        "random": {
            "randomised": ["head", "block 1", "block 0"],
            "spearman": [1.0, 1.0, 1.0],
            "per_image_spearman": [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],  # per image, one value per stage
        }
    }


def test_bad_input_is_one_line() -> None:
    model = _timm("cls")
    cases = [
        (lambda: parse_methods("rollout,lime"), "unknown method lime: choose from"),
        (lambda: FaithfulnessOptions(methods=("saliency",)), "unknown method saliency"),
        (lambda: parse_methods(""), "unknown method"),
        (lambda: FaithfulnessOptions(steps=0), "--steps must be at least 1, got 0"),
        (lambda: FaithfulnessOptions(target_class=-1), "--target-class must be 0 or more"),
        (
            lambda: run_faithfulness(model, _noise((32, 32)), ["a", "b"], FaithfulnessOptions(target_class=5)),
            "--target-class 5 is out of range: the model has 5 classes",
        ),
    ]
    for call, message in cases:
        with pytest.raises(VitvizError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- figures


def test_curves_figure_one_colour_per_method_random_dashed(tmp_path: Path) -> None:
    from vitviz.plots import faithfulness as plots
    from vitviz.plots.paper import save_figure

    deletion = {
        "rollout": np.array([[1.0, 0.5, 0.0], [0.8, 0.4, 0.2]]),
        "gradient-rollout": np.array([1.0, 0.2, 0.1]),
        "random": np.array([1.0, 0.9, 0.5]),
    }
    insertion = {name: curves[..., ::-1] for name, curves in deletion.items()}
    fig = plots.curves_figure(deletion, insertion, title="test")
    left, right = fig.axes[:2]
    assert [line.get_label() for line in left.lines] == [
        "rollout (0.475)",
        "gradient-rollout (0.375)",
        "random (0.825)",
    ]
    np.testing.assert_allclose(left.lines[0].get_ydata(), [0.9, 0.45, 0.1])  # mean over images
    np.testing.assert_allclose(left.lines[0].get_xdata(), [0.0, 0.5, 1.0])
    assert [line.get_linestyle() for line in right.lines] == ["-", "-", "--"]
    colours = [line.get_color() for line in left.lines]
    assert len(set(map(str, colours))) == 3 and colours == [line.get_color() for line in right.lines]
    written = save_figure(fig, tmp_path / "curves")
    assert all(path.stat().st_size > 0 for path in written)

    sanity = plots.sanity_figure(["head", "block 1", "block 0"], {"rollout": [1.0, 0.5, None], "random": [1, 1, 1]})
    lines = sanity.axes[0].lines
    np.testing.assert_array_equal(lines[0].get_ydata(), [1.0, 0.5, np.nan])
    assert lines[1].get_linestyle() == "--"
    with pytest.raises(ValueError):
        plots.sanity_figure(["head"], {"rollout": [1.0, 0.5]})


# ---------------------------------------------------------------- the command line


def test_cli_writes_what_the_api_computes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitviz.cli import main
    from vitviz.pipeline import model_card

    files = [SAMPLES / "circle.png", SAMPLES / "star.png"]
    argv = ["faithfulness", str(CHECKPOINTS / "shapes-default.safetensors"), "--images", *map(str, files)]
    argv += ["--methods", "rollout,random", "--steps", "8", "--sanity", "--json", str(tmp_path / "f.json")]
    argv += ["--figures", str(tmp_path / "figures")]
    assert main(argv) == 0
    document = json.loads((tmp_path / "f.json").read_text())

    loaded = load_model(str(CHECKPOINTS / "shapes-default.safetensors"))
    meta = loaded.meta
    images = torch.stack(
        [
            load_for_model(f, input_size=meta.input_size, mean=meta.mean, std=meta.std, in_chans=meta.in_chans)
            for f in files
        ]
    )
    options = FaithfulnessOptions(methods=("rollout", "random"), steps=8, sanity=True)
    expected = run_faithfulness(loaded.model, images, [str(f) for f in files], options)
    want = json.loads(json.dumps(expected.to_json(model_card(loaded).model_section())))
    assert document["model"] == want["model"] and document["protocol"] == want["protocol"]
    assert document["sanity"] == want["sanity"] and document["sanity"]["rollout"]["spearman"][0] == 1.0
    for name in ("rollout", "random"):
        got, exp = document["methods"][name], want["methods"][name]
        assert got["deletion_auc"] == exp["deletion_auc"] and got["insertion_auc"] == exp["insertion_auc"]
        assert [c["deletion"] for c in got["per_image"]] == [c["deletion"] for c in exp["per_image"]]
        assert len(got["per_image"][0]["deletion"]) == 9
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "faithfulness-curves.png",
        "faithfulness-curves.svg",
        "faithfulness-sanity.png",
        "faithfulness-sanity.svg",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "bogus"], "unknown method bogus"),
        (["--steps", "0"], "steps"),
        (["--target-class", "10"], "out of range"),
        (["--ig-steps", "50", "--ig-max-steps", "40"], "--ig-max-steps must be between"),
        (["--ig-max-steps", "100000"], "--ig-max-steps must be between"),
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(extra: list[str], message: str, capsys) -> None:
    from vitviz.cli import main

    argv = ["faithfulness", str(CHECKPOINTS / "shapes-default.safetensors"), "--images", str(SAMPLES / "circle.png")]
    assert main([*argv, *extra, "--json", "-"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.slow
def test_integrated_gradients_converges_on_the_hybrid_checkpoint() -> None:
    """The hybrid's stem (GroupNorm after a bias-free convolution) puts all of f(x) - f(0) near alpha = 0: the
    doubled rule must still reach a median completeness error of 5% and the ranking of a 2,000-node map."""
    from training.data import build_dataset, eval_transform

    loaded = load_model(str(CHECKPOINTS / "shapes-hybrid.safetensors"))
    meta = loaded.meta
    data = build_dataset("shapes", split="test", img_size=meta.input_size)
    transform = eval_transform(input_size=meta.input_size, in_chans=meta.in_chans, mean=meta.mean, std=meta.std)
    images = torch.stack([transform(data[index][0]) for index in range(4)])
    with torch.no_grad():
        targets = loaded.model(images).argmax(dim=-1)
    diagnostics: dict = {}
    maps = explanation_maps(loaded.model, images, "integrated-gradients", targets, diagnostics=diagnostics)
    assert float(np.median(diagnostics["completeness_error"])) <= 0.05, diagnostics
    reference = explanation_maps(
        loaded.model, images, "integrated-gradients", targets, ig_steps=2000, ig_max_steps=2000
    )
    for index in range(4):
        assert spearman(maps[index], reference[index]) >= 0.95
