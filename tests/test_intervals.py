"""Paired-bootstrap intervals of faithfulness AUCs and the verdicts they allow, against slow Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vitviz.intervals import (
    bootstrap_indices,
    bootstrap_means,
    paired_differences,
    percentile_interval,
    summarise,
)


def _percentile(sorted_values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, written out: position q/100 * (R - 1) between neighbours."""
    position = q / 100 * (len(sorted_values) - 1)
    below = math.floor(position)
    above = min(below + 1, len(sorted_values) - 1)
    return sorted_values[below] + (sorted_values[above] - sorted_values[below]) * (position - below)


def _slow_interval(values: list[float], draws: np.ndarray) -> tuple[float, float]:
    means = []
    for row in draws:
        total = 0.0
        for index in row:
            total += values[int(index)]
        means.append(total / len(row))
    means.sort()
    return _percentile(means, 2.5), _percentile(means, 97.5)


def test_indices_are_drawn_once_from_seed_0() -> None:
    draws = bootstrap_indices(7)
    assert draws.shape == (2000, 7) and draws.dtype == np.int64
    np.testing.assert_array_equal(draws, np.random.default_rng(0).integers(0, 7, size=(2000, 7)))
    assert bootstrap_indices(7) is draws and not draws.flags.writeable
    assert draws.min() == 0 and draws.max() == 6


def test_means_and_intervals_match_a_python_loop() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(size=(3, 23))
    draws = bootstrap_indices(23, 300, 5)
    means = bootstrap_means(values, draws)
    for m in range(3):
        for r in range(0, 300, 37):
            assert means[r, m] == pytest.approx(sum(values[m, i] for i in draws[r]) / 23, rel=1e-12, abs=1e-15)
        low, high = percentile_interval(means[:, m])
        want = _slow_interval(values[m].tolist(), draws)
        assert (low, high) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_means_in_blocks_equal_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import vitviz.intervals as intervals

    values = np.random.default_rng(1).random((2, 50))
    draws = bootstrap_indices(50, 101, 2)
    whole = bootstrap_means(values, draws)
    monkeypatch.setattr(intervals, "_CHUNK_VALUES", 50 * 7)  # 7 resamples per block, the last one short
    np.testing.assert_allclose(bootstrap_means(values, draws), whole, rtol=1e-14, atol=0)


def test_summary_is_paired_and_matches_a_python_loop() -> None:
    rng = np.random.default_rng(0)
    n = 40
    shared = rng.normal(0.3, 0.1, n)  # image difficulty that every method shares
    deletion = {
        "a": (shared - 0.05 + rng.normal(0, 0.005, n)).tolist(),
        "b": (shared + rng.normal(0, 0.005, n)).tolist(),
        "random": (shared + 0.001 + rng.normal(0, 0.005, n)).tolist(),
    }
    insertion = {name: [1 - v for v in values] for name, values in deletion.items()}
    summary = summarise(deletion, insertion)
    draws = bootstrap_indices(n)
    for name in deletion:
        assert summary.intervals[name]["deletion"] == pytest.approx(_slow_interval(deletion[name], draws), rel=1e-12)
        assert summary.intervals[name]["insertion"] == pytest.approx(_slow_interval(insertion[name], draws), rel=1e-12)
    pair = summary.comparison("deletion", "a", "b")
    differences = [x - y for x, y in zip(deletion["a"], deletion["b"])]
    assert pair.interval == pytest.approx(_slow_interval(differences, draws), rel=1e-9, abs=1e-12)
    assert pair.difference == pytest.approx(sum(differences) / n, rel=1e-12)
    # Paired: the shared difficulty cancels, so a 0.05 gap is clear although the methods' own intervals overlap.
    a_high = summary.intervals["a"]["deletion"][1]
    b_low = summary.intervals["b"]["deletion"][0]
    assert a_high > b_low
    assert pair.better == "a" and summary.comparison("deletion", "b", "a").better == "a"
    assert summary.comparison("insertion", "a", "b").better == "a"  # higher insertion is better
    assert summary.comparison("deletion", "b", "random").better is None  # 0.001 apart
    assert summary.best("deletion") == "a" and summary.leaders("deletion") == ["a"]
    assert summary.against_random() == {
        "a": {"deletion": "better", "insertion": "better"},
        "b": {"deletion": "not told apart", "insertion": "not told apart"},
    }
    verdict = summary.verdict()
    assert "Deletion: a has the lowest AUC, ahead of every other method." in verdict
    assert "Better than random on both curves: a." in verdict
    assert f"Not told apart from random on these {n} images: b (deletion, insertion)." in verdict


