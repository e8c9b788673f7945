"""Filters and position for Hugging Face models (`hf:<folder>`), against direct computations on transformers' own
modules with tiny random configs, for every class vitviz reads.

References, written from the definitions without vitviz:
- filters: the patch convolution's weight read at its transformers path (``embeddings.patch_embeddings.projection``
  for ViT, DeiT, BEiT, DINOv2; ``embeddings.patch_embedding`` for CLIP and SigLIP), flattened to [D, C*P*P],
  centred over the D rows and decomposed with numpy's SVD (sign: largest-magnitude entry positive).
- position: what the embeddings really add to each patch, read by running transformers' own embeddings module on
  an all-zero image (each patch token is then the convolution's bias plus its position embedding; the class,
  distillation and register tokens come first), then the cosine similarity of every pair of patch positions.
  The tables and biases are randomised before saving, so a wrong row, offset or prefix would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from vitviz.models import load_model
from vitviz.models.hf import FAMILIES
from vitviz.pipeline import NO_POSITION_EMBEDDINGS, FilterResult, NotApplicable, PositionResult, filters, position

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
# Where each class keeps its base model, and what its tiny config adds.
BASE = {
    "ViTForImageClassification": "vit.",
    "DeiTForImageClassification": "deit.",
    "DeiTForImageClassificationWithTeacher": "deit.",
    "BeitForImageClassification": "beit.",
    "Dinov2ForImageClassification": "dinov2.",
    "Dinov2WithRegistersForImageClassification": "dinov2_with_registers.",
}
EXTRA = {"Dinov2WithRegistersConfig": {"num_register_tokens": 4}, "BeitConfig": {"use_relative_position_bias": True}}
# Tokens before the patches in the embeddings' output: class, distillation, registers.
PREFIX = {"DeiT": 2, "Dinov2WithRegisters": 5, "Siglip": 0}


def _prefix(class_name: str) -> int:
    return next(
        (n for start, n in sorted(PREFIX.items(), key=lambda kv: -len(kv[0])) if class_name.startswith(start)), 1
    )


def _conv_path(class_name: str) -> str:
    tail = "patch_embedding" if class_name.startswith(("CLIP", "Siglip")) else "patch_embeddings.projection"
    return f"{BASE.get(class_name, '')}embeddings.{tail}"


def _save(class_name: str, folder: Path, *, extra: dict | None = None, processor: dict | None = None) -> None:
    model_class = getattr(transformers, class_name)
    config_class = model_class.config_class
    kwargs = dict(TINY, **EXTRA.get(config_class.__name__, {}), **(extra or {}))
    if "ForImageClassification" in class_name:
        kwargs["num_labels"] = 3
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs))
    with torch.no_grad():  # random tables and biases: a wrong row or offset cannot hide
        for name, param in model.named_parameters():
            if name.endswith(("position_embeddings", "position_embedding.weight")) or name.endswith(
                _conv_path(class_name) + ".bias"
            ):
                param.copy_(torch.randn(param.shape))
    model.save_pretrained(folder)
    size = {"height": TINY["image_size"], "width": TINY["image_size"]}
    default = {"do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": size}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor or default))


def _reference(folder: Path, class_name: str) -> torch.nn.Module:
    return getattr(transformers, class_name).from_pretrained(str(folder), attn_implementation="eager").eval()


def _reference_filters(weight: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    flat = weight.reshape(weight.shape[0], -1).astype(np.float64)
    centred = flat - flat.mean(axis=0, keepdims=True)
    _, s, vh = np.linalg.svd(centred, full_matrices=False)
    components = vh[:k]
    for row in components:
        if row[np.argmax(np.abs(row))] < 0:
            row *= -1
    return components.reshape(k, *weight.shape[1:]), (s**2 / (s**2).sum())[:k]


def _reference_similarity(table: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    n = table.shape[0]
    similarity = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            similarity[i, j] = table[i] @ table[j] / (np.linalg.norm(table[i]) * np.linalg.norm(table[j]))
    return similarity.reshape(*grid, *grid)


def _added_positions(reference: torch.nn.Module, class_name: str, size: tuple[int, int]) -> np.ndarray:
    """What the embeddings add to each patch token: their output on a zero image, minus the convolution's bias."""
    conv = reference.get_submodule(_conv_path(class_name))
    embeddings = reference.get_submodule(_conv_path(class_name).split("embeddings.")[0] + "embeddings")
    with torch.no_grad():
        tokens = embeddings(torch.zeros(1, 3, *size))[0, _prefix(class_name) :]
        bias = conv.bias if conv.bias is not None else torch.zeros(tokens.shape[-1])
        return (tokens - bias).double().numpy()


