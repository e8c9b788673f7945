"""Hugging Face transformers models through `hf:<folder>`: layout, normalisation and class names read from the
folder, every layer's captured attention equal to transformers' own eager `output_attentions`, the gradient of
a logit with respect to it equal to autograd's through transformers' own attentions, the CLI end to end, and
the one-line message when a repository cannot be downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from vitviz.capture import attention_gradients, attention_maps, unreadable_reason
from vitviz.errors import VitvizError
from vitviz.models import load_model
from vitviz.tokens import token_layout

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "initializer_range": 0.2,
}
LABELS = {0: "apple", 1: "pear", 2: "plum"}

# class, config class, extra config, prefix tokens (class, distillation, registers), classes, input size
CASES = {
    "vit": ("ViTForImageClassification", "ViTConfig", {}, (True, False, 0), 3),
    "deit": ("DeiTForImageClassification", "DeiTConfig", {}, (True, True, 0), 3),
    "deit-teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", {}, (True, True, 0), 3),
    "dinov2": ("Dinov2Model", "Dinov2Config", {}, (True, False, 0), 0),
    "dinov2-registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", {"num_register_tokens": 4},
                         (True, False, 4), 0),
    "beit": ("BeitForImageClassification", "BeitConfig", {"use_relative_position_bias": True}, (True, False, 0), 3),
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", {"projection_dim": 16}, (True, False, 0), 0),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", {}, (False, False, 0), 0),
}  # fmt: skip

MEAN, STD = [0.1, 0.2, 0.3], [0.6, 0.5, 0.4]


def _peaky_(model: torch.nn.Module) -> None:
    """Scale every query and key projection by 4 so the attention is far from uniform."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("query.weight", "key.weight", "q_proj.weight", "k_proj.weight")):
                param.mul_(4.0)


def _save(case: str, folder: Path, *, processor: dict | None = None) -> torch.nn.Module:
    """A tiny random model of one case saved with save_pretrained, plus its preprocessor_config.json."""
    class_name, config_name, extra, _prefix, classes = CASES[case]
    kwargs = dict(TINY, image_size=32, patch_size=8, **extra)
    if classes:
        kwargs.update(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config)
    _peaky_(model)
    model.save_pretrained(folder)
    size = {"height": 32, "width": 32}
    (folder / "preprocessor_config.json").write_text(
        json.dumps(processor or {"do_normalize": True, "image_mean": MEAN, "image_std": STD, "size": size})
    )
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {}
    for case in CASES:
        folder = tmp_path_factory.mktemp(case)
        _save(case, folder)
        folders[case] = folder
    return folders


def _reference(folder: Path, class_name: str) -> torch.nn.Module:
    """transformers' own model from the folder, on its eager path (independent of vitviz's loader)."""
    return getattr(transformers, class_name).from_pretrained(str(folder), attn_implementation="eager").eval()


@pytest.mark.parametrize("case", list(CASES))
def test_layout_classes_and_normalisation_come_from_the_folder(case: str, saved: dict[str, Path]) -> None:
    loaded = load_model(f"hf:{saved[case]}")
    class_name, _config, _extra, (has_cls, has_dist, registers), classes = CASES[case]
    layout = token_layout(loaded.model)
    assert loaded.meta.arch == class_name
    assert layout.img_size == (32, 32) and layout.grid == (4, 4) and layout.stride == (8, 8)
    assert (layout.has_class_token, layout.has_dist_token, layout.num_reg_tokens) == (has_cls, has_dist, registers)
    assert layout.num_prefix_tokens == int(has_cls) + int(has_dist) + registers
    assert loaded.meta.mean == pytest.approx(tuple(MEAN)) and loaded.meta.std == pytest.approx(tuple(STD))
    assert loaded.meta.input_size == (32, 32) and loaded.meta.in_chans == 3
    assert loaded.meta.class_names == ([LABELS[i] for i in range(3)] if classes else [])
    assert loaded.model.num_classes == classes and len(loaded.model.blocks) == 2
    assert unreadable_reason(loaded.model) is None
    # The sequence transformers really builds has exactly these prefix tokens before the 4 x 4 patches.
    reference = _reference(saved[case], class_name)
    with torch.no_grad():
        out = reference(pixel_values=torch.randn(1, 3, 32, 32), output_attentions=True)
    assert out.attentions[0].shape[-1] == layout.num_tokens