def test_paired_differences_of_two_sets_match_a_python_loop() -> None:
    """Two models' AUCs of the same methods on the same images: first − second per method and curve, paired over
    the images on summarise's resamples; a method only one set holds is not compared."""
    rng = np.random.default_rng(5)
    n = 30
    shared = rng.normal(0.4, 0.1, n)  # image difficulty both models share

    def noisy(shift: float) -> list[float]:
        return (shared + shift + rng.normal(0, 0.005, n)).tolist()

    first = {"deletion": {"m": noisy(-0.05), "r": noisy(0.0)}, "insertion": {"m": noisy(0.05), "r": noisy(0.0)}}
    second = {curve: {"m": noisy(0.0), "r": noisy(0.0), "only": noisy(0.0)} for curve in ("deletion", "insertion")}
    found = paired_differences(first, second, ("B", "A"))
    assert list(found) == ["m", "r"] and all(list(curves) == ["deletion", "insertion"] for curves in found.values())
    draws = bootstrap_indices(n)
    for method, curves in found.items():
        for curve, pair in curves.items():
            differences = [x - y for x, y in zip(first[curve][method], second[curve][method])]
            assert (pair.curve, pair.first, pair.second) == (curve, "B", "A")
            assert pair.interval == pytest.approx(_slow_interval(differences, draws), rel=1e-9, abs=1e-12)
            assert pair.difference == pytest.approx(sum(differences) / n, rel=1e-12)
    assert found["m"]["deletion"].better == "B" and found["m"]["insertion"].better == "B"
    assert found["r"]["deletion"].better is None
    assert found["r"]["deletion"].verdict(n) == f"deletion: A and B not told apart on these {n} images."
    low, high = found["m"]["deletion"].interval
    assert found["m"]["deletion"].verdict(n) == (
        f"deletion: B has the lower AUC (B − A {found['m']['deletion'].difference:+.4f}, "
        f"95% interval [{low:+.4f}, {high:+.4f}])."
    )
    assert found["m"]["insertion"].verdict(n).startswith("insertion: B has the higher AUC")
    # The same resamples as summarise's: a set compared with a copy of itself shifted by c has the interval c.
    shifted = {c: {m: [v + 0.25 for v in values] for m, values in first[c].items()} for c in first}
    assert paired_differences(shifted, first, ("B", "A"))["m"]["deletion"].interval == pytest.approx((0.25, 0.25))


def test_no_winner_from_overlapping_or_single_images() -> None:
    summary = summarise({"a": [0.1, 0.5, 0.2, 0.4], "b": [0.3, 0.2, 0.4, 0.1]}, {"a": [0.5] * 4, "b": [0.5] * 4})
    assert summary.best("deletion") is None and summary.leaders("deletion") == ["a", "b"]
    assert summary.verdict()[0] == "Deletion: a, b not told apart on these 4 images."
    single = summarise({"a": [0.1], "b": [0.9]}, {"a": [0.9], "b": [0.1]})
    assert single.comparison("deletion", "a", "b").interval == pytest.approx((-0.8, -0.8))
    assert single.best("deletion") is None and single.best("insertion") is None


def test_comparisons_json_shape() -> None:
    summary = summarise({"a": [0.1, 0.2, 0.15], "random": [0.5, 0.6, 0.55]}, {"a": [0.7] * 3, "random": [0.3] * 3})
    document = summary.to_json()
    assert document["num_images"] == 3 and document["resamples"] == 2000 and document["seed"] == 0
    assert document["confidence"] == 0.95
    pair = document["deletion"]["pairs"][0]
    assert set(pair) == {"first", "second", "difference", "interval", "better"}
    assert pair["first"] == "a" and pair["second"] == "random" and pair["better"] == "a"
    assert document["deletion"]["best"] == "a" and document["insertion"]["leaders"] == ["a"]
    assert document["random"] == {"a": {"deletion": "better", "insertion": "better"}}
    assert document["verdict"] == summary.verdict()
    assert summary.interval_json("a")["deletion_auc_interval"] == pytest.approx([0.1, 0.2])


def test_images_and_dataset_runs_write_the_same_intervals_and_comparisons() -> None:
    import json

    import timm
    import torch

    from vitviz.faithfulness import FaithfulnessOptions, dataset_faithfulness, run_faithfulness

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=3
    ).eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    options = FaithfulnessOptions(methods=("attention-last", "random"), steps=4)
    whole = run_faithfulness(model, images, [str(i) for i in range(6)], options)
    batches = [(images[s : s + 4], torch.zeros(len(images[s : s + 4])), torch.arange(s, min(s + 4, 6))) for s in (0, 4)]
    streamed = dataset_faithfulness(model, batches, options)
    one = json.loads(json.dumps(whole.to_json({})))
    two = json.loads(json.dumps(streamed.to_json({})))
    assert one["comparisons"] == two["comparisons"]
    summary = summarise(
        {m: [c.deletion_auc for c in r.per_image] for m, r in whole.methods.items()},
        {m: [c.insertion_auc for c in r.per_image] for m, r in whole.methods.items()},
    )
    assert one["comparisons"] == json.loads(json.dumps(summary.to_json()))
    for method in options.methods:
        for document in (one, two):
            entry = document["methods"][method]
            assert list(entry)[:4] == [
                "deletion_auc",
                "insertion_auc",
                "deletion_auc_interval",
                "insertion_auc_interval",
            ]
            assert entry["deletion_auc_interval"] == list(summary.intervals[method]["deletion"])
            assert entry["insertion_auc_interval"] == list(summary.intervals[method]["insertion"])
