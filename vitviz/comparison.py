"""What changed between two models on the same images (`python -m vitviz compare A B`, /compare's "What changed").

    comparison = compare_models(loaded_a, loaded_b, open_batches, image_names=..., dataset_classes=...)
    comparison.pairs["cka"]             # every registered comparison of two models (vitviz/analyses, `pair`)
    comparison.agreement()              # share of images both models give the same class
    comparison.distance_shift()         # B - A mean attention distance per layer and head, where shapes match
    comparison.map_difference("rollout")  # B - A mean rollout map, on A's grid
    comparison.a.aucs                   # A's deletion and insertion AUCs per map method and image (ModelAUCs)
    comparison.auc_differences()        # B - A of those AUCs per method and curve, paired over the images

`open_batches(loaded)` gives the images preprocessed for that model (its input size, channels and
normalisation), in batches of (images, labels, indices) in the same order for both models; it is called once per
pass: the analysis pass (each batch read once for each model and forwarded once through each, the forward feeding
that model's data-set analyses and the comparisons' consumers of its block outputs), then, with `faithfulness`
options, each model's deletion and insertion curves through `vitviz.faithfulness.dataset_faithfulness`. Nothing
of more than a batch is held but each image's numbers (docs/design.md, "Comparing two models").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from vitviz import analyses as registry
from vitviz import intervals
from vitviz.analysis.differences import MapDifferences, map_differences
from vitviz.errors import VitvizError
from vitviz.method_names import COMPARE_METHODS
from vitviz.models import LoadedModel

if TYPE_CHECKING:
    from vitviz.faithfulness import FaithfulnessOptions

__all__ = [
    "DATASET_PASS",
    "DEFAULT_METHODS",
    "MAPS",
    "Comparison",
    "ModelAUCs",
    "ModelSummary",
    "analysis_pass",
    "compare_models",
    "scaled_map",
    "slice_batches",
    "work",
]

# The mean maps compared: the data-set analysis that makes each, and its JSON section in a comparison.
MAPS = {"rollout": "rollout_difference", "gradient": "gradient_rollout_difference"}
PASSES = 3  # progress units per image of the analysis pass: model A's forward, model B's, the comparisons
# The map methods whose AUCs a comparison gives unless told otherwise: the cheap ones (no integrated gradients,
# no occlusion), `random` the baseline.
DEFAULT_METHODS = COMPARE_METHODS
Batches = Iterable[Any]  # (images, labels, indices) or vitviz.data.stream.DatasetBatch


def work(num_images: int, methods: Sequence[str] = ()) -> int:
    """What `compare_models` reports through `progress` in all: every image in each of the PASSES, then every
    image under every method for each model (fewer where a method does not apply to a model)."""
    return num_images * (PASSES + 2 * len(methods))


@dataclass(frozen=True)
class ModelAUCs:
    """One model's deletion and insertion AUCs of each map method, per image in image order: the numbers of
    `python -m vitviz faithfulness --dataset` (`vitviz.faithfulness.dataset_faithfulness`, each image explained
    for the class the model predicts)."""

    methods: tuple[str, ...]  # the methods asked, in order
    steps: int | None  # S; None where no method applies
    deletion: Mapping[str, np.ndarray]  # method -> [N] float64, for the methods that apply
    insertion: Mapping[str, np.ndarray]
    not_applicable: Mapping[str, str] = field(default_factory=dict)  # method -> why it does not apply

    @functools.cached_property
    def summary(self) -> intervals.Summary | None:
        """The AUCs' 95% paired-bootstrap intervals and the methods' comparisons, as `faithfulness` gives them."""
        return intervals.summarise(self.deletion, self.insertion) if self.deletion else None

    def mean(self, curve: str, method: str) -> float:
        """The AUC over the images: the images' AUCs summed in image order, as `faithfulness` sums them."""
        values = (self.deletion if curve == "deletion" else self.insertion)[method].tolist()
        return sum(values) / len(values)

    def points(self) -> dict[str, dict[str, tuple[float, float, float]]]:
        """curve -> method -> (AUC, interval low, interval high), for the methods that apply."""
        summary = self.summary
        if summary is None:
            return {}
        return {
            curve: {m: (self.mean(curve, m), *summary.intervals[m][curve]) for m in self.deletion}
            for curve in intervals.CURVES
        }

    def to_json(self) -> dict[str, Any]:
        """The sections "protocol", "methods" (each method's AUCs and intervals) and "comparisons", as
        `faithfulness` writes them (without its per-image numbers and curves)."""
        from vitviz.faithfulness import BASELINE

        methods: dict[str, Any] = {}
        for method in self.methods:
            if method in self.not_applicable:
                methods[method] = {"not_applicable": self.not_applicable[method]}
                continue
            assert self.summary is not None
            methods[method] = {
                "deletion_auc": self.mean("deletion", method),
                "insertion_auc": self.mean("insertion", method),
                **self.summary.interval_json(method),
                "num_images": len(self.deletion[method]),
            }
        document: dict[str, Any] = {
            "protocol": {"steps": self.steps, "baseline": BASELINE, "target": "predicted"},
            "methods": methods,
        }
        if self.summary is not None:
            document["comparisons"] = self.summary.to_json()
        return document

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {prefix + "methods": np.asarray(self.methods), prefix + "steps": np.asarray(self.steps or 0)}
        for curve, values in (("deletion", self.deletion), ("insertion", self.insertion)):
            arrays.update({f"{prefix}{curve}.{method}": aucs for method, aucs in values.items()})
        arrays.update({f"{prefix}reason.{method}": np.asarray(why) for method, why in self.not_applicable.items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> ModelAUCs | None:
        """The AUCs stored under `prefix`; None where none were."""
        if prefix + "methods" not in arrays:
            return None
        methods = tuple(str(m) for m in arrays[prefix + "methods"])
        reasons = {m: str(arrays[f"{prefix}reason.{m}"]) for m in methods if f"{prefix}reason.{m}" in arrays}

        def read(curve: str) -> dict[str, np.ndarray]:
            return {
                m: np.asarray(arrays[f"{prefix}{curve}.{m}"], dtype=np.float64) for m in methods if m not in reasons
            }

        return cls(methods, int(arrays[prefix + "steps"]) or None, read("deletion"), read("insertion"), reasons)


@dataclass(frozen=True)
class ModelSummary:
    """One model over the images: predictions, mean attention distance and mean maps (a reason where one does not
    apply to the model)."""

    source: str
    class_names: tuple[str, ...]
    predicted: np.ndarray | None  # [N] int64 (None: the model gives no class logits)
    distance: np.ndarray | str  # [L, H] float64 pixels, mean over the images; else why not
    rollout: np.ndarray | str  # [gh, gw] float64, the mean of the raw rollout maps; else why not
    gradient: np.ndarray | str  # [gh, gw] float64, the mean of the raw gradient-rollout maps (predicted class)
    aucs: ModelAUCs | None = None  # deletion and insertion AUCs per map method (None: none asked)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        arrays = {prefix + "source": np.asarray(self.source), prefix + "class_names": np.asarray(self.class_names)}
        if self.predicted is not None:
            arrays[prefix + "predicted"] = self.predicted
        if self.aucs is not None:
            arrays.update(self.aucs.to_arrays(prefix + "aucs."))
        for key in ("distance", "rollout", "gradient"):
            value = getattr(self, key)
            arrays[prefix + key + ("" if isinstance(value, np.ndarray) else ".reason")] = np.asarray(value)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> ModelSummary:
        def read(key: str) -> np.ndarray | str:
            if prefix + key in arrays:
                return np.asarray(arrays[prefix + key], dtype=np.float64)
            return str(arrays[prefix + key + ".reason"])

        predicted = arrays.get(prefix + "predicted")
        return cls(
            source=str(arrays[prefix + "source"]),
            class_names=tuple(str(n) for n in arrays[prefix + "class_names"]),
            predicted=None if predicted is None else np.asarray(predicted, dtype=np.int64),
            distance=read("distance"),
            rollout=read("rollout"),
            gradient=read("gradient"),
            aucs=ModelAUCs.from_arrays(arrays, prefix + "aucs."),
        )


@dataclass(frozen=True)
class Comparison:
    """Model A and model B over the same N images, and every registered comparison of the two."""

    a: ModelSummary
    b: ModelSummary
    labels: np.ndarray  # [N] int64, -1 where unknown (image files)
    image_names: tuple[str, ...]
    dataset_classes: tuple[str, ...] | None  # the data set's classes (None: image files)
    distance_mode: str
    pairs: Mapping[str, Any] = field(default_factory=dict)  # name -> typed result or registry.NotApplicable

    @property
    def num_images(self) -> int:
        return len(self.image_names)

    def accuracy(self, side: str) -> float | None:
        """Model `side`'s ("a" or "b") top-1 accuracy, when the data set's classes are the model's classes."""
        model = self.a if side == "a" else self.b
        if model.predicted is None or self.dataset_classes is None or model.class_names != self.dataset_classes:
            return None
        return float(np.mean(model.predicted == self.labels))

    def agreement(self) -> float | None:
        """Share of images to which both models give the same class (compared by class name)."""
        if self.a.predicted is None or self.b.predicted is None:
            return None
        names_a = [self.a.class_names[i] for i in self.a.predicted]
        names_b = [self.b.class_names[i] for i in self.b.predicted]
        return float(np.mean([x == y for x, y in zip(names_a, names_b)]))

    def distance_shift(self) -> tuple[np.ndarray | None, str | None]:
        """(B − A mean attention distance [L, H] in pixels, None) where both apply and their layers and heads
        match; else (None, why they are listed side by side instead)."""
        a, b = self.a.distance, self.b.distance
        if isinstance(a, str) or isinstance(b, str):
            return None, "attention distance does not apply to " + ("model A" if isinstance(a, str) else "model B")
        if a.shape != b.shape:
            return None, (
                f"the models differ in shape: A has {a.shape[0]} layers × {a.shape[1]} heads, "
                f"B {b.shape[0]} × {b.shape[1]}; both are listed"
            )
        return b - a, None

    def map_difference(self, which: str) -> MapDifferences | str:
        """B − A of the mean `which` map ("rollout" or "gradient"), each mean map first divided by its maximum
        (`scaled_map`), B resampled bilinearly to A's grid where the grids differ; else why not."""
        a, b = getattr(self.a, which), getattr(self.b, which)
        for side, value in (("A", a), ("B", b)):
            if isinstance(value, str):
                return f"model {side}: {value}"
        found = map_differences({"A": scaled_map(a), "B": scaled_map(b)})
        assert found is not None
        return found

    def with_aucs(self, a: ModelAUCs, b: ModelAUCs) -> Comparison:
        """The same comparison with each model's AUCs (`model_aucs` over the same images) attached."""
        return replace(self, a=replace(self.a, aucs=a), b=replace(self.b, aucs=b))

    def auc_differences(self) -> dict[str, dict[str, intervals.Comparison] | str]:
        """method -> curve -> B − A of the method's AUCs over the same images (`vitviz.intervals.
        paired_differences`: the mean per-image difference, its 95% paired-bootstrap interval on the resamples of
        each model's own intervals, and the model it calls better, if any); else why the method is not compared.
        Empty where no AUCs were computed."""
        a, b = self.a.aucs, self.b.aucs
        if a is None or b is None:
            return {}
        found = intervals.paired_differences(
            {"deletion": b.deletion, "insertion": b.insertion},
            {"deletion": a.deletion, "insertion": a.insertion},
            ("B", "A"),
        )
        result: dict[str, dict[str, intervals.Comparison] | str] = {}
        for method in a.methods:
            reasons = [
                f"model {side}: {m.not_applicable[method]}"
                for side, m in (("A", a), ("B", b))
                if method in m.not_applicable
            ]
            result[method] = found[method] if method in found else "; ".join(reasons)
        return result

    def auc_points(self) -> dict[str, dict[str, dict[str, tuple[float, float, float]]]]:
        """Model ("A", "B") -> curve -> method -> (AUC, interval low, interval high) (`ModelAUCs.points`); empty
        where no AUCs were computed."""
        if self.a.aucs is None or self.b.aucs is None:
            return {}
        return {"A": self.a.aucs.points(), "B": self.b.aucs.points()}

    def auc_verdict(self) -> list[str]:
        """One sentence per method and curve: the model the B − A interval calls better, or "not told apart"."""
        lines = []
        for method, found in self.auc_differences().items():
            if isinstance(found, str):
                lines.append(f"{method}: not compared ({found}).")
            else:
                lines += [f"{method}, {difference.verdict(self.num_images)}" for difference in found.values()]
        return lines

    def to_json(self) -> dict[str, Any]:
        """The JSON sections of a comparison after "models" and "dataset" (docs/design.md, "Comparing two models")."""
        document: dict[str, Any] = {}
        for analysis in registry.pairs():
            if analysis.name in self.pairs:
                document[analysis.section] = registry.section(analysis, self.pairs[analysis.name], self.image_names)
        document["predictions"] = self._predictions_json()
        document["distance_shift"] = self._distance_json()
        for which, section in MAPS.items():
            document[section] = self._map_json(which)
        if self.a.aucs is not None and self.b.aucs is not None:
            document["faithfulness"] = self._faithfulness_json()
        return document

    def _faithfulness_json(self) -> dict[str, Any]:
        assert self.a.aucs is not None and self.b.aucs is not None
        differences: dict[str, Any] = {}
        for method, found in self.auc_differences().items():
            differences[method] = (
                {"not_applicable": found}
                if isinstance(found, str)
                else {
                    curve: {**difference.to_json(), "verdict": difference.verdict(self.num_images)}
                    for curve, difference in found.items()
                }
            )
        return {
            "methods": list(self.a.aucs.methods),
            "num_images": self.num_images,
            "resamples": intervals.RESAMPLES,
            "seed": intervals.SEED,
            "confidence": intervals.CONFIDENCE,
            "a": self.a.aucs.to_json(),
            "b": self.b.aucs.to_json(),
            "difference": differences,
            "verdict": self.auc_verdict(),
        }

    def _predictions_json(self) -> dict[str, Any]:
        def predicted(model: ModelSummary, position: int) -> int | None:
            return None if model.predicted is None else int(model.predicted[position])

        return {
            "agreement": self.agreement(),
            "accuracy": {"a": self.accuracy("a"), "b": self.accuracy("b")},
            "per_image": [
                {"image": name, "label": int(label), "a": predicted(self.a, i), "b": predicted(self.b, i)}
                for i, (name, label) in enumerate(zip(self.image_names, self.labels.tolist()))
            ],
        }

    def _distance_json(self) -> dict[str, Any]:
        shift, why = self.distance_shift()

        def listed(value: np.ndarray | str) -> Any:
            return {"not_applicable": value} if isinstance(value, str) else value.tolist()

        section: dict[str, Any] = {"mode": self.distance_mode, "matched": shift is not None}
        if shift is not None:
            section["shift"] = shift.tolist()
        else:
            section["note"] = why
        section["a"], section["b"] = listed(self.a.distance), listed(self.b.distance)
        return section

    def _map_json(self, which: str) -> dict[str, Any]:
        found = self.map_difference(which)
        if isinstance(found, str):
            return {"not_applicable": found}
        difference = found.differences["B"]
        return {
            "scaled": "each mean map divided by its maximum",
            "a_mean_map": np.asarray(getattr(self.a, which)).tolist(),
            "b_mean_map": np.asarray(getattr(self.b, which)).tolist(),
            "grid": list(found.grid),
            "resampled_from": None if difference.resampled_from is None else list(difference.resampled_from),
            "difference": difference.values.tolist(),
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickle) for the studio's disk cache."""
        arrays = {
            **self.a.to_arrays("a."),
            **self.b.to_arrays("b."),
            "labels": self.labels,
            "image_names": np.asarray(self.image_names),
            "distance_mode": np.asarray(self.distance_mode),
            "pairs": np.asarray(list(self.pairs)),
        }
        if self.dataset_classes is not None:
            arrays["dataset_classes"] = np.asarray(self.dataset_classes)
        for name, result in self.pairs.items():
            if isinstance(result, registry.NotApplicable):
                arrays[f"pair.{name}.reason"] = np.asarray(result.reason)
            else:
                arrays.update({f"pair.{name}.{key}": value for key, value in result.to_arrays().items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Comparison:
        pairs: dict[str, Any] = {}
        for name in (str(n) for n in arrays["pairs"]):
            if f"pair.{name}.reason" in arrays:
                pairs[name] = registry.NotApplicable(str(arrays[f"pair.{name}.reason"]))
                continue
            prefix = f"pair.{name}."
            stored = {key[len(prefix) :]: value for key, value in arrays.items() if key.startswith(prefix)}
            read = registry.get(name).from_arrays
            if read is None:
                raise ValueError(f"comparison {name!r} declares no from_arrays")
            pairs[name] = read(stored)
        classes = arrays.get("dataset_classes")
        return cls(
            a=ModelSummary.from_arrays(arrays, "a."),
            b=ModelSummary.from_arrays(arrays, "b."),
            labels=np.asarray(arrays["labels"], dtype=np.int64),
            image_names=tuple(str(n) for n in arrays["image_names"]),
            dataset_classes=None if classes is None else tuple(str(c) for c in classes),
            distance_mode=str(arrays["distance_mode"]),
            pairs=pairs,
        )


def scaled_map(values: np.ndarray) -> np.ndarray:
    """A mean map divided by its largest value (negative values, if any, kept), so that two models' maps of
    different totals (different grids, prefix tokens) compare; an all-zero map stays 0."""
    values = np.asarray(values, dtype=np.float64)
    top = float(np.max(values)) if values.size else 0.0
    return values / top if top > 0 else values


def slice_batches(
    slice_: Any, models: Sequence[LoadedModel], batch_size: int, *, download: bool = False
) -> tuple[Callable[[LoadedModel], Batches], list[str], list[str]]:
    """(open_batches, the images' names, the data set's classes) of a vitviz.data.stream.DatasetSlice for `models`:
    each model reads the slice preprocessed as it expects (opened once per model), in batches of `batch_size`."""
    from vitviz.data.stream import dataset_batches, open_dataset

    opened = {
        id(m): open_dataset(
            slice_,
            input_size=m.meta.input_size,
            in_chans=m.meta.in_chans,
            mean=m.meta.mean,
            std=m.meta.std,
            download=download,
        )
        for m in models
    }

    def open_batches(loaded: LoadedModel) -> Batches:
        return dataset_batches(opened[id(loaded)], batch_size)

    first = opened[id(models[0])]
    return open_batches, [slice_.image_name(i) for i in range(len(first))], first.class_names


DATASET_PASS = ("distance", "rollout", "gradient-rollout")  # each model's data-set analyses in a comparison


def analysis_pass(
    loaded_a: LoadedModel,
    loaded_b: LoadedModel,
    open_batches: Callable[[LoadedModel], Batches],
    options: Any,
    analyses: Sequence[str] = DATASET_PASS,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], list[Any]]:
    """(every registered comparison's result, [A's, B's] `DatasetResults` of `analyses`) in one pass: each batch
    read once for each model and forwarded once through each, the forward feeding the model's data-set analyses
    and the comparisons' consumers of its block outputs."""
    from vitviz.pipeline import DatasetPass, PairPass

    pair = PairPass(loaded_a, loaded_b, registry.pair_names(), options)
    runs = [DatasetPass(m, analyses, options) for m in (loaded_a, loaded_b)]
    for batch_a, batch_b in _same_images(open_batches(loaded_a), open_batches(loaded_b)):
        size_a = runs[0].add(batch_a, pair_blocks=pair.blocks_a)
        size_b = runs[1].add(batch_b, pair_blocks=pair.blocks_b)
        pair.after_batch(size_a, size_b)
        if progress is not None:
            progress(PASSES * size_a)
        del batch_a, batch_b  # nothing of a batch is held while the next one is read
    return pair.result(), [run.result() for run in runs]


def _same_images(batches_a: Batches, batches_b: Batches) -> Iterable[tuple[Any, Any]]:
    """(A's batch, B's batch) of each step; the two must hold the same images in the same order."""
    from vitviz.pipeline import _batch_parts

    for batch_a, batch_b in zip(batches_a, batches_b, strict=True):
        indices_a, indices_b = _batch_parts(batch_a)[2], _batch_parts(batch_b)[2]
        if indices_a.tolist() != indices_b.tolist():
            raise ValueError("the two models' batches do not hold the same images")
        yield batch_a, batch_b


def _checked_steps(loaded: LoadedModel, options: FaithfulnessOptions) -> int | None:
    """S for the model (`--steps` above its patch count refused in one line); None for a model without a
    classification head, to which no method applies."""
    from vitviz.faithfulness import checked_steps

    if int(getattr(loaded.model, "num_classes", 0) or 0) < 1:
        return None
    return checked_steps(loaded.model, options.steps)


def model_aucs(
    loaded: LoadedModel,
    batches: Batches,
    options: FaithfulnessOptions,
    image_names: Sequence[str],
    progress: Callable[[int], None] | None,
) -> ModelAUCs:
    """One model's deletion and insertion AUCs of the methods that apply to it, in one pass over the images
    (`batches`, as `open_batches` gives them; each image explains the model's own prediction). `compare_models`
    calls it for both models; the studio calls it on its own, after drawing the rest of a comparison."""
    from vitviz.faithfulness import NO_CLASSIFICATION_HEAD, dataset_faithfulness
    from vitviz.methods import get_method

    if _checked_steps(loaded, options) is None:
        return ModelAUCs(options.methods, None, {}, {}, dict.fromkeys(options.methods, NO_CLASSIFICATION_HEAD))
    reasons = {m: why for m in options.methods if (why := get_method(m).not_applicable(loaded)) is not None}
    applicable = tuple(m for m in options.methods if m not in reasons)
    if not applicable:
        return ModelAUCs(options.methods, None, {}, {}, reasons)
    result = dataset_faithfulness(
        loaded.model,
        batches,
        replace(options, methods=applicable),
        image_name=lambda index: image_names[index],
        progress=progress,
    )

    def per_image(curve: str) -> dict[str, np.ndarray]:
        return {
            name: np.array([getattr(image, f"{curve}_auc") for image in method.per_image], dtype=np.float64)
            for name, method in result.methods.items()
        }

    return ModelAUCs(options.methods, result.steps, per_image("deletion"), per_image("insertion"), reasons)


def _summary(loaded: LoadedModel, results: Any, aucs: ModelAUCs | None) -> ModelSummary:
    from vitviz.pipeline import NotApplicable

    def value(result: Any, what: str) -> np.ndarray | str:
        if isinstance(result, NotApplicable):
            return result.reason
        if result is None:
            return f"{what} did not run"
        return np.asarray(result, dtype=np.float64)

    distance = results.distance
    return ModelSummary(
        source=loaded.source,
        class_names=tuple(loaded.meta.class_names),
        predicted=results.predicted,
        distance=value(distance if isinstance(distance, NotApplicable | None) else distance.pixels, "distance"),
        rollout=value(results.rollout_mean, "rollout"),
        gradient=value(results.gradient_mean, "gradient rollout"),
        aucs=aucs,
    )


def compare_models(
    loaded_a: LoadedModel,
    loaded_b: LoadedModel,
    open_batches: Callable[[LoadedModel], Batches],
    options: Any,
    *,
    image_names: Sequence[str],
    dataset_classes: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    faithfulness: FaithfulnessOptions | None = None,
) -> Comparison:
    """Every registered comparison of the two models and each model's predictions, mean attention distance and
    mean rollout and gradient-rollout maps, in one pass over the images: per batch one forward of each model
    (`vitviz.pipeline.DatasetPass`, the data-set analyses' own code) hands its block outputs to the comparisons
    (`vitviz.pipeline.PairPass`) as well. Then, with `faithfulness`, each model's deletion and insertion AUCs of
    its methods (one pass each, `vitviz.faithfulness.dataset_faithfulness`; its `target_class` and `sanity` are
    not used: each model explains its own prediction). `progress(units)` after every batch of every pass (`work`
    in all)."""
    if options.batch_size < 1:
        raise VitvizError(f"--batch-size must be at least 1, got {options.batch_size}")
    if faithfulness is not None:
        faithfulness = replace(faithfulness, target_class=None, sanity=False)
        for loaded in (loaded_a, loaded_b):  # refuse a --steps above a model's patches before any forward
            _checked_steps(loaded, faithfulness)
    pairs, results = analysis_pass(loaded_a, loaded_b, open_batches, options, DATASET_PASS, progress)
    if results[0].num_images != len(image_names) or results[1].num_images != len(image_names):
        raise ValueError("the batches do not hold the images named")
    aucs: list[ModelAUCs | None] = [None, None]
    if faithfulness is not None:
        aucs = [model_aucs(m, open_batches(m), faithfulness, image_names, progress) for m in (loaded_a, loaded_b)]
    return Comparison(
        a=_summary(loaded_a, results[0], aucs[0]),
        b=_summary(loaded_b, results[1], aucs[1]),
        labels=results[0].labels.astype(np.int64),
        image_names=tuple(image_names),
        dataset_classes=None if dataset_classes is None else tuple(dataset_classes),
        distance_mode=options.distance_mode,
        pairs=pairs,
    )