@pytest.mark.parametrize("case", list(CASES))
def test_captured_attention_equals_transformers_own(case: str, saved: dict[str, Path]) -> None:
    loaded = load_model(f"hf:{saved[case]}")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captured = attention_maps(loaded.model, images)
    reference = _reference(saved[case], CASES[case][0])
    with torch.no_grad():
        expected = reference(pixel_values=images, output_attentions=True).attentions
    assert len(captured) == len(expected) == 2
    for mine, theirs in zip(captured, expected):
        assert torch.equal(mine, theirs)
    # peaky weights: a wrong token or layer would show (rows far from uniform)
    assert float(expected[-1].amax(dim=-1).mean()) > 2.0 / expected[-1].shape[-1]


@pytest.mark.parametrize("case", ["vit", "deit-teacher", "dinov2-registers", "beit", "siglip"])
def test_attention_gradients_equal_autograd_through_transformers(case: str, saved: dict[str, Path]) -> None:
    loaded = load_model(f"hf:{saved[case]}")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    grads = attention_gradients(loaded.model, images, target_class=1)
    reference = _reference(saved[case], CASES[case][0])
    out = reference(pixel_values=images, output_attentions=True)
    logits = out.logits if CASES[case][4] else out.pooler_output
    expected = torch.autograd.grad(logits[:, 1].sum(), out.attentions)
    torch.testing.assert_close(grads.logits, logits.detach(), rtol=0, atol=1e-6)
    for mine, theirs in zip(grads.gradients, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
        assert float(theirs.abs().amax()) > 0


def test_rollout_and_gradient_rollout_run_through_the_pipeline(saved: dict[str, Path]) -> None:
    from vitviz.pipeline import AnalysisOptions, image_analyses

    loaded = load_model(f"hf:{saved['deit']}")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    results = image_analyses(loaded, images, ["rollout", "gradient-rollout", "distance"], AnalysisOptions())
    assert len(results.rollouts) == 3 and results.rollouts[0].map.shape == (4, 4)
    assert len(results.gradients) == 3 and results.gradients[0].map.shape == (4, 4)
    assert results.top5[0][0].name in LABELS.values()
    # rollout from the class token of transformers' own attentions (mean over heads, identity added, renormalised)
    reference = _reference(saved["deit"], "DeiTForImageClassification")
    with torch.no_grad():
        attentions = reference(pixel_values=images, output_attentions=True).attentions
    joint = torch.eye(attentions[0].shape[-1], dtype=torch.float64).expand(3, -1, -1)
    for attn in attentions:
        fused = attn.double().mean(dim=1) + torch.eye(attn.shape[-1], dtype=torch.float64)
        joint = (fused / fused.sum(dim=-1, keepdim=True)) @ joint
    expected = joint[:, 0, 2:].reshape(3, 4, 4)
    for result, want in zip(results.rollouts, expected):
        got = torch.from_numpy(result.map).double()
        torch.testing.assert_close(got / got.sum(), want / want.sum(), rtol=1e-5, atol=1e-7)


def test_cli_analyze_runs_end_to_end(saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from vitviz.cli import main

    image = tmp_path / "a.png"
    Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy()).save(image)
    out = tmp_path / "out.json"
    code = main(["analyze", f"hf:{saved['dinov2-registers']}", "--images", str(image), "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Loading weights" not in err  # transformers' progress bar stays off for a local folder
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # ...and is back on for whoever else uses transformers
    report = json.loads(out.read_text())
    assert report["model"]["num_prefix_tokens"] == 5 and report["model"]["grid"] == [4, 4]
    assert set(report) >= {"distance", "rollout", "gradient_rollout"}, sorted(report)


def test_dinov2_takes_the_processor_crop_size(tmp_path: Path) -> None:
    processor = {
        "do_normalize": True,
        "image_mean": MEAN,
        "image_std": STD,
        "do_center_crop": True,
        "crop_size": {"height": 48, "width": 40},
        "size": {"shortest_edge": 56},
    }
    _save("dinov2", tmp_path, processor=processor)
    loaded = load_model(f"hf:{tmp_path}")
    layout = token_layout(loaded.model)
    assert loaded.meta.input_size == (48, 40) and layout.grid == (6, 5)
    captured = attention_maps(loaded.model, torch.randn(1, 3, 48, 40))
    assert captured[0].shape[-1] == 1 + 30


def test_hub_name_offline_gives_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no request leaves the machine
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(VitvizError) as error:
        load_model("hf:google/vit-base-patch16-224")
    message = str(error.value)
    assert "\n" not in message
    assert "cannot download hf:google/vit-base-patch16-224" in message and "local folder" in message


@pytest.mark.parametrize(
    ("files", "needle"),
    [({"config.json": {"architectures": ["BertModel"]}}, "BertModel"), ({}, "config.json")],
)
def test_unsupported_folders_are_refused_in_one_line(tmp_path: Path, files: dict, needle: str) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(VitvizError, match=needle):
        load_model(f"hf:{tmp_path}")
