"""The analyses the pages ask for: `vitviz.pipeline`'s service, with image analyses kept in the disk cache.

No streamlit here. Images come in as `InputImage`s (decoded pixels plus a content hash); each function
preprocesses them, calls the service and returns its typed result. Image analyses are stored as .npz
arrays keyed by the model's content hash, the images' content hashes and every parameter; the results are
turned into arrays and back only here, at the cache boundary.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from vitviz import pipeline
from vitviz.comparison import Comparison, ModelAUCs, compare_models, slice_batches
from vitviz.comparison import model_aucs as comparison_model_aucs
from vitviz.data.stream import DatasetSlice
from vitviz.errors import VitvizError
from vitviz.faithfulness import (
    Convergence,
    FaithfulnessOptions,
    FaithfulnessResult,
    ImageCurves,
    MethodResult,
    SanityResult,
    run_faithfulness,
)
from vitviz.images import preprocess, to_display
from vitviz.models import LoadedModel
from vitviz.pipeline import (
    AnalysisOptions,
    DistanceResult,
    FilterResult,
    GradientRolloutResult,
    ImageAttention,
    NotApplicable,
    PositionResult,
    Progress,
    ResampledPosition,
)
from vitviz.ui.catalog import cache_dir
from vitviz.ui.diskcache import DiskCache, cache_key

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


@dataclass(frozen=True)
class InputImage:
    """An image to analyse: decoded upright RGB pixels, a name to show and a content hash for caches."""

    name: str
    digest: str
    pixels: np.ndarray  # uint8 [H, W, 3]


def pixels_digest(pixels: np.ndarray) -> str:
    """Content hash of decoded pixels (for images that do not come from a file)."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def analysis_cache() -> DiskCache:
    """The on-disk cache of image analyses, under the app's cache folder."""
    return DiskCache(cache_dir() / "analyses")


def model_input(loaded: LoadedModel, image: InputImage) -> torch.Tensor:
    """The image preprocessed for the model (the preprocessing of docs/design.md), [C, H, W]."""
    meta = loaded.meta
    return preprocess(
        Image.fromarray(image.pixels), input_size=meta.input_size, mean=meta.mean, std=meta.std, in_chans=meta.in_chans
    )


def display_picture(loaded: LoadedModel, image: InputImage) -> np.ndarray:
    """What the model sees, as uint8 [H, W, 3] at its input size, for overlays."""
    return to_display(model_input(loaded, image), loaded.meta.mean, loaded.meta.std)


class ModelInputs(Sequence[torch.Tensor]):
    """The images preprocessed one at a time as the service's batch loop reads them."""

    def __init__(self, loaded: LoadedModel, images: Sequence[InputImage]) -> None:
        self.loaded = loaded
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return model_input(self.loaded, self.images[index])


def cached_result(
    analysis: str,
    key: str,
    compute: Callable[[], Result],
    to_arrays: Callable[[Result], Mapping[str, np.ndarray]],
    from_arrays: Callable[[Mapping[str, np.ndarray]], Result],
) -> Result:
    """The result stored under `key`, else computed and stored; an entry that does not decode is recomputed."""
    cache = analysis_cache()
    stored = cache.get(analysis, key)
    if stored is not None:
        try:
            return from_arrays(stored)
        except (KeyError, ValueError, TypeError) as exc:
            logger.warning("recomputing cache entry %s/%s of an older layout (%s)", analysis, key[:12], exc)
    result = compute()
    cache.put(analysis, key, to_arrays(result))
    return result


# --- analyses of the weights (cheap; the pages keep them in streamlit's memory cache) ----------------------


def filters(loaded: LoadedModel) -> FilterResult | NotApplicable:
    """Every principal component of the patch-embedding filters, or why the model has none."""
    return pipeline.filters(loaded, components=None)


def position(loaded: LoadedModel) -> PositionResult | NotApplicable:
    """Cosine similarity of the position embeddings, or why the model has none."""
    return pipeline.position(loaded)


def resampled_position(loaded: LoadedModel, new_size: tuple[int, int]) -> ResampledPosition:
    """Position similarity after resampling the model to `new_size` pixels."""
    return pipeline.resampled_position(loaded, new_size)


# --- analyses of images (disk cache) ---------------------------------------------------------------------


