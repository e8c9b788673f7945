"""The analysis registry (vitviz/analyses): every analysis is declared once, and the CLI's choices, options, JSON
and figures, the support survey and the pipeline all read the declarations. A toy analysis registered here (one
declaration, nothing else edited) shows everywhere an analysis shows."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vitviz import analyses as registry
from vitviz import pipeline, support
from vitviz.analyses import Analysis, FigureContext, Option, PairContext, PairStream, Stream, StreamContext
from vitviz.cli import build_parser, main
from vitviz.errors import VitvizError
from vitviz.models import load_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
SAMPLE = ROOT / "assets" / "samples" / "circle.png"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _MeanFeature(Stream):
    """The mean of each image's final features: fed by the shared forward's features hook."""

    def __init__(self, context: StreamContext) -> None:
        self.means: list[np.ndarray] = []
        self.features = lambda features: self.means.append(features.double().mean(dim=(1, 2)).cpu().numpy())

    def result(self, blocks_unfit: str | None) -> np.ndarray:
        return np.concatenate(self.means)


def _figures(result: np.ndarray, context: FigureContext) -> Iterator[tuple[str, Any]]:
    from matplotlib.figure import Figure

    for stem, value in zip(context.stems, result):
        figure = Figure()
        axes = figure.add_subplot()
        axes.bar([0], [value])
        yield f"mean-feature-{stem}", figure


@pytest.fixture
def toy() -> Iterator[Analysis]:
    analysis = registry.register(
        Analysis(
            name="mean-feature",
            section="mean_feature",
            summary="each image's mean final feature",
            order=1000,
            stream=_MeanFeature,
            to_json=lambda result, images: [{"image": n, "mean": float(v)} for n, v in zip(images, result)],
            figures=_figures,
        )
    )
    yield analysis
    registry.unregister(analysis.name)


def test_a_new_analysis_shows_in_the_cli_json_figures_pipeline_and_support_table(toy: Analysis, tmp_path: Path) -> None:
    out, figures = tmp_path / "out.json", tmp_path / "figures"
    code = main(["analyze", str(DEFAULT), "--images", str(SAMPLE), "--analyses", "mean-feature,distance"])
    assert code == 2  # nothing to write: the usual one-line refusal, so the name itself was accepted
    argv = ["analyze", str(DEFAULT), "--images", str(SAMPLE), "--analyses", "mean-feature,distance"]
    assert main([*argv, "--json", str(out), "--figures", str(figures)]) == 0
    document = json.loads(out.read_text(encoding="utf-8"))
    assert list(document) == ["model", "distance", "mean_feature"]  # the registry's order
    loaded = load_model(str(DEFAULT))
    from vitviz.cli import _load_images

    image = _load_images([SAMPLE], loaded)[0]
    with torch.no_grad():
        want = loaded.model.forward_features(image[None]).double().mean().item()
    assert document["mean_feature"] == [{"image": str(SAMPLE), "mean": pytest.approx(want, rel=1e-6)}]
    assert (figures / "mean-feature-000-circle.png").is_file() and (figures / "distance.png").is_file()
    results = pipeline.image_analyses(loaded, image[None], ["mean-feature"], pipeline.AnalysisOptions())
    assert results["mean-feature"].shape == (1,)
    assert "mean-feature" in support.sections()
    assert support.analyse(loaded, image[None].repeat(2, 1, 1, 1))["mean-feature"] == "ok"
    assert "mean-feature" in _analyze_help()


def _analyze_help() -> str:
    """`analyze --help` on one line (argparse wraps lines, also at the hyphen of "head-maps")."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return " ".join(sub.choices["analyze"].format_help().split()).replace("- ", "-")


def test_the_cli_offers_every_registered_analysis_and_option_with_its_declared_default() -> None:
    help_text = _analyze_help()
    for name in registry.names():
        assert name in help_text
    analyze = next(a for a in build_parser()._actions if a.dest == "command").choices["analyze"]
    defaults = {action.dest: action.default for action in analyze._actions}
    fields = {f.name: f.default for f in dataclasses.fields(pipeline.AnalysisOptions)}
    assert list(fields) == [o.name for o in registry.options()]
    for option in registry.options():
        assert option.flag in help_text
        assert defaults[option.name] == fields[option.name] == option.default


def test_options_are_checked_where_they_are_declared() -> None:
    with pytest.raises(VitvizError, match="^--components must be at least 1, got 0$"):
        pipeline.AnalysisOptions(components=0)
    with pytest.raises(VitvizError, match="^--head-fusion must be one of mean, max, min, got 'median'$"):
        pipeline.AnalysisOptions(head_fusion="median")
    assert pipeline.AnalysisOptions(mass_share=1.0).mass_share == 1.0


def test_an_option_declared_by_an_analysis_becomes_a_field_with_its_check() -> None:
    toy = Analysis(
        name="toy-with-option",
        section="toy_with_option",
        summary="a toy",
        order=1001,
        options=(Option("toy_width", 3, "a width", int, lambda v: None if v > 0 else "must be positive"),),
        compute=lambda loaded, options: options.toy_width,
        to_json=lambda result, images: result,
    )
    registry.register(toy)
    try:
        options_class = registry._make_options_class()
        assert options_class().toy_width == 3
        with pytest.raises(VitvizError, match="^--toy-width must be positive, got 0$"):
            options_class(toy_width=0)
        analyze = next(a for a in build_parser()._actions if a.dest == "command").choices["analyze"]
        assert analyze.parse_args(["m", "--toy-width", "5"]).toy_width == 5
    finally:
        registry.unregister(toy.name)


