"""Data-set runs of `analyze` and `faithfulness` (docs/design.md, "Data sets and torchrun"): the images are those
`python -m training evaluate` reads, batches stream without being kept, the aggregates match references written
from the definitions, and two gloo processes under torchrun write the JSON one process writes."""

from __future__ import annotations

import gc
import json
import math
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fakes import torchrun
from vitviz.cli import main
from vitviz.data.shapes import SHAPE_CLASSES
from vitviz.data.stream import DatasetSlice, Ranks, dataset_batches, open_dataset, rank_batches
from vitviz.faithfulness import FaithfulnessOptions, dataset_faithfulness, run_faithfulness
from vitviz.models import ModelMeta, ViTConfig, build_model, load_model, save_checkpoint
from vitviz.pipeline import AnalysisOptions, dataset_analyses, image_analyses

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny shapes classifier (32x32 px, 4x4 patches of 8 px) with peaky attention: q and k weights x6."""
    cfg = ViTConfig(img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * cfg.embed_dim] *= 6.0
    meta = ModelMeta(
        arch="vitviz",
        config=cfg,
        class_names=list(SHAPE_CLASSES),
        input_size=cfg.img_size,
        in_chans=3,
        mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.25, 0.3),
        training={"dataset": "shapes"},
        resolution_history=[],
    )
    path = tmp_path_factory.mktemp("dataset-scale") / "tiny.safetensors"
    save_checkpoint(path, model, meta)
    return path


def _slice_dataset(checkpoint: Path, slice_: DatasetSlice):
    loaded = load_model(str(checkpoint))
    meta = loaded.meta
    return loaded, open_dataset(
        slice_, input_size=meta.input_size, in_chans=meta.in_chans, mean=meta.mean, std=meta.std
    )


def test_training_reexports_the_core_readers() -> None:
    import training.data
    import training.data.shapes
    import vitviz.data
    import vitviz.data.shapes

    assert training.data.build_dataset is vitviz.data.build_dataset
    assert training.data.eval_transform is vitviz.data.eval_transform
    assert training.data.shapes.ShapesDataset is vitviz.data.shapes.ShapesDataset


def test_a_shapes_slice_is_what_training_evaluate_reads(checkpoint: Path) -> None:
    """Same images, same labels, same pixels: evaluate's build_dataset + eval_transform with the model's meta."""
    from training.data import build_dataset, eval_transform

    loaded, data = _slice_dataset(checkpoint, DatasetSlice("shapes", split="test", limit=12))
    meta = loaded.meta
    evaluated = build_dataset("shapes", split="test", img_size=meta.input_size, root=None, num_samples=None, seed=0)
    transform = eval_transform(input_size=meta.input_size, in_chans=meta.in_chans, mean=meta.mean, std=meta.std)
    assert len(data) == 12 and data.class_names == list(evaluated.class_names)
    for index in range(12):
        image, label, position = data[index]
        raw, expected_label = evaluated[index]
        assert (label, position) == (expected_label, index)
        assert torch.equal(image, transform(raw))
    # The normalisation is the model's own: undoing it gives the rendered pixels / 255.
    raw = np.asarray(evaluated[3][0], dtype=np.float64) / 255.0
    mean, std = np.asarray(meta.mean), np.asarray(meta.std)
    undone = data[3][0].double().numpy().transpose(1, 2, 0) * std + mean
    np.testing.assert_allclose(undone, raw, atol=1e-6)


def test_the_bundled_default_scores_on_a_slice_what_training_evaluate_scores(tmp_path: Path) -> None:
    """The top-1 accuracy of `analyze --dataset` over the first 100 shapes test images, and each prediction,
    agree with `python -m training evaluate` on those images (its confusion matrix)."""
    from training.evaluate import evaluate_checkpoint

    default = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
    out = tmp_path / "out.json"
    code = main(["analyze", str(default), "--dataset", "shapes", "--limit", "100", "--analyses", "rollout"])
    assert code == 2  # nothing to write
    assert main(["analyze", str(default), "--dataset", "shapes", "--limit", "100", "--analyses", "rollout",
                 "--json", str(out)]) == 0  # fmt: skip
    section = json.loads(out.read_text())["dataset"]
    evaluated = evaluate_checkpoint(
        str(default), dataset="shapes", split="test", num_samples=100, device="cpu", faithfulness_images=0
    )
    assert section["num_images"] == evaluated["num_images"] == 100
    assert section["accuracy"] == evaluated["accuracy"]
    confusion = np.zeros((10, 10), dtype=np.int64)
    for entry in section["per_image"]:
        confusion[entry["label"], entry["predicted"]] += 1
    assert confusion.tolist() == evaluated["confusion_matrix"]


@pytest.mark.parametrize("num_images", [1, 7, 16, 17])
@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_ranks_take_whole_one_process_batches_each_image_once(num_images: int, batch_size: int) -> None:
    single = rank_batches(num_images, batch_size)
    assert [i for batch in single for i in batch] == list(range(num_images))
    assert all(batch == list(range(batch[0], batch[0] + len(batch))) for batch in single)
    for world in (2, 3):
        shards = [rank_batches(num_images, batch_size, rank, world) for rank in range(world)]
        assert sorted(b for shard in shards for b in shard) == single  # every batch is a one-process batch
        for rank, shard in enumerate(shards):
            assert shard == single[rank::world]


def test_batches_stream_without_being_kept(checkpoint: Path) -> None:
    """dataset_analyses and dataset_faithfulness hold no batch once they ask for the next: memory does not grow with N."""
    loaded, data = _slice_dataset(checkpoint, DatasetSlice("shapes", limit=9))
    alive: list[weakref.ref] = []

    def watched() -> Iterator:
        for batch in dataset_batches(data, 4):
            gc.collect()
            assert all(ref() is None for ref in alive), "an earlier batch's images are still held"
            alive.append(weakref.ref(batch.images))
            yield batch

    results = dataset_analyses(loaded, watched(), ["distance", "rollout"], AnalysisOptions(batch_size=4))
    assert len(alive) == 3 and results.num_images == 9
    alive.clear()
    options = FaithfulnessOptions(methods=("rollout",), steps=4)
    curves = dataset_faithfulness(loaded.model, watched(), options)
    assert len(alive) == 3 and curves.dataset["num_images"] == 9


def _patch_centres(grid: tuple[int, int], stride: tuple[int, int]) -> list[tuple[float, float]]:
    return [((r + 0.5) * stride[0], (c + 0.5) * stride[1]) for r in range(grid[0]) for c in range(grid[1])]


class _Keep:
    """Capture consumer keeping every layer's attention."""

    def __init__(self) -> None:
        self.layers: dict[int, torch.Tensor] = {}

    def consume(self, layer_index: int, attn: torch.Tensor) -> None:
        self.layers[layer_index] = attn.detach().double().clone()


