"""Patch-embedding filter PCA and position-embedding similarity against references from the definitions."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import timm
import torch

from vitviz.analysis.filters import (
    components_for_display,
    filter_pca,
    filters_applicable,
    patch_embedding_filters,
)
from vitviz.analysis.position import position_similarity
from vitviz.errors import VitvizError

MODELS = {
    "vit_tiny": ("vit_tiny_patch16_224", dict(depth=1)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=1)),
    "registers_gap": ("vit_base_patch16_reg4_gap_256", dict(embed_dim=64, depth=1, num_heads=2)),
    "relpos": ("vit_relpos_small_patch16_224", dict(embed_dim=64, depth=1, num_heads=2)),
    "hybrid": ("vit_tiny_r_s16_p8_224", dict(depth=1)),
    "non_square": ("vit_tiny_patch16_224", dict(img_size=(96, 64), depth=1)),
    "grey_small_patches": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, in_chans=1, depth=1)),
}


@functools.cache
def _model(key: str) -> torch.nn.Module:
    name, overrides = MODELS[key]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **overrides).eval()


# ---------------------------------------------------------------- filters


def reference_pca(weight: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of the covariance of the D flattened filters; components as unit rows."""
    rows = weight.reshape(weight.shape[0], -1).astype(np.float64)
    covariance = np.cov(rows, rowvar=False)  # centres over the D rows
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    return eigenvectors[:, :k].T, eigenvalues[:k] / eigenvalues.sum()


@pytest.mark.parametrize(("key", "k"), [("vit_tiny", 28), ("non_square", 5), ("grey_small_patches", 16)])
def test_filter_pca_matches_covariance_eigenvectors(key: str, k: int) -> None:
    model = _model(key)
    weight = patch_embedding_filters(model)
    assert weight.shape == model.patch_embed.proj.weight.shape
    result = filter_pca(weight, k)
    components, ratios = reference_pca(weight.numpy(), k)
    channels, ph, pw = weight.shape[1:]
    assert result.components.shape == (k, channels, ph, pw)
    np.testing.assert_allclose(result.explained_variance_ratio.numpy(), ratios, rtol=1e-5)
    flat = result.components.reshape(k, -1).numpy()
    for index in range(k):
        # a component is defined up to sign; the sign rule is checked below
        sign = np.sign(np.dot(flat[index], components[index]))
        np.testing.assert_allclose(flat[index], sign * components[index], rtol=1e-5, atol=1e-7)
        largest = np.argmax(np.abs(flat[index]))
        assert flat[index][largest] > 0


def test_all_components_explain_all_variance() -> None:
    weight = patch_embedding_filters(_model("grey_small_patches"))  # D=192 rows of 16 values
    result = filter_pca(weight, 16)
    assert result.explained_variance_ratio.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert bool((result.explained_variance_ratio[:-1] >= result.explained_variance_ratio[1:]).all())
    with pytest.raises(VitvizError, match="between 1 and 16"):
        filter_pca(weight, 17)


def test_display_scales_each_component_on_its_own() -> None:
    generator = torch.Generator().manual_seed(0)
    components = torch.randn(3, 3, 4, 4, generator=generator, dtype=torch.float64)
    components[1] *= 100.0
    components[2] = 0.25  # constant: nothing to stretch
    shown = components_for_display(components).numpy()
    for index in range(2):
        values = components[index].numpy()
        expected = (values - values.min()) / (values.max() - values.min())
        np.testing.assert_allclose(shown[index], expected, rtol=1e-12)
    assert np.all(shown[2] == 0.5)


def test_hybrid_stem_has_no_pixel_filters() -> None:
    applicable, reason = filters_applicable(_model("hybrid"))
    assert not applicable and "hybrid" in reason
    with pytest.raises(VitvizError, match="hybrid"):
        patch_embedding_filters(_model("hybrid"))
    assert filters_applicable(_model("non_square")) == (True, "")


# ---------------------------------------------------------------- position embeddings


def _patch_position_table(model: torch.nn.Module) -> torch.Tensor:
    """The test's own slice of timm's pos_embed: prefix positions dropped when the table has them."""
    table = model.pos_embed.detach()[0]
    num_patches = model.patch_embed.num_patches
    if table.shape[0] == num_patches + model.num_prefix_tokens:
        table = table[model.num_prefix_tokens :]
    assert table.shape[0] == num_patches
    return table


def reference_similarity(table: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    gh, gw = grid
    out = np.zeros((gh, gw, gh, gw))
    for r1 in range(gh):
        for c1 in range(gw):
            a = table[r1 * gw + c1].astype(np.float64)
            for r2 in range(gh):
                for c2 in range(gw):
                    b = table[r2 * gw + c2].astype(np.float64)
                    out[r1, c1, r2, c2] = float(np.dot(a, b)) / (math.sqrt(np.dot(a, a)) * math.sqrt(np.dot(b, b)))
    return out


@pytest.mark.parametrize(
    ("key", "grid"),
    [("vit_tiny", (14, 14)), ("deit_distilled", (14, 14)), ("registers_gap", (16, 16)), ("non_square", (6, 4))],
)
def test_position_similarity_matches_reference(key: str, grid: tuple[int, int]) -> None:
    table = _patch_position_table(_model(key))
    got = position_similarity(table, grid)
    assert got.shape == (*grid, *grid)
    np.testing.assert_allclose(got.numpy(), reference_similarity(table.numpy(), grid), rtol=1e-5, atol=1e-9)
    diagonal = got.reshape(grid[0] * grid[1], -1).diagonal()
    torch.testing.assert_close(diagonal, torch.ones_like(diagonal))


def test_position_similarity_of_a_learned_looking_table_peaks_at_its_own_position() -> None:
    # A smooth 2-D table (like trained embeddings): each position is most similar to itself and its neighbours.
    gh, gw, dim = 5, 7, 64
    frequencies = torch.linspace(0.2, 1.5, dim // 4, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    y, x = rows.reshape(-1, 1).double(), cols.reshape(-1, 1).double()
    table = torch.cat(
        [
            torch.sin(y * frequencies),
            torch.cos(y * frequencies),
            torch.sin(x * frequencies),
            torch.cos(x * frequencies),
        ],
        dim=1,
    )
    similarity = position_similarity(table, (gh, gw))
    for r in range(gh):
        for c in range(gw):
            best = int(similarity[r, c].argmax())
            assert divmod(best, gw) == (r, c)


def test_position_similarity_rejects_a_table_that_does_not_fit_the_grid() -> None:
    with pytest.raises(ValueError, match="grid"):
        position_similarity(torch.zeros(10, 4), (3, 4))