def test_names_and_sections_are_registered_once() -> None:
    existing = registry.get("distance")
    with pytest.raises(ValueError, match="registered already"):
        registry.register(existing)
    with pytest.raises(ValueError, match="registered already"):
        registry.register(dataclasses.replace(existing, name="another-distance"))
    with pytest.raises(TypeError, match="exactly one of compute, stream and pair"):
        Analysis(name="x", section="x", summary="", order=0, to_json=lambda r, i: r)
    with pytest.raises(VitvizError, match="unknown analysis 'nope': choose from filters,position,"):
        registry.get("nope")


def test_every_analysis_declares_what_it_shows() -> None:
    declared: Sequence[Analysis] = registry.analyses()
    assert [a.name for a in declared] == list(pipeline.ANALYSES)
    assert pipeline.DEFAULT_ANALYSES == ("filters", "position", "distance", "rollout", "gradient-rollout")
    for analysis in declared:
        assert analysis.summary and analysis.figures is not None, analysis.name
    from vitviz.analysis.distance import DISTANCE_MODES
    from vitviz.analysis.rollout import HEAD_FUSIONS

    # The declared choices are the kernels' own.
    assert registry.get("distance").options[0].choices == DISTANCE_MODES
    assert registry.get("rollout").options[0].choices == HEAD_FUSIONS


def test_figures_take_the_colormap_and_a_wrong_name_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["analyze", str(DEFAULT), "--images", str(SAMPLE), "--analyses", "rollout", "--figures"]
    assert main([*argv, str(tmp_path / "bad"), "--colormap", "no-such-map"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "vitviz: error: --colormap 'no-such-map' is not a matplotlib colour map (for example viridis, magma, jet)"
    ]
    from PIL import Image

    pictures = {}
    for name in ("viridis", "magma"):
        assert main([*argv, str(tmp_path / name), "--colormap", name]) == 0
        pictures[name] = np.asarray(Image.open(tmp_path / name / "rollout-000-circle.png").convert("RGB"))
    assert pictures["viridis"].shape == pictures["magma"].shape
    assert not np.array_equal(pictures["viridis"], pictures["magma"])


class _FirstBlockGap(PairStream):
    """Per image, model B's first-block output norm minus model A's: fed by both models' forwards."""

    def __init__(self, context: PairContext) -> None:
        self.norms: dict[str, list[float]] = {"a": [], "b": []}
        self.blocks_a = (self._consumer("a"),)
        self.blocks_b = (self._consumer("b"),)
        self.sizes: list[int] = []

    def _consumer(self, side: str) -> Any:
        norms = self.norms[side]

        class Consumer:
            def consume(self, layer: int, x: torch.Tensor) -> None:
                if layer == 0:
                    norms.extend(x.double().flatten(1).norm(dim=1).tolist())

        return Consumer()

    def after_batch(self, size: int) -> None:
        self.sizes.append(size)

    def result(self) -> np.ndarray:
        return np.asarray(self.norms["b"]) - np.asarray(self.norms["a"])


@pytest.fixture
def toy_pair() -> Iterator[Analysis]:
    analysis = registry.register(
        Analysis(
            name="first-block-gap",
            section="first_block_gap",
            summary="B's first-block norm minus A's, per image",
            order=1000,
            pair=_FirstBlockGap,
            to_json=lambda result, images: dict(zip(images, result.tolist())),
        )
    )
    yield analysis
    registry.unregister(analysis.name)


def test_a_comparison_of_two_models_is_its_own_kind(toy_pair: Analysis, tmp_path: Path) -> None:
    assert toy_pair.on_pairs and not toy_pair.on_images
    assert "first-block-gap" in registry.pair_names() and "first-block-gap" not in registry.names()
    assert toy_pair not in registry.analyses()
    with pytest.raises(VitvizError, match="unknown analysis first-block-gap"):
        registry.parse("first-block-gap")
    with pytest.raises(TypeError, match="exactly one of compute, stream and pair"):
        dataclasses.replace(toy_pair, stream=_MeanFeature)
    other = ROOT / "assets" / "checkpoints" / "shapes-hybrid.safetensors"
    out = tmp_path / "out.json"
    argv = ["compare", str(DEFAULT), str(other), "--dataset", "shapes", "--limit", "5", "--batch-size", "4"]
    assert main([*argv, "--json", str(out)]) == 0
    document = json.loads(out.read_text(encoding="utf-8"))
    assert list(document)[:4] == ["models", "dataset", "cka", "first_block_gap"]  # the registry's order
    assert list(document["first_block_gap"]) == [f"shapes:test[{i}]" for i in range(5)]
    with pytest.raises(VitvizError, match="an analysis of one model"):
        loaded = load_model(str(DEFAULT))
        pipeline.pair_analyses(loaded, loaded, [], ["distance"], pipeline.AnalysisOptions())