def attention_distance(
    loaded: LoadedModel,
    images: Sequence[InputImage],
    options: AnalysisOptions,
    progress: Progress | None = None,
) -> DistanceResult:
    """Mean attention distance over `images` in `options.distance_mode`, `options.batch_size` images per forward.

    `progress(done, total)` is called after every batch (and once at the end when the result was cached).
    """
    key = cache_key(
        "distance",
        model=loaded.content_hash,
        images=[image.digest for image in images],
        mode=options.distance_mode,
    )

    def compute() -> DistanceResult:
        results = pipeline.image_analyses(loaded, ModelInputs(loaded, images), ("distance",), options, progress)
        if isinstance(results.distance, NotApplicable):  # never cached: the reason is shown as one line
            raise VitvizError(f"attention distance does not apply to this model: {results.distance.reason}")
        assert results.distance is not None
        return results.distance

    result = cached_result("distance", key, compute, DistanceResult.to_arrays, DistanceResult.from_arrays)
    if progress is not None:
        progress(len(images), len(images))
    return result


def image_attention(
    loaded: LoadedModel, image: InputImage, options: AnalysisOptions, query_index: int = 0
) -> ImageAttention:
    """One forward: the rollout map with `options`' rollout settings, class probabilities and the attention
    of token `query_index` in every layer and head."""
    key = cache_key(
        "image-attention",
        model=loaded.content_hash,
        image=image.digest,
        head_fusion=options.head_fusion,
        discard_ratio=options.discard_ratio,
        start_layer=options.start_layer,
        query_index=query_index,
    )
    return cached_result(
        "image-attention",
        key,
        lambda: pipeline.image_attention(loaded, model_input(loaded, image), options, query_index),
        ImageAttention.to_arrays,
        ImageAttention.from_arrays,
    )


def gradient_map(loaded: LoadedModel, image: InputImage, target_class: int | None) -> GradientRolloutResult:
    """Gradient-weighted rollout for `target_class` (None: the predicted class), with the class used."""
    key = cache_key("gradient-rollout", model=loaded.content_hash, image=image.digest, target=target_class)
    return cached_result(
        "gradient-rollout",
        key,
        lambda: pipeline.gradient_rollout_map(loaded, model_input(loaded, image), target_class),
        GradientRolloutResult.to_arrays,
        GradientRolloutResult.from_arrays,
    )


# --- faithfulness: which map to trust (disk cache) ---------------------------------------------------------


