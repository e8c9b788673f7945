"""Linear CKA (vitviz/analyses/cka.py) against a slow float64 reference written from its definition
(docs/design.md, "Linear CKA"), on two pairs of architectures; CKA of a model with itself; the minibatch rules."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vitviz import analyses as registry
from vitviz.analyses import AnalysisOptions
from vitviz.data.stream import DatasetSlice, dataset_batches, open_dataset
from vitviz.errors import VitvizError
from vitviz.models import LoadedModel, load_model
from vitviz.pipeline import pair_analyses

CHECKPOINTS = Path(__file__).resolve().parents[1] / "assets" / "checkpoints"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(stem: str) -> LoadedModel:
    path = CHECKPOINTS / f"{stem}.safetensors"
    if not path.is_file():
        pytest.skip(f"needs the bundled checkpoint {stem}")
    return load_model(str(path))


def _images(loaded: LoadedModel, count: int) -> torch.Tensor:
    meta = loaded.meta
    data = open_dataset(
        DatasetSlice("shapes", limit=count),
        input_size=meta.input_size,
        in_chans=meta.in_chans,
        mean=meta.mean,
        std=meta.std,
    )
    return torch.stack([data[i][0] for i in range(count)])


def _features(loaded: LoadedModel, images: torch.Tensor, batch: int) -> list[list[np.ndarray]]:
    """Per block, per image: the block's output flattened, float32 then float64. The images are forwarded in the
    minibatches of the definition (a float32 forward of a batch may differ from one of a single image by 1e-7)."""
    blocks = list(loaded.model.blocks)
    per_block: list[list[np.ndarray]] = [[] for _ in blocks]
    handles = [
        block.register_forward_hook(
            lambda _m, _a, out, i=i: per_block[i].extend(
                row.ravel() for row in out.detach().float().numpy().astype(np.float64)
            )
        )
        for i, block in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                loaded.model.forward_features(images[start : start + batch])
    finally:
        for handle in handles:
            handle.remove()
    return per_block


def _gram(rows: list[np.ndarray]) -> list[list[float]]:
    return [[float(np.dot(x, y)) for y in rows] for x in rows]


def _hsic(k: list[list[float]], m: list[list[float]]) -> float:
    """HSIC₁ with every sum written out, diagonals excluded."""
    b = len(k)
    kt = [[0.0 if i == j else k[i][j] for j in range(b)] for i in range(b)]
    mt = [[0.0 if i == j else m[i][j] for j in range(b)] for i in range(b)]
    trace = sum(kt[i][j] * mt[j][i] for i in range(b) for j in range(b))
    sum_k = sum(kt[i][j] for i in range(b) for j in range(b))
    sum_m = sum(mt[i][j] for i in range(b) for j in range(b))
    cross = sum(kt[i][j] * mt[j][q] for i in range(b) for j in range(b) for q in range(b))
    return (trace + sum_k * sum_m / ((b - 1) * (b - 2)) - 2.0 / (b - 2) * cross) / (b * (b - 3))


def _reference(feats_a: list[list[np.ndarray]], feats_b: list[list[np.ndarray]], b: int) -> np.ndarray:
    """CKA of every pair of blocks: minibatches of b images in order, a last one of fewer than 4 dropped."""
    count = len(feats_a[0])
    batches = [range(s, min(s + b, count)) for s in range(0, count, b)]
    batches = [batch for batch in batches if len(batch) >= 4]
    out = np.zeros((len(feats_a), len(feats_b)))
    for la, fa in enumerate(feats_a):
        for lb, fb in enumerate(feats_b):
            xy = xx = yy = 0.0
            for batch in batches:
                k, m = _gram([fa[i] for i in batch]), _gram([fb[i] for i in batch])
                xy, xx, yy = xy + _hsic(k, m), xx + _hsic(k, k), yy + _hsic(m, m)
            n = len(batches)
            out[la, lb] = (xy / n) / math.sqrt((xx / n) * (yy / n))
    return out


def _cka(a: LoadedModel, b: LoadedModel, images_a: torch.Tensor, images_b: torch.Tensor, batch: int):
    batches = [(images_a[s : s + batch], images_b[s : s + batch]) for s in range(0, len(images_a), batch)]
    return pair_analyses(a, b, batches, ["cka"], AnalysisOptions(batch_size=batch))["cka"]


@pytest.mark.parametrize(
    ("stem_a", "stem_b", "count", "batch"),
    [
        ("shapes-default", "shapes-hybrid", 14, 4),  # ViT vs convolutional stem; a last minibatch of 2 dropped
        ("shapes-default", "shapes-reg4", 13, 5),  # 65 vs 69 tokens; a last minibatch of 3 dropped
        ("shapes-hybrid", "shapes-finetune-hires", 11, 6),  # different input sizes and grids; last of 5 kept
    ],
)
def test_cka_matches_the_reference(stem_a: str, stem_b: str, count: int, batch: int) -> None:
    a, b = _load(stem_a), _load(stem_b)
    images_a, images_b = _images(a, count), _images(b, count)
    result = _cka(a, b, images_a, images_b, batch)
    expected = _reference(_features(a, images_a, batch), _features(b, images_b, batch), batch)
    assert result.matrix.shape == (len(a.model.blocks), len(b.model.blocks))
    np.testing.assert_allclose(result.matrix, expected, rtol=1e-9, atol=1e-12)
    kept = sum(len(range(s, min(s + batch, count))) for s in range(0, count, batch) if min(batch, count - s) >= 4)
    assert (result.batch_size, result.num_images, result.dropped_images) == (batch, kept, count - kept)


def test_cka_of_a_model_with_itself_is_one_on_the_diagonal() -> None:
    for stem in ("shapes-default", "shapes-hybrid"):
        model = _load(stem)
        images = _images(model, 12)
        matrix = _cka(model, model, images, images, 6).matrix
        np.testing.assert_allclose(np.diag(matrix), 1.0, rtol=1e-12)
        np.testing.assert_allclose(matrix, matrix.T, rtol=1e-12)


def test_cka_streams_a_data_set_and_serialises() -> None:
    a, b = _load("shapes-default"), _load("shapes-hybrid")
    slice_ = DatasetSlice("shapes", limit=9)
    data = [
        open_dataset(slice_, input_size=m.meta.input_size, in_chans=3, mean=m.meta.mean, std=m.meta.std) for m in (a, b)
    ]
    batches = (
        (x.images, y.images) for x, y in zip(dataset_batches(data[0], 4), dataset_batches(data[1], 4), strict=True)
    )
    result = pair_analyses(a, b, batches, ["cka"], AnalysisOptions(batch_size=4))["cka"]
    section = registry.section(registry.get("cka"), result, [])
    assert section["batch_size"] == 4 and section["num_images"] == 8 and section["dropped_images"] == 1
    np.testing.assert_array_equal(np.asarray(section["matrix"]), result.matrix)
    again = registry.get("cka").from_arrays(result.to_arrays())
    np.testing.assert_array_equal(again.matrix, result.matrix)


def test_cka_refuses_small_minibatches_in_one_line() -> None:
    a = _load("shapes-default")
    images = _images(a, 4)
    with pytest.raises(VitvizError, match="--batch-size must be at least 4") as caught:
        _cka(a, a, images, images, 3)
    assert "\n" not in str(caught.value)
    with pytest.raises(VitvizError, match="at least 4 images"):
        pair_analyses(a, a, [(images[:3], images[:3])], ["cka"], AnalysisOptions(batch_size=4))


def test_cka_figures() -> None:
    from vitviz.plots import comparison

    matrix = np.array([[1.0, 0.5], [0.25, np.nan], [0.0, 0.75]])
    assert comparison.cka_figure(matrix).axes
    heatmap = comparison.cka_heatmap(matrix)
    np.testing.assert_array_equal(np.asarray(heatmap.data[0].z), matrix)


def test_compare_reads_and_forwards_each_model_once_per_batch_for_every_analysis() -> None:
    """`compare_models` runs the comparisons inside each model's data-set analyses: each model's images are read
    once, and each batch goes through each model's blocks twice, the shared forward (attention, block outputs,
    logits) and gradient rollout's own forward and backward, where a separate CKA pass made it three times. Its
    CKA equals `pair_analyses`' (plain forwards) within float32 rounding of the block outputs."""
    from vitviz.comparison import compare_models, slice_batches

    a, b = _load("shapes-default"), _load("shapes-hybrid")
    open_batches, names, _ = slice_batches(DatasetSlice("shapes", limit=8), [a, b], 4)
    reads = {id(a): 0, id(b): 0}

    def counted(loaded: LoadedModel):
        reads[id(loaded)] += 1
        return open_batches(loaded)

    calls = {"a": 0, "b": 0}

    def counter(side: str):
        def count(*_: object) -> None:
            calls[side] += 1

        return count

    handles = [m.model.blocks[0].register_forward_pre_hook(counter(side)) for side, m in (("a", a), ("b", b))]
    try:
        comparison = compare_models(a, b, counted, AnalysisOptions(batch_size=4), image_names=names)
    finally:
        for handle in handles:
            handle.remove()
    assert reads == {id(a): 1, id(b): 1}
    assert calls == {"a": 2 * 2, "b": 2 * 2}  # 2 batches x (shared forward + gradient rollout's)
    batches = ((x.images, y.images) for x, y in zip(open_batches(a), open_batches(b), strict=True))
    plain = pair_analyses(a, b, batches, ["cka"], AnalysisOptions(batch_size=4))["cka"]
    # The two forwards' block outputs differ by float32 rounding (the capture's explicit softmax against fused
    # attention: about 1e-6 relative after four blocks); CKA, a ratio of sums of their products, passes that on
    # at the same order (1.7e-6 and 8e-7 measured on two kernel paths), far below any difference it shows.
    np.testing.assert_allclose(comparison.pairs["cka"].matrix, plain.matrix, rtol=0, atol=2e-5)
