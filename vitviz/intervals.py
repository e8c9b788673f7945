"""How sure is a faithfulness figure? Paired-bootstrap intervals over images, and the verdicts they allow.

Every AUC reported for a set of N images is the mean of the images' AUCs. Its uncertainty is estimated by the
paired bootstrap over images: R = 2,000 resamples, each N image positions drawn with replacement from
``numpy.random.default_rng(0)`` (one [R, N] array, drawn once and shared by every method and curve, so the
differences between methods are paired: resample r holds the same images for all of them); the statistic of a
resample is the mean over its draws; the 95% interval is the 2.5th and 97.5th percentiles of the R means
(``numpy.percentile``, linear interpolation).

A difference between two methods on one curve is the per-image difference first − second; its interval is the
bootstrap interval of that difference's mean (the same resamples). One method is called better than another
only when that interval excludes 0 (strictly: below 0 for deletion, where lower is better; above 0 for
insertion); otherwise the two are "not told apart on these N images". One image never tells methods apart
(its resamples are all the same image, so the interval is a point and says nothing about other images).

Public API:
    RESAMPLES, SEED, CONFIDENCE, CURVES
    bootstrap_indices(num_images, resamples, seed) -> [R, N] int64 (cached, read-only)
    bootstrap_means(values [M, N], indices [R, N]) -> [R, M]: each row's mean over each resample
    percentile_interval(means [R, ...], confidence) -> [..., 2]
    summarise(deletion {method: [N]}, insertion {method: [N]}) -> Summary (intervals, comparisons, verdicts)
    paired_differences(first, second, names) -> {key: {curve: Comparison}}: two sets of the same methods over the
        same images (two models' maps), first − second per method and curve, on the same resamples
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CONFIDENCE",
    "CURVES",
    "RESAMPLES",
    "SEED",
    "Comparison",
    "Summary",
    "bootstrap_indices",
    "bootstrap_means",
    "paired_differences",
    "percentile_interval",
    "summarise",
]

RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
CURVES = ("deletion", "insertion")  # lower deletion AUC is better, higher insertion AUC is better
RANDOM = "random"
_CHUNK_VALUES = 1 << 22  # resample counts held at once: rows x N <= this (32 MB of int64)


@functools.lru_cache(maxsize=8)
def bootstrap_indices(num_images: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[resamples, num_images] int64: row r lists the image positions of resample r (with replacement).

    Drawn in one call of ``numpy.random.default_rng(seed).integers(0, num_images, (resamples, num_images))``, so
    the same N, R and seed give the same array everywhere; read-only because it is cached and shared.
    """
    if num_images < 1 or resamples < 1:
        raise ValueError(f"a bootstrap needs at least one image and one resample, got {num_images} and {resamples}")
    indices = np.random.default_rng(seed).integers(0, num_images, size=(resamples, num_images), dtype=np.int64)
    indices.setflags(write=False)
    return indices