def faithfulness(
    loaded: LoadedModel,
    images: Sequence[InputImage],
    options: FaithfulnessOptions,
    progress: Callable[[str, int], None] | None = None,
) -> FaithfulnessResult:
    """`vitviz.faithfulness.run_faithfulness` on `images` (the same numbers as `python -m vitviz faithfulness`).

    Cached on disk by the model's content hash, the images' content hashes and every option; the images' names
    are not part of the key, so a cached result is given the names of `images`. `progress(method, images
    finished)` is passed to the computation (not called when the result was cached).
    """
    key = cache_key(
        "faithfulness",
        model=loaded.content_hash,
        images=[image.digest for image in images],
        methods=list(options.methods),
        steps=options.steps,
        target=options.target_class,
        sanity=options.sanity,
        batch_size=options.batch_size,
        ig_steps=options.ig_steps,
        ig_max_steps=options.ig_max_steps,
    )
    names = [image.name for image in images]

    def compute() -> FaithfulnessResult:
        if not images:
            raise VitvizError("faithfulness needs at least one image")
        parameter = next(loaded.model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        inputs = torch.stack([model_input(loaded, image) for image in images]).to(device)
        return run_faithfulness(loaded.model, inputs, names, options, progress=progress)

    return cached_result(
        "faithfulness",
        key,
        compute,
        _faithfulness_arrays,
        lambda arrays: _faithfulness_from_arrays(arrays, names),
    )


def _faithfulness_arrays(result: FaithfulnessResult) -> dict[str, np.ndarray]:
    """A FaithfulnessResult as plain arrays (no pickle); method i's arrays are prefixed "m{i}."."""
    arrays: dict[str, np.ndarray] = {
        "steps": np.asarray(result.steps),
        "baseline": np.asarray(result.baseline),
        "target": np.asarray(-1 if result.target_class is None else result.target_class),
        "methods": np.asarray(list(result.methods)),
    }
    for index, method in enumerate(result.methods.values()):
        curves = method.per_image
        prefix = f"m{index}."
        arrays[prefix + "deletion_auc"] = np.asarray(method.deletion_auc, dtype=np.float64)
        arrays[prefix + "insertion_auc"] = np.asarray(method.insertion_auc, dtype=np.float64)
        arrays[prefix + "seconds_per_image"] = np.asarray(method.seconds_per_image, dtype=np.float64)
        arrays[prefix + "targets"] = np.asarray([c.target_class for c in curves], dtype=np.int64)
        arrays[prefix + "maps"] = np.stack([c.map.numpy() for c in curves])
        arrays[prefix + "deletion"] = np.stack([c.deletion.numpy() for c in curves])
        arrays[prefix + "insertion"] = np.stack([c.insertion.numpy() for c in curves])
        arrays[prefix + "image_deletion_auc"] = np.asarray([c.deletion_auc for c in curves], dtype=np.float64)
        arrays[prefix + "image_insertion_auc"] = np.asarray([c.insertion_auc for c in curves], dtype=np.float64)
        if method.convergence is not None:
            convergence = method.convergence
            arrays[prefix + "ig_steps"] = np.asarray(convergence.steps, dtype=np.int64)
            arrays[prefix + "completeness_error"] = np.asarray(convergence.errors, dtype=np.float64)
            arrays[prefix + "ig_range"] = np.asarray([convergence.start_steps, convergence.max_steps], dtype=np.int64)
    if result.sanity is not None:
        arrays["sanity.methods"] = np.asarray(list(result.sanity))
        first = next(iter(result.sanity.values()))
        arrays["sanity.randomised"] = np.asarray(list(first.randomised))
        for index, sanity in enumerate(result.sanity.values()):
            arrays[f"s{index}.spearman"] = np.asarray(sanity.spearman, dtype=np.float64)
            arrays[f"s{index}.per_image_spearman"] = np.asarray(sanity.per_image_spearman, dtype=np.float64)
            arrays[f"s{index}.maps"] = sanity.maps.numpy()
    return arrays


def _convergence_from_arrays(arrays: Mapping[str, np.ndarray], prefix: str) -> Convergence | None:
    if prefix + "completeness_error" not in arrays:
        return None
    start, cap = (int(v) for v in arrays[prefix + "ig_range"])
    return Convergence(
        steps=tuple(int(v) for v in arrays[prefix + "ig_steps"]),
        errors=tuple(float(v) for v in arrays[prefix + "completeness_error"]),
        start_steps=start,
        max_steps=cap,
    )


def _faithfulness_from_arrays(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> FaithfulnessResult:
    """Inverse of `_faithfulness_arrays`, the images named `names`; a stored entry of another shape raises."""
    methods: dict[str, MethodResult] = {}
    for index, method in enumerate(str(m) for m in arrays["methods"]):
        prefix = f"m{index}."
        maps, deletion, insertion = (np.asarray(arrays[prefix + part]) for part in ("maps", "deletion", "insertion"))
        if maps.shape[0] != len(names):
            raise ValueError(f"stored for {maps.shape[0]} images, asked for {len(names)}")
        per_image = tuple(
            ImageCurves(
                image=str(names[i]),
                target_class=int(arrays[prefix + "targets"][i]),
                map=torch.from_numpy(maps[i].copy()),
                deletion=torch.from_numpy(deletion[i].copy()),
                insertion=torch.from_numpy(insertion[i].copy()),
                deletion_auc=float(arrays[prefix + "image_deletion_auc"][i]),
                insertion_auc=float(arrays[prefix + "image_insertion_auc"][i]),
            )
            for i in range(len(names))
        )
        methods[method] = MethodResult(
            method=method,
            deletion_auc=float(arrays[prefix + "deletion_auc"]),
            insertion_auc=float(arrays[prefix + "insertion_auc"]),
            seconds_per_image=float(arrays[prefix + "seconds_per_image"]),
            per_image=per_image,
            convergence=_convergence_from_arrays(arrays, prefix),
        )
    sanity: dict[str, SanityResult] | None = None
    if "sanity.methods" in arrays:
        randomised = tuple(str(stage) for stage in arrays["sanity.randomised"])
        sanity = {
            str(method): SanityResult(
                method=str(method),
                randomised=randomised,
                spearman=tuple(float(v) for v in arrays[f"s{index}.spearman"]),
                per_image_spearman=tuple(
                    tuple(float(v) for v in row) for row in np.asarray(arrays[f"s{index}.per_image_spearman"])
                ),
                maps=torch.from_numpy(np.asarray(arrays[f"s{index}.maps"]).copy()),
            )
            for index, method in enumerate(arrays["sanity.methods"])
        }
    target = int(arrays["target"])
    return FaithfulnessResult(
        steps=int(arrays["steps"]),
        baseline=str(arrays["baseline"]),
        target_class=None if target < 0 else target,
        methods=methods,
        sanity=sanity,
    )


# --- what changed between two models (disk cache) ----------------------------------------------------------


def comparison(
    loaded_a: LoadedModel,
    loaded_b: LoadedModel,
    slice_: DatasetSlice,
    options: AnalysisOptions,
    progress: Callable[[int], None] | None = None,
    faithfulness: FaithfulnessOptions | None = None,
) -> Comparison:
    """`vitviz.comparison.compare_models` of model A and model B on a data-set slice (the numbers of `python -m
    vitviz compare A B --dataset ...`, with `faithfulness` those of its --methods and --steps), cached on disk by
    both models' content hashes, the slice and the options. `progress(units)` is called after every batch of every
    pass (not when the result was cached)."""
    import dataclasses

    key = cache_key(
        "comparison",
        a=loaded_a.content_hash,
        b=loaded_b.content_hash,
        dataset=slice_.describe(),
        options=dataclasses.asdict(options),
        faithfulness=None if faithfulness is None else dataclasses.asdict(faithfulness),
    )

    def compute() -> Comparison:
        open_batches, names, classes = slice_batches(slice_, (loaded_a, loaded_b), options.batch_size)
        return compare_models(
            loaded_a,
            loaded_b,
            open_batches,
            options,
            image_names=names,
            dataset_classes=classes,
            progress=progress,
            faithfulness=faithfulness,
        )

    return cached_result("comparison", key, compute, Comparison.to_arrays, Comparison.from_arrays)


def model_aucs(
    loaded: LoadedModel,
    slice_: DatasetSlice,
    faithfulness: FaithfulnessOptions,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> ModelAUCs:
    """One model's deletion and insertion AUCs of `faithfulness.methods` on a data-set slice, each image explaining
    the model's own prediction (`vitviz.comparison.model_aucs`, the numbers `python -m vitviz compare` writes),
    cached on disk by the model's content hash, the slice and the options; `batch_size` images are read at a
    time. /compare's "What changed" draws the rest of a comparison first, then asks for these per model."""
    import dataclasses

    options = dataclasses.replace(faithfulness, target_class=None, sanity=False)
    key = cache_key(
        "model-aucs", model=loaded.content_hash, dataset=slice_.describe(), faithfulness=dataclasses.asdict(options)
    )

    def compute() -> ModelAUCs:
        open_batches, names, _ = slice_batches(slice_, (loaded,), batch_size)
        return comparison_model_aucs(loaded, open_batches(loaded), options, names, progress)

    def read(arrays: Mapping[str, np.ndarray]) -> ModelAUCs:
        found = ModelAUCs.from_arrays(arrays, "")
        if found is None:
            raise KeyError("no AUCs stored")
        return found

    return cached_result("model-aucs", key, compute, lambda aucs: aucs.to_arrays(""), read)


# --- any registered analysis, as the CLI writes it (disk cache) ---------------------------------------------


@dataclass(frozen=True)
class AnalysisOutput:
    """What `python -m vitviz analyze --analyses NAME --json --figures` writes for one analysis: its JSON section
    and its figures as PNG bytes (file stem, bytes); `not_applicable` is the reason when it does not apply."""

    section: str  # JSON text
    figures: tuple[tuple[str, bytes], ...]
    not_applicable: str | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "section": np.asarray(self.section),
            "stems": np.asarray([stem for stem, _ in self.figures], dtype=str),
            "not_applicable": np.asarray(self.not_applicable or ""),
        }
        arrays.update({f"png.{i}": np.frombuffer(png, dtype=np.uint8) for i, (_, png) in enumerate(self.figures)})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> AnalysisOutput:
        stems = [str(stem) for stem in arrays["stems"]]
        pngs = [np.asarray(arrays[f"png.{i}"], dtype=np.uint8).tobytes() for i in range(len(stems))]
        return cls(
            section=str(arrays["section"]),
            figures=tuple(zip(stems, pngs)),
            not_applicable=str(arrays["not_applicable"]) or None,
        )


def registered_analysis(
    loaded: LoadedModel, name: str, images: Sequence[InputImage], options: AnalysisOptions
) -> AnalysisOutput:
    """One registered analysis on `images` (ignored by analyses of the weights): the JSON section and the figures
    the CLI writes, through the same registry and pipeline."""
    import dataclasses
    import io
    import json

    from vitviz import analyses as registry

    analysis = registry.get(name)
    shown = images if analysis.on_images else []
    key = cache_key(
        f"analysis-{name}",
        model=loaded.content_hash,
        images=[image.digest for image in shown],
        options=dataclasses.asdict(options),
    )

    def compute() -> AnalysisOutput:
        inputs = ModelInputs(loaded, shown)
        result = pipeline.run_analysis(loaded, name, inputs, options)
        section = json.dumps(registry.section(analysis, result, [image.name for image in shown]))
        if isinstance(result, NotApplicable):
            return AnalysisOutput(section=section, figures=(), not_applicable=result.reason)
        figures = []
        for stem, figure in pipeline.analysis_figures(loaded, {name: result}, inputs, [i.name for i in shown]):
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
            figures.append((stem, buffer.getvalue()))
        return AnalysisOutput(section=section, figures=tuple(figures))

    return cached_result(f"analysis-{name}", key, compute, AnalysisOutput.to_arrays, AnalysisOutput.from_arrays)