def test_dataset_analyses_match_references_from_the_definitions(checkpoint: Path) -> None:
    from vitviz.capture import capture_attention
    from vitviz.tokens import token_layout

    loaded, data = _slice_dataset(checkpoint, DatasetSlice("shapes", split="val", limit=10))
    options = AnalysisOptions(batch_size=4)
    results = dataset_analyses(
        loaded, dataset_batches(data, 4), ["filters", "distance", "rollout", "gradient-rollout"], options
    )
    layout = token_layout(loaded.model)
    centres = _patch_centres(layout.grid, layout.stride)
    prefix, count = layout.num_prefix_tokens, len(data)
    per_image = []  # [N][L][H] from the definition: mean over patch queries of sum_k w[q, k] * |c_q - c_k|
    rollouts, gradients, predicted = [], [], []
    for index in range(count):
        image = data[index][0][None]
        keep = _Keep()
        capture_attention(loaded.model, image, [keep])
        values = []
        for layer in range(len(keep.layers)):
            attn = keep.layers[layer][0]
            heads = []
            for head in range(attn.shape[0]):
                total = 0.0
                for q, (qy, qx) in enumerate(centres):
                    total += sum(
                        float(attn[head, prefix + q, prefix + k]) * math.hypot(qy - ky, qx - kx)
                        for k, (ky, kx) in enumerate(centres)
                    )
                heads.append(total / len(centres))
            values.append(heads)
        per_image.append(values)
        one = image_analyses(loaded, image, ["rollout", "gradient-rollout"], options)
        rollouts.append(one.rollouts[0].map)
        gradients.append(one.gradients[0].map)
        predicted.append(int(np.argmax(one.probabilities[0])))
    reference = np.asarray(per_image)  # (N, L, H)
    distance = results.distance
    np.testing.assert_allclose(distance.per_image, reference.transpose(1, 0, 2), rtol=1e-5)
    np.testing.assert_allclose(distance.pixels, reference.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(distance.std, reference.std(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(distance.fraction, reference.mean(axis=0) / 32, rtol=1e-5)
    assert distance.num_images == count and distance.std.max() > 0.1  # the images really differ
    np.testing.assert_allclose(results.rollout_mean, np.mean(rollouts, axis=0), rtol=1e-5)
    np.testing.assert_allclose(results.gradient_mean, np.mean(gradients, axis=0), rtol=1e-5, atol=1e-9)
    assert results.predicted.tolist() == predicted == results.gradient_targets.tolist()
    labels = [data[i][1] for i in range(count)]
    assert results.labels.tolist() == labels and results.indices.tolist() == list(range(count))
    assert results.accuracy() == sum(p == y for p, y in zip(predicted, labels)) / count
    with pytest.raises(Exception, match="map per image"):
        dataset_analyses(loaded, dataset_batches(data, 4), ["distance", "head-maps"], options)


def test_dataset_faithfulness_is_run_faithfulness_per_image_and_its_means(checkpoint: Path) -> None:
    loaded, data = _slice_dataset(checkpoint, DatasetSlice("digits", limit=6))
    options = FaithfulnessOptions(methods=("rollout", "random"), steps=5, batch_size=8)
    streamed = dataset_faithfulness(
        loaded.model, dataset_batches(data, 4), options, image_name=data.slice.image_name, dataset={"name": "digits"}
    )
    images = torch.stack([data[i][0] for i in range(6)])
    whole = run_faithfulness(loaded.model, images, [data.slice.image_name(i) for i in range(6)], options)
    assert streamed.steps == whole.steps == 5 and streamed.dataset == {"name": "digits", "num_images": 6}
    for name in options.methods:
        ours, theirs = streamed.methods[name], whole.methods[name]
        assert [c.image for c in ours.per_image] == [f"digits:test[{i}]" for i in range(6)]
        assert [c.label for c in ours.per_image] == [data[i][1] for i in range(6)]
        assert [c.target_class for c in ours.per_image] == [c.target_class for c in theirs.per_image]
        for mine, reference in zip(ours.per_image, theirs.per_image):
            assert mine.deletion_auc == pytest.approx(reference.deletion_auc, abs=1e-6)
            assert mine.insertion_auc == pytest.approx(reference.insertion_auc, abs=1e-6)
        assert ours.deletion_auc == pytest.approx(sum(c.deletion_auc for c in ours.per_image) / 6, abs=1e-15)
        assert ours.insertion_auc == pytest.approx(theirs.insertion_auc, abs=1e-6)
        mean_deletion = np.mean([c.deletion.numpy() for c in theirs.per_image], axis=0)
        np.testing.assert_allclose(ours.mean_deletion.numpy(), mean_deletion, atol=1e-6)
        np.testing.assert_allclose(
            ours.mean_insertion.numpy(), np.mean([c.insertion.numpy() for c in theirs.per_image], axis=0), atol=1e-6
        )
        assert "map" not in ours.to_json()["per_image"][0]
    with pytest.raises(Exception, match="sanity"):
        dataset_faithfulness(loaded.model, dataset_batches(data, 4), FaithfulnessOptions(sanity=True))


def _one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--dataset", "shapes", "--split", "tset"], "unknown split 'tset'"),
        (["--dataset", "folder:{tmp}/absent"], "does not exist"),
        (["--dataset", "cifar10", "--root", "{tmp}"], "cifar10 is not in"),
        (["--dataset", "mnist", "--root", "{tmp}"], "MNIST test split not found"),
        (["--dataset", "shapes", "--limit", "0"], "--limit must be at least 1"),
        (["--dataset", "shapes", "--images", "x.png"], "not both"),
        (["--limit", "5"], "--limit needs --dataset"),
    ],
)
@pytest.mark.parametrize("command", ["analyze", "faithfulness"])
def test_a_data_set_that_is_not_there_is_one_line_and_status_2(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, arguments: list, expected: str
) -> None:
    argv = [command, str(checkpoint), *(a.replace("{tmp}", str(tmp_path)) for a in arguments)]
    code = main([*argv, "--json", str(tmp_path / "out.json")])
    assert expected in _one_line(code, capsys.readouterr().err)
    assert not (tmp_path / "out.json").exists()


def test_two_gloo_processes_write_the_one_process_json(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """14 shapes images in batches of 4: rank 0 takes batches 0 and 2, rank 1 batches 1 and 3 (2 images)."""
    common = [str(checkpoint), "--dataset", "shapes", "--limit", "14", "--batch-size", "4"]
    assert main(["analyze", *common, "--json", str(tmp_path / "one.json")]) == 0
    torchrun("vitviz", "analyze", *common, "--json", str(tmp_path / "two.json"))
    one = (tmp_path / "one.json").read_bytes()
    assert (tmp_path / "two.json").read_bytes() == one  # byte for byte
    document = json.loads(one)
    assert document["dataset"]["num_images"] == 14 and len(document["dataset"]["per_image"]) == 14
    assert [e["index"] for e in document["dataset"]["per_image"]] == list(range(14))
    assert {"distance", "rollout", "gradient_rollout", "filters", "position"} <= set(document)

    faithful = [str(checkpoint), "--dataset", "shapes", "--limit", "10", "--batch-size", "4"]
    faithful += ["--methods", "rollout,gradient-rollout,random", "--steps", "6"]
    assert main(["faithfulness", *faithful, "--json", str(tmp_path / "f-one.json")]) == 0
    torchrun("vitviz", "faithfulness", *faithful, "--json", str(tmp_path / "f-two.json"))
    single, double = (json.loads((tmp_path / name).read_text()) for name in ("f-one.json", "f-two.json"))
    for document in (single, double):
        for method in document["methods"].values():
            assert method.pop("seconds_per_image") > 0  # wall time: the one number that may differ
    assert double == single
    assert [e["index"] for e in single["methods"]["random"]["per_image"]] == list(range(10))
    capsys.readouterr()


def test_ranks_without_torchrun_are_one_process() -> None:
    ranks = Ranks.from_environment()
    assert (ranks.rank, ranks.world_size, ranks.is_main) == (0, 1, True)
    assert ranks.gather({"a": 1}) == [{"a": 1}]


def test_figures_of_a_data_set_run(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = [str(checkpoint), "--dataset", "mnist", "--limit", "3", "--figures"]
    assert main(["analyze", *common, str(tmp_path / "a"), "--analyses", "filters,distance"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "distance.png", "distance.svg", "filters.png", "filters.svg",
    ]  # fmt: skip
    assert main(["faithfulness", *common, str(tmp_path / "f"), "--methods", "random", "--steps", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["faithfulness-curves.png", "faithfulness-curves.svg"]
    capsys.readouterr()
