"""Cross-model difference maps (vitviz.analysis.differences) against a slow reference: bilinear resampling
written out with loops over pixels (PIL's BILINEAR on float planes: pixel centres aligned, a triangle filter
widened by the scale when shrinking), and subtraction element by element."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vitviz.analysis import map_differences, resample_bilinear


def _weights(size_in: int, size_out: int) -> list[list[tuple[int, float]]]:
    """For each output index, the (input index, weight) pairs of PIL's bilinear resampling along one axis."""
    scale = size_in / size_out
    support = max(scale, 1.0)  # the triangle's half-width in input pixels
    rows = []
    for out in range(size_out):
        centre = (out + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), size_in)
        pairs = [(i, max(0.0, 1.0 - abs((i - centre + 0.5) / support))) for i in range(first, last)]
        total = sum(w for _, w in pairs)
        rows.append([(i, w / total) for i, w in pairs if w])
    return rows


def _slow_resize(plane: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Bilinear resize by loops: horizontal pass, then vertical, in float32 like PIL's "F" mode."""
    plane = np.asarray(plane, dtype=np.float32)
    height, width = plane.shape
    across = _weights(width, grid[1])
    down = _weights(height, grid[0])
    wide = np.zeros((height, grid[1]), dtype=np.float64)
    for r in range(height):
        for c in range(grid[1]):
            wide[r, c] = sum(float(plane[r, i]) * w for i, w in across[c])
    out = np.zeros(grid, dtype=np.float64)
    for r in range(grid[0]):
        for c in range(grid[1]):
            out[r, c] = sum(wide[i, c] * w for i, w in down[r])
    return out


def _slow_difference(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    out = np.empty(reference.shape, dtype=np.float64)
    for index in np.ndindex(reference.shape):
        out[index] = float(values[index]) - float(reference[index])
    return out


def _map(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)


def test_same_grids_are_subtracted_without_resampling() -> None:
    maps = {"A": _map((4, 5), 0), "B": _map((4, 5), 1), "C": _map((4, 5), 2)}
    found = map_differences(maps)
    assert found is not None and found.reference == "A" and found.grid == (4, 5)
    assert list(found.differences) == ["B", "C"] and found.resampled == {}
    for name in ("B", "C"):
        assert found.differences[name].resampled_from is None
        np.testing.assert_array_equal(found.differences[name].values, _slow_difference(maps[name], maps["A"]))
    want = max(abs(v) for name in ("B", "C") for v in _slow_difference(maps[name], maps["A"]).ravel())
    assert found.limit == want


@pytest.mark.parametrize(("own", "grid"), [((8, 8), (4, 4)), ((3, 5), (6, 4)), ((4, 4), (7, 7))])
def test_a_different_grid_is_resampled_bilinearly_to_the_reference(own: tuple, grid: tuple) -> None:
    reference, other = _map(grid, 3), _map(own, 4)
    found = map_differences({"ref": reference, "same": reference.copy(), "other": other})
    assert found is not None and found.resampled == {"other": own}
    want = _slow_difference(_slow_resize(other, grid), reference)
    np.testing.assert_allclose(found.differences["other"].values, want, rtol=0, atol=1e-5)
    assert found.differences["other"].values.shape == grid
    assert not found.differences["same"].values.any()
    assert found.limit == pytest.approx(float(np.abs(want).max()), abs=1e-5)


def test_a_table_is_resampled_over_both_of_its_grids() -> None:
    own, grid = (4, 4), (2, 3)
    table = _map((*own, *own), 5)
    got = resample_bilinear(table, grid)
    assert got.shape == (*grid, *grid)
    keys = np.stack([[_slow_resize(table[r, c], grid) for c in range(own[1])] for r in range(own[0])])
    want = np.empty((*grid, *grid))
    for i in range(grid[0]):
        for j in range(grid[1]):
            want[:, :, i, j] = _slow_resize(keys[:, :, i, j], grid)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    found = map_differences({"ref": _map((*grid, *grid), 6), "other": table})
    assert found is not None and found.resampled == {"other": own}


def test_fewer_than_two_maps_and_all_equal_maps() -> None:
    assert map_differences({}) is None and map_differences({"A": _map((2, 2), 0)}) is None
    same = map_differences({"A": np.ones((2, 2)), "B": np.ones((2, 2))})
    assert same is not None and same.limit == 1e-12  # a usable colour scale even when nothing differs
    nan = map_differences({"A": np.zeros((2, 2)), "B": np.array([[math.nan, 2.0], [-3.0, 0.0]])})
    assert nan is not None and nan.limit == 3.0  # NaN ignored
