"""The registry of map methods (vitviz.methods): declared once, listed by --methods, looked up by name, and a
new method reaches the faithfulness comparison without any change to vitviz.faithfulness.

The registered methods' numbers are checked against their definitions in tests/test_faithfulness.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch

from tests.fakes import OpaqueAttention
from vitviz import method_names as method_list
from vitviz.capture import capture_attention
from vitviz.errors import VitvizError
from vitviz.faithfulness import (
    DEFAULT_METHODS,
    METHODS,
    FaithfulnessOptions,
    explanation_maps,
    parse_methods,
    run_faithfulness,
)
from vitviz.methods import (
    BASELINE,
    KINDS,
    MapBatch,
    attention_maps_and_logits,
    default_method_names,
    get_method,
    method_names,
    register_method,
    unregister_method,
)
from vitviz.models import load_model
from vitviz.tokens import token_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHECKPOINTS = Path(__file__).resolve().parents[1] / "assets" / "checkpoints"
REGISTERED = (
    "rollout",
    "gradient-rollout",
    "attention-last",
    "integrated-gradients",
    "occlusion",
    "random",
    "grad-cam",
    "attnlrp",
)
NOT_DEFAULT = ("occlusion", "grad-cam", "attnlrp")
TOY = "toy-centre"


def _model(num_classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=num_classes
    ).eval()


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def toy_method() -> Iterator[str]:
    """A method registered for one test: each patch's distance to the grid's centre plus the image's seed."""

    @register_method(TOY, label="Toy", kind=BASELINE, description="A toy map for the tests.", default=False)
    def _toy(batch: MapBatch) -> torch.Tensor:
        gh, gw = batch.layout.grid
        rows = torch.arange(gh, dtype=torch.float64)[:, None] - (gh - 1) / 2
        cols = torch.arange(gw, dtype=torch.float64)[None, :] - (gw - 1) / 2
        centre = -(rows**2 + cols**2)
        return torch.stack([centre + index for index in batch.indices])

    try:
        yield TOY
    finally:
        if TOY in method_names():
            unregister_method(TOY)


def test_the_registered_methods_are_the_methods_and_defaults() -> None:
    assert method_names() == REGISTERED == METHODS == method_list.METHODS  # the CLI's torch-free names
    assert set(method_list.COMPARE_METHODS) <= set(method_list.DEFAULT_METHODS)
    assert default_method_names() == DEFAULT_METHODS == tuple(m for m in REGISTERED if m not in NOT_DEFAULT)
    assert DEFAULT_METHODS == method_list.DEFAULT_METHODS
    for name in REGISTERED:
        method = get_method(name)
        assert method.name == name and method.label and method.description and method.kind in KINDS
    assert get_method("random").kind == BASELINE and not get_method("random").needs_logits
    assert get_method("gradient-rollout").needs_attention and get_method("gradient-rollout").needs_logits
    assert get_method("rollout").needs_attention and not get_method("rollout").needs_logits


def test_every_registered_name_passes_methods_validation() -> None:
    assert parse_methods(",".join(method_names())) == list(method_names())
    assert FaithfulnessOptions(methods=method_names()).methods == method_names()
    assert parse_methods(None) == list(default_method_names())


def test_an_unknown_method_is_one_line_listing_every_name(capsys: pytest.CaptureFixture[str]) -> None:
    for call in (lambda: get_method("saliency"), lambda: parse_methods("rollout,saliency")):
        with pytest.raises(VitvizError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and message.startswith("unknown method saliency: choose from ")
        assert message.endswith(",".join(REGISTERED))

    from vitviz.cli import main

    argv = ["faithfulness", str(CHECKPOINTS / "shapes-default.safetensors"), "--methods", "saliency", "--json", "-"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(name in err for name in REGISTERED)


def test_a_registered_method_reaches_parse_methods_maps_and_the_json(toy_method: str) -> None:
    assert toy_method in method_names() and toy_method not in default_method_names()
    assert parse_methods(f"rollout,{toy_method}") == ["rollout", toy_method]
    model, images = _model(), _images()
    targets = torch.zeros(3, dtype=torch.long)
    maps = explanation_maps(model, images, toy_method, targets, image_indices=[4, 0, 9], batch_size=2)
    centre = torch.tensor([[-4.5, -2.5, -2.5, -4.5], [-2.5, -0.5, -0.5, -2.5]], dtype=torch.float64)
    assert maps.dtype == torch.float64 and maps.shape == (3, 4, 4)
    assert torch.equal(maps[1, :2], centre) and torch.equal(maps[2], maps[1] + 9)

    options = FaithfulnessOptions(methods=("random", toy_method), steps=4)
    result = run_faithfulness(model, images, ["a", "b", "c"], options)
    assert list(result.methods) == ["random", toy_method]
    assert torch.equal(result.methods[toy_method].per_image[2].map, maps[2] - 9 + 2)  # seeds default to 0..B-1
    document = json.loads(json.dumps(result.to_json({})))
    assert list(document["methods"]) == ["random", toy_method]


def test_unregistering_removes_the_method(toy_method: str) -> None:
    unregister_method(toy_method)
    assert toy_method not in method_names()
    with pytest.raises(VitvizError, match="unknown method"):
        parse_methods(toy_method)


def test_a_declaration_is_checked() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method("rollout", label="R", kind=BASELINE, description="again")(lambda batch: None)
    with pytest.raises(ValueError, match="kind"):
        register_method("toy-kind", label="T", kind="magic", description="")
    with pytest.raises(ValueError, match="commas"):
        register_method("a,b", label="T", kind=BASELINE, description="")
    assert get_method("rollout").label == "Rollout" and "toy-kind" not in method_names()


def test_not_applicable_gives_one_line_reasons() -> None:
    model = _model()
    assert all(get_method(name).not_applicable(model) is None for name in REGISTERED)
    loaded = load_model(str(CHECKPOINTS / "shapes-default.safetensors"))
    assert all(get_method(name).not_applicable(loaded) is None for name in REGISTERED)  # a LoadedModel too

    headless = _model(num_classes=0)
    for name in ("gradient-rollout", "integrated-gradients", "occlusion", "grad-cam", "attnlrp"):
        reason = get_method(name).not_applicable(headless)
        assert reason is not None and "\n" not in reason and "no classifier head" in reason and name in reason
    assert get_method("rollout").not_applicable(headless) is None

    opaque = _model()
    opaque.blocks[0].attn = OpaqueAttention(opaque.embed_dim)
    opaque.eval()
    for name in ("rollout", "gradient-rollout", "attention-last"):
        reason = get_method(name).not_applicable(opaque)
        assert reason is not None and "\n" not in reason and "OpaqueAttention" in reason
    assert get_method("random").not_applicable(opaque) is None
    assert get_method("integrated-gradients").not_applicable(opaque) is None
    with pytest.raises(VitvizError, match="OpaqueAttention"):
        explanation_maps(opaque, _images(), "rollout", torch.zeros(3, dtype=torch.long))


def test_attention_maps_and_logits_is_one_capture_forward() -> None:
    model, images = _model(), _images()
    maps, logits = attention_maps_and_logits(model, images, ["rollout", "attention-last"])
    targets = torch.zeros(3, dtype=torch.long)
    for name in ("rollout", "attention-last"):
        assert torch.equal(maps[name].cpu(), explanation_maps(model, images, name, targets))
    consumer = get_method("rollout").consumer(model, token_layout(model))
    assert torch.equal(logits, capture_attention(model, images, consumer))
    with pytest.raises(ValueError, match="does not stream attention"):
        attention_maps_and_logits(model, images, ["random"])