@pytest.mark.parametrize("class_name", list(FAMILIES))
def test_filters_and_position_equal_direct_computations_on_transformers_modules(
    class_name: str, tmp_path: Path
) -> None:
    _save(class_name, tmp_path)
    loaded = load_model(f"hf:{tmp_path}")
    reference = _reference(tmp_path, class_name)
    weight = reference.get_submodule(_conv_path(class_name)).weight.detach().numpy()
    assert weight.shape == (32, 3, 8, 8)

    result = filters(loaded)
    assert isinstance(result, FilterResult)
    np.testing.assert_array_equal(result.weight, weight)
    k = 8  # the leading components are well separated; the last ones of a centred 32 x 192 matrix are not
    components, ratio = _reference_filters(weight, k)
    np.testing.assert_allclose(result.components[:k], components, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(result.explained_variance_ratio[:k], ratio, rtol=1e-9, atol=1e-12)

    similarity = position(loaded)
    if class_name.startswith("Beit"):  # BEiT's checkpoints: relative-position bias, no absolute table
        assert similarity == NotApplicable(NO_POSITION_EMBEDDINGS)
        return
    assert isinstance(similarity, PositionResult)
    table = _added_positions(reference, class_name, (32, 32))
    assert table.shape == (16, 32)
    np.testing.assert_allclose(similarity.similarity, _reference_similarity(table, (4, 4)), rtol=1e-5, atol=1e-6)
    assert float(np.abs(similarity.matrix() - np.eye(16)).max()) > 0.1  # random tables: far from the identity


@pytest.mark.parametrize("class_name", ["BeitModel", "BeitForImageClassification"])
def test_beit_with_an_absolute_table_gets_its_position_section(class_name: str, tmp_path: Path) -> None:
    _save(class_name, tmp_path, extra={"use_absolute_position_embeddings": True})
    loaded = load_model(f"hf:{tmp_path}")
    table = _added_positions(_reference(tmp_path, class_name), class_name, (32, 32))
    result = position(loaded)
    assert isinstance(result, PositionResult)
    np.testing.assert_allclose(result.similarity, _reference_similarity(table, (4, 4)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("class_name", ["Dinov2Model", "Dinov2WithRegistersModel"])
@pytest.mark.parametrize("crop", [(48, 40), (40, 40)])
def test_dinov2_position_is_the_table_resampled_to_the_input_grid(
    class_name: str, crop: tuple[int, int], tmp_path: Path
) -> None:
    processor = {
        "do_normalize": True,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "do_center_crop": True,
        "crop_size": {"height": crop[0], "width": crop[1]},
        "size": {"shortest_edge": 56},
    }
    _save(class_name, tmp_path, processor=processor)
    loaded = load_model(f"hf:{tmp_path}")
    grid = (crop[0] // 8, crop[1] // 8)
    table = _added_positions(_reference(tmp_path, class_name), class_name, crop)
    assert table.shape == (grid[0] * grid[1], 32)
    result = position(loaded)
    assert isinstance(result, PositionResult) and result.grid == grid
    np.testing.assert_allclose(result.similarity, _reference_similarity(table, grid), rtol=1e-5, atol=1e-6)


def test_cli_writes_filters_and_position_for_an_hf_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vitviz.cli import main

    _save("CLIPVisionModel", tmp_path / "clip")
    out = tmp_path / "out.json"
    code = main(["analyze", f"hf:{tmp_path / 'clip'}", "--analyses", "filters,position", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert "not_applicable" not in report["filters"] and "not_applicable" not in report["position"], report
    reference = _reference(tmp_path / "clip", "CLIPVisionModel")
    table = _added_positions(reference, "CLIPVisionModel", (32, 32))
    similarity = np.asarray(report["position"]["similarity"], dtype=np.float64)
    np.testing.assert_allclose(similarity.reshape(4, 4, 4, 4), _reference_similarity(table, (4, 4)), atol=1e-5)