def bootstrap_means(values: np.ndarray | Sequence[Sequence[float]], indices: np.ndarray) -> np.ndarray:
    """[R, M]: the mean of each of the M rows of ``values`` [M, N] over each resample of ``indices`` [R, N].

    Vectorised: each resample's draws are counted per image (one bincount for a block of resamples) and the means
    are one matrix product counts @ values.T / N, in blocks of resamples so memory stays below ~32 MB at any N.
    """
    table = np.asarray(values, dtype=np.float64)
    if table.ndim == 1:
        table = table[None]
    resamples, num_images = indices.shape
    if table.shape[1] != num_images:
        raise ValueError(f"{table.shape[1]} values per row for resamples of {num_images} images")
    means = np.empty((resamples, table.shape[0]), dtype=np.float64)
    rows = max(1, _CHUNK_VALUES // num_images)
    for start in range(0, resamples, rows):
        block = indices[start : start + rows]
        offsets = np.arange(block.shape[0], dtype=np.int64)[:, None] * num_images
        counts = np.bincount((block + offsets).ravel(), minlength=block.size).reshape(block.shape)
        means[start : start + block.shape[0]] = counts.astype(np.float64) @ table.T / num_images
    return means


def percentile_interval(means: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """[..., 2]: the (1 − c)/2 and (1 + c)/2 percentiles over axis 0 of ``means`` [R, ...] (linear interpolation)."""
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(means, [tail, 100.0 - tail], axis=0)
    return np.stack([low, high], axis=-1)


@dataclass(frozen=True)
class Comparison:
    """The paired difference first − second of two methods' AUCs on one curve."""

    curve: str  # "deletion" or "insertion"
    first: str
    second: str
    difference: float  # mean over the images of first − second
    interval: tuple[float, float]  # its 95% paired-bootstrap interval
    better: str | None  # the method the interval says is better (first or second), None when it contains 0
    confidence: float = CONFIDENCE  # the interval's

    def to_json(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "second": self.second,
            "difference": self.difference,
            "interval": list(self.interval),
            "better": self.better,
        }

    def verdict(self, num_images: int) -> str:
        """One sentence: the side the interval calls better, else that the two are not told apart."""
        if self.better is None:
            sides = " and ".join(sorted((self.first, self.second)))
            return f"{self.curve}: {sides} not told apart on these {_images(num_images)}."
        word = "lower" if self.curve == "deletion" else "higher"
        low, high = self.interval
        return (
            f"{self.curve}: {self.better} has the {word} AUC ({self.first} − {self.second} {self.difference:+.4f}, "
            f"{100 * self.confidence:g}% interval [{low:+.4f}, {high:+.4f}])."
        )


def _images(count: int) -> str:
    return f"{count} image{'s' if count != 1 else ''}"


def _better(curve: str, first: str, second: str, low: float, high: float, num_images: int) -> str | None:
    if num_images < 2:
        return None
    first_lower = high < 0.0  # the whole interval of first − second is below 0
    second_lower = low > 0.0
    if curve == "deletion":
        return first if first_lower else second if second_lower else None
    return second if first_lower else first if second_lower else None


@dataclass(frozen=True)
class Summary:
    """Each method's AUC intervals and every pair's paired difference, over one set of images."""

    num_images: int
    methods: tuple[str, ...]
    intervals: Mapping[str, Mapping[str, tuple[float, float]]]  # method -> curve -> (low, high)
    pairs: Mapping[str, tuple[Comparison, ...]]  # curve -> every pair (i < j in the methods' order)
    resamples: int = RESAMPLES
    seed: int = SEED
    confidence: float = CONFIDENCE

    def comparison(self, curve: str, first: str, second: str) -> Comparison:
        """The pair's comparison, oriented as asked (first − second)."""
        for pair in self.pairs[curve]:
            if (pair.first, pair.second) == (first, second):
                return pair
            if (pair.first, pair.second) == (second, first):
                low, high = pair.interval
                return Comparison(curve, first, second, -pair.difference, (-high, -low), pair.better, pair.confidence)
        raise KeyError(f"no comparison of {first} and {second}")

    def leaders(self, curve: str) -> list[str]:
        """The methods no other method is shown better than on ``curve`` (in the methods' order)."""
        beaten = {
            pair.second if pair.better == pair.first else pair.first
            for pair in self.pairs[curve]
            if pair.better is not None
        }
        return [method for method in self.methods if method not in beaten]

    def best(self, curve: str) -> str | None:
        """The one method shown better than every other on ``curve``, else None."""
        leaders = self.leaders(curve)
        return leaders[0] if len(leaders) == 1 and len(self.methods) > 1 else None

    def against_random(self) -> dict[str, dict[str, str]]:
        """method -> curve -> "better", "worse" or "not told apart" against ``random`` (empty without it)."""
        if RANDOM not in self.methods:
            return {}
        result: dict[str, dict[str, str]] = {}
        for method in self.methods:
            if method == RANDOM:
                continue
            result[method] = {}
            for curve in CURVES:
                better = self.comparison(curve, method, RANDOM).better
                result[method][curve] = (
                    "not told apart" if better is None else "better" if better == method else "worse"
                )
        return result

    def verdict(self) -> list[str]:
        """Plain sentences: which method leads each curve, and how each compares with random, by the interval rule."""
        images = _images(self.num_images)
        lines = []
        if len(self.methods) > 1:
            for curve, word in (("deletion", "lowest"), ("insertion", "highest")):
                best = self.best(curve)
                if best is not None:
                    lines.append(f"{curve.capitalize()}: {best} has the {word} AUC, ahead of every other method.")
                else:
                    lines.append(
                        f"{curve.capitalize()}: {', '.join(self.leaders(curve))} not told apart on these {images}."
                    )
        versus = self.against_random()
        if versus:
            better = [m for m, curves in versus.items() if all(v == "better" for v in curves.values())]
            worse = [m for m, curves in versus.items() if "worse" in curves.values()]
            if better:
                lines.append(f"Better than random on both curves: {', '.join(better)}.")
            if worse:
                lines.append(f"Worse than random on at least one curve: {', '.join(worse)}.")
            unclear = [
                f"{m} ({', '.join(c for c, v in curves.items() if v == 'not told apart')})"
                for m, curves in versus.items()
                if "not told apart" in curves.values() and "worse" not in curves.values()
            ]
            if unclear:
                lines.append(f"Not told apart from random on these {images}: {', '.join(unclear)}.")
        return lines

    def interval_json(self, method: str) -> dict[str, list[float]]:
        """The method's ``deletion_auc_interval`` and ``insertion_auc_interval`` JSON fields."""
        return {f"{curve}_auc_interval": list(self.intervals[method][curve]) for curve in CURVES}

    def to_json(self) -> dict[str, Any]:
        """The JSON's "comparisons" section."""
        document: dict[str, Any] = {
            "num_images": self.num_images,
            "resamples": self.resamples,
            "seed": self.seed,
            "confidence": self.confidence,
        }
        for curve in CURVES:
            document[curve] = {
                "pairs": [pair.to_json() for pair in self.pairs[curve]],
                "best": self.best(curve),
                "leaders": self.leaders(curve),
            }
        versus = self.against_random()
        if versus:
            document["random"] = versus
        document["verdict"] = self.verdict()
        return document


def summarise(
    deletion: Mapping[str, Sequence[float] | np.ndarray],
    insertion: Mapping[str, Sequence[float] | np.ndarray],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> Summary:
    """Intervals and paired comparisons of the methods' per-image AUCs (each method: N values, image order).

    One bootstrap over the 2M rows (each method's deletion and insertion AUCs) gives every interval; a pair's
    difference is the difference of two columns of the resampled means (the mean is linear, so this is the
    resampled mean of the per-image differences).
    """
    methods = tuple(deletion)
    if tuple(insertion) != methods or not methods:
        raise ValueError("the deletion and insertion AUCs must name the same methods, at least one")
    table = np.stack(
        [np.asarray(deletion[m], dtype=np.float64) for m in methods]
        + [np.asarray(insertion[m], dtype=np.float64) for m in methods]
    )
    num_images = table.shape[1]
    means = bootstrap_means(table, bootstrap_indices(num_images, resamples, seed))
    bounds = percentile_interval(means, confidence)
    count = len(methods)
    intervals = {
        method: {
            "deletion": (float(bounds[i, 0]), float(bounds[i, 1])),
            "insertion": (float(bounds[count + i, 0]), float(bounds[count + i, 1])),
        }
        for i, method in enumerate(methods)
    }
    columns = [(i, j) for i in range(count) for j in range(i + 1, count)]
    pairs: dict[str, tuple[Comparison, ...]] = {}
    for offset, curve in ((0, "deletion"), (count, "insertion")):
        rows = [(offset + i, offset + j, methods[i], methods[j]) for i, j in columns]
        pairs[curve] = _differences(curve, table, means, rows, confidence)
    return Summary(num_images, methods, intervals, pairs, resamples, seed, confidence)


def _differences(
    curve: str,
    table: np.ndarray,
    means: np.ndarray,
    rows: Sequence[tuple[int, int, str, str]],
    confidence: float,
) -> tuple[Comparison, ...]:
    """The Comparison of each (first row, second row, first name, second name) of ``table`` [rows, N] on
    ``curve``: the mean of the per-image differences, and the interval of the difference of the two rows'
    resampled means ``means`` [R, rows] (the mean is linear, so this is the resampled mean of the differences)."""
    if not rows:
        return ()
    first = np.array([row[0] for row in rows])
    second = np.array([row[1] for row in rows])
    bounds = percentile_interval(means[:, first] - means[:, second], confidence)
    observed = (table[first] - table[second]).mean(axis=1)
    built = []
    for k, (_, _, first_name, second_name) in enumerate(rows):
        low, high = float(bounds[k, 0]), float(bounds[k, 1])
        better = _better(curve, first_name, second_name, low, high, table.shape[1])
        built.append(Comparison(curve, first_name, second_name, float(observed[k]), (low, high), better, confidence))
    return tuple(built)


def paired_differences(
    first: Mapping[str, Mapping[str, Sequence[float] | np.ndarray]],
    second: Mapping[str, Mapping[str, Sequence[float] | np.ndarray]],
    names: tuple[str, str],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> dict[str, dict[str, Comparison]]:
    """key -> curve -> the Comparison first − second, for two sets of per-image AUCs over the same N images in
    the same order (``first`` and ``second``: curve -> key -> [N], e.g. model B's and model A's methods).

    The resamples are summarise's for N images (same R and seed), so these intervals are paired with the
    intervals summarise gives each set; ``names`` (first's, second's) are what ``better`` names. Only keys that
    both sets hold on every curve are compared, in first's order.
    """
    keys = [key for key in first[CURVES[0]] if all(key in first[c] and key in second[c] for c in CURVES)]
    if not keys:
        return {}
    table = np.stack(
        [np.asarray(side[curve][key], dtype=np.float64) for curve in CURVES for side in (first, second) for key in keys]
    )
    means = bootstrap_means(table, bootstrap_indices(table.shape[1], resamples, seed))
    count = len(keys)
    result: dict[str, dict[str, Comparison]] = {key: {} for key in keys}
    for position, curve in enumerate(CURVES):
        offset = 2 * count * position  # this curve's rows: first's keys, then second's
        rows = [(offset + k, offset + count + k, *names) for k in range(count)]
        for key, comparison in zip(keys, _differences(curve, table, means, rows, confidence)):
            result[key][curve] = comparison
    return result
