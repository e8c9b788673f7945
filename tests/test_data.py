"""The training backend's built-in datasets and transforms, checked against independent references.

References: shape masks against matplotlib's point-in-polygon test and the analytic disc; MNIST against the
published md5 sums and a plain numpy read of the IDX bytes; the evaluation transform against docs/design.md's
preprocessing written out by hand.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import random
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.path import Path as PolygonPath
from PIL import Image
from scipy import ndimage

from training.data import DATASET_NAMES, TransformedDataset, build_dataset, eval_transform, train_transform
from training.data.shapes import SHAPE_CLASSES, ShapesDataset, shape_polygons
from training.presets import get_preset
from vitviz.errors import VitvizError

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO_ROOT / "assets" / "data" / "mnist"  # the bundled test set, written out independently of the loader
MNIST_MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
LUMA = np.array([0.299, 0.587, 0.114])


def _image_bytes(dataset, index: int) -> bytes:
    return dataset[index][0].tobytes()


def _reference_region(scene, img_size: tuple[int, int]) -> np.ndarray:
    """The pixels whose centres lie inside the scene's shape, by matplotlib's point-in-polygon test."""
    height, width = img_size
    ys, xs = np.mgrid[0:height, 0:width]
    centres = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(float)
    region = np.zeros(height * width, dtype=bool)
    for polygon, adds in shape_polygons(scene):
        inside = PolygonPath(polygon).contains_points(centres)
        region = region | inside if adds else region & ~inside
    return region.reshape(height, width)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---------------------------------------------------------------- shapes


def test_shapes_same_seed_gives_same_bytes_whatever_the_access_order() -> None:
    first = ShapesDataset(split="train", img_size=(32, 32), num_samples=100, seed=3)
    second = ShapesDataset(split="train", img_size=(32, 32), num_samples=100, seed=3)
    # A worker or a resumed run asks for images in another order; each image depends on its index only.
    later = [_image_bytes(second, i) for i in (57, 3, 99)]
    assert later == [_image_bytes(first, i) for i in (57, 3, 99)]
    assert np.array_equal(first.mask(57), second.mask(57))


def test_shapes_seeds_and_splits_give_different_images() -> None:
    size = (32, 32)
    reference = [_image_bytes(ShapesDataset(split="train", img_size=size, seed=0), i) for i in range(20)]
    other_seed = [_image_bytes(ShapesDataset(split="train", img_size=size, seed=1), i) for i in range(20)]
    val = [_image_bytes(ShapesDataset(split="val", img_size=size, seed=0), i) for i in range(20)]
    test = [_image_bytes(ShapesDataset(split="test", img_size=size, seed=0), i) for i in range(20)]
    assert not set(reference) & set(other_seed)
    assert not set(reference) & set(val) and not set(val) & set(test) and not set(reference) & set(test)
    assert len(set(reference)) == 20


def test_shapes_dataloader_workers_see_the_same_images() -> None:
    dataset = TransformedDataset(
        ShapesDataset(split="val", img_size=(32, 32), num_samples=12),
        eval_transform(input_size=32, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3),
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    from_workers = torch.cat([images for images, _ in loader])
    direct = torch.stack([dataset[i][0] for i in range(12)])
    assert torch.equal(from_workers, direct)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_shapes_size_length_and_balanced_labels(size: tuple[int, int]) -> None:
    dataset = build_dataset("shapes", split="test", img_size=size, num_samples=995)
    assert len(dataset) == 995 and dataset.num_classes == len(SHAPE_CLASSES) >= 10
    image, _ = dataset[0]
    assert image.mode == "RGB" and image.size == (size[1], size[0])
    assert dataset.mask(0).shape == size and dataset.mask(0).dtype == bool
    counts = np.bincount([dataset[i][1] for i in range(len(dataset))], minlength=len(SHAPE_CLASSES))
    assert counts.min() >= 99 and counts.max() <= 100
    assert build_dataset("shapes", split="train").__len__() == 50_000
    assert len(build_dataset("shapes", split="val")) == 1_000


def test_filled_masks_match_an_independent_rasterisation_of_every_class() -> None:
    dataset = ShapesDataset(split="val", img_size=(64, 64), num_samples=400, seed=5)
    checked = set()
    for index in range(len(dataset)):
        _, mask, scene = dataset.render(index)
        if not scene.filled:
            continue
        checked.add(scene.label)
        reference = _reference_region(scene, (64, 64))
        assert _iou(mask, reference) > 0.85, (SHAPE_CLASSES[scene.label], index)
        if SHAPE_CLASSES[scene.label] == "circle":
            ys, xs = np.mgrid[0:64, 0:64]
            disc = (xs - scene.center[0]) ** 2 + (ys - scene.center[1]) ** 2 <= scene.radius**2
            assert _iou(mask, disc) > 0.9
    assert checked == set(range(len(SHAPE_CLASSES)))


def test_outlined_masks_are_a_band_along_the_edge_of_the_shape() -> None:
    dataset = ShapesDataset(split="val", img_size=(64, 64), num_samples=400, seed=6)
    checked = set()
    for index in range(len(dataset)):
        _, mask, scene = dataset.render(index)
        if scene.filled:
            continue
        checked.add(scene.label)
        reference = _reference_region(scene, (64, 64))
        # Distance of every inside pixel to the shape's true edge, which may lie outside the image: measured
        # on a canvas with room around the image.
        pad = 2 * scene.outline_width
        moved = dataclasses.replace(scene, center=(scene.center[0] + pad, scene.center[1] + pad))
        depth = ndimage.distance_transform_edt(_reference_region(moved, (64 + 2 * pad, 64 + 2 * pad)))[
            pad:-pad, pad:-pad
        ]
        near_edge = reference & (depth <= scene.outline_width)
        assert _iou(mask, near_edge) > 0.7, (SHAPE_CLASSES[scene.label], index)
        assert not (mask & ~ndimage.binary_dilation(reference, structure=np.ones((3, 3)))).any()
        assert not (mask & (depth > scene.outline_width + 1.5)).any()  # the inside stays background
    assert checked == set(range(len(SHAPE_CLASSES)))


def test_shapes_are_mostly_inside_the_image_and_stand_out_from_the_background() -> None:
    size = 64
    dataset = ShapesDataset(split="train", img_size=(size, size), num_samples=200, seed=7)
    pad = size
    for index in range(len(dataset)):
        image, mask, scene = dataset.render(index)
        assert mask.any()
        # The whole shape, rasterised on a canvas with room around the image.
        ys, xs = np.mgrid[-pad : size + pad, -pad : size + pad]
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(float)
        whole = np.zeros(len(centres), dtype=bool)
        for polygon, adds in shape_polygons(scene):
            inside = PolygonPath(polygon).contains_points(centres)
            whole = whole | inside if adds else whole & ~inside
        inside_image = whole.reshape(size + 2 * pad, size + 2 * pad)[pad:-pad, pad:-pad].sum()
        assert inside_image >= 0.8 * whole.sum(), index
        # The mask is exactly what was painted: the shape's colour under the mask, other colours just outside.
        luminance = np.asarray(image, dtype=float) @ LUMA
        colour_luminance = float(np.asarray(scene.colour) @ LUMA)
        ring = ndimage.binary_dilation(mask, iterations=2) & ~mask
        assert np.median(np.abs(luminance[mask] - colour_luminance)) < 15, index
        assert np.median(np.abs(luminance[ring] - colour_luminance)) > 50, index


def test_every_split_accepts_slices() -> None:
    full = build_dataset("shapes", split="val", img_size=(32, 32))
    sliced = build_dataset("shapes", split="val[10:20]", img_size=(32, 32))
    assert len(sliced) == 10 and _image_bytes(sliced, 0) == _image_bytes(full, 10)
    assert np.array_equal(sliced.mask(9), full.mask(19))
    assert len(build_dataset("shapes", split="val[:10%]")) == 100
    assert _image_bytes(build_dataset("shapes", split="val[-1:]", img_size=(32, 32)), 0) == _image_bytes(full, 999)
    for bad in ("validation", "train[a:b]", "train[5]"):
        with pytest.raises(VitvizError, match="split"):
            build_dataset("shapes", split=bad)
    with pytest.raises(VitvizError, match="empty"):
        build_dataset("digits", split="test[5:5]")


# ---------------------------------------------------------------- digits


def test_digits_splits_are_fixed_disjoint_stratified_and_scaled() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    splits = {name: build_dataset("digits", split=name, seed=123) for name in ("train", "val", "test")}
    assert sum(len(s) for s in splits.values()) == len(digits.target)
    # Every image of every split is one of sklearn's, scaled 0..16 -> 0..255, with its label, used once.
    reference = Counter(
        (np.round(img * 255 / 16).astype(np.uint8).tobytes(), int(t)) for img, t in zip(digits.images, digits.target)
    )
    seen = []
    for dataset in splits.values():
        assert dataset.in_chans == 1
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert image.mode == "L" and image.size == (8, 8)
            seen.append((image.tobytes(), label))
    assert Counter(seen) == reference
    test_counts = np.bincount([splits["test"][i][1] for i in range(len(splits["test"]))], minlength=10)
    assert test_counts.min() >= 25 and test_counts.max() <= 29
    assert max(np.asarray(splits["train"][i][0]).max() for i in range(50)) == 255
    again = build_dataset("digits", split="test", seed=999)
    assert [_image_bytes(again, i) for i in range(20)] == [_image_bytes(splits["test"], i) for i in range(20)]


def test_num_samples_keeps_a_seeded_subset() -> None:
    a = build_dataset("digits", split="train", num_samples=100, seed=1)
    b = build_dataset("digits", split="train", num_samples=100, seed=1)
    c = build_dataset("digits", split="train", num_samples=100, seed=2)
    assert len(a) == 100
    assert [_image_bytes(a, i) for i in range(100)] == [_image_bytes(b, i) for i in range(100)]
    assert [_image_bytes(a, i) for i in range(100)] != [_image_bytes(c, i) for i in range(100)]
    assert len(set(a[i][1] for i in range(100))) == 10


# ---------------------------------------------------------------- mnist


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    return MNIST_DIR


def test_mnist_reads_the_real_test_set(mnist_dir: Path) -> None:
    for name, md5 in MNIST_MD5.items():
        assert hashlib.md5((mnist_dir / name).read_bytes()).hexdigest() == md5
    dataset = build_dataset("mnist", split="test", root=mnist_dir)
    assert len(dataset) == 10_000 and dataset.in_chans == 1 and dataset.class_names == [str(d) for d in range(10)]
    assert [dataset[i][1] for i in range(10)] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # A plain read of the IDX bytes: 16-byte header for images, 8 for labels.
    raw_images = np.frombuffer(
        gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes()), np.uint8, offset=16
    )
    raw_labels = np.frombuffer(
        gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8
    )
    for i in (0, 1234, 9999):
        image, label = dataset[i]
        assert image.mode == "L" and image.size == (28, 28)
        assert np.array_equal(np.asarray(image), raw_images.reshape(-1, 28, 28)[i]) and label == raw_labels[i]
    head, tail = (
        build_dataset("mnist", split="test[:8000]", root=mnist_dir),
        build_dataset("mnist", split="test[8000:]", root=mnist_dir),
    )
    assert (len(head), len(tail)) == (8000, 2000)
    assert _image_bytes(tail, 0) == _image_bytes(dataset, 8000) and tail[0][1] == dataset[8000][1]


def test_mnist_reads_raw_idx_files_and_rejects_corrupt_ones(mnist_dir: Path, tmp_path: Path) -> None:
    for name in MNIST_MD5:
        (tmp_path / name.removesuffix(".gz")).write_bytes(gzip.decompress((mnist_dir / name).read_bytes()))
    raw = build_dataset("mnist", split="test[:5]", root=tmp_path)
    assert [raw[i][1] for i in range(5)] == [7, 2, 1, 0, 4]

    images_path = tmp_path / "t10k-images-idx3-ubyte"
    good = images_path.read_bytes()
    images_path.write_bytes(good[:-100])  # truncated
    with pytest.raises(VitvizError, match="truncated or corrupt"):
        build_dataset("mnist", split="test", root=tmp_path)
    images_path.write_bytes(b"\x00\x00\x08\x01" + good[4:])  # a labels magic number on the images file
    with pytest.raises(VitvizError, match="magic number"):
        build_dataset("mnist", split="test", root=tmp_path)
    images_path.unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(good)[:5000])  # cut-off gzip
    with pytest.raises(VitvizError, match="gzip"):
        build_dataset("mnist", split="test", root=tmp_path)


def test_mnist_missing_files_name_the_folder_and_the_files(tmp_path: Path, mnist_dir: Path) -> None:
    with pytest.raises(VitvizError) as missing:
        build_dataset("mnist", split="test", root=tmp_path)
    message = str(missing.value)
    assert str(tmp_path) in message and "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    with pytest.raises(VitvizError, match=r"train-images-idx3-ubyte.*test\[:8000\]"):
        build_dataset("mnist", split="train", root=mnist_dir)


def test_mnist_small_preset_reads_the_bundled_test_set_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = get_preset("mnist-small").data
    monkeypatch.chdir(tmp_path)  # nothing MNIST-like here or beside it
    train = build_dataset(data.dataset, split=data.train_split, root=data.root)
    held_out = build_dataset(data.dataset, split=data.eval_split, root=data.root)
    assert (len(train), len(held_out)) == (8000, 2000)
    raw_labels = np.frombuffer(
        gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8
    )
    assert [held_out[i][1] for i in range(5)] == raw_labels[8000:8005].tolist()


# ---------------------------------------------------------------- torchvision sets


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10", "cifar100"])
def test_torchvision_sets_offline_say_where_and_that_download_needs_the_network(name: str, tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(VitvizError) as missing:
        build_dataset(name, split="test", root=root, download=False)
    message = str(missing.value)
    assert str(root) in message and "network" in message and "\n" not in message
    assert not root.exists()


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10"])
def test_failed_download_is_one_line(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)  # belt and braces: nothing may leave the machine
    with pytest.raises(VitvizError) as failed:
        build_dataset(name, split="test", root=tmp_path, download=True)
    message = str(failed.value)
    assert str(tmp_path) in message and "network" in message and "\n" not in message


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_is_served_from_torchvision_files(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 28, 28)), np.arange(12) % 10
    for stem in ("t10k", "train"):
        _write_idx(raw / f"{stem}-images-idx3-ubyte", images, 0x803)
        _write_idx(raw / f"{stem}-labels-idx1-ubyte", labels, 0x801)
    dataset = build_dataset("fashion-mnist", split="test[2:]", root=tmp_path)
    assert len(dataset) == 10 and dataset.in_chans == 1 and dataset.class_names[0] == "T-shirt/top"
    image, label = dataset[0]
    assert np.array_equal(np.asarray(image), images[2]) and label == 2


# ---------------------------------------------------------------- folder


def _make_folder(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.png")


def test_folder_hash_split_is_deterministic_disjoint_and_complete(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"zebra": 40, "ant": 40, "cat": 40})
    (tmp_path / "cat" / "._000.png").write_bytes(b"not an image")  # macOS resource fork, ignored
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    splits = {name: build_dataset("folder", split=name, root=tmp_path) for name in ("train", "val", "test")}
    paths = {name: [p.relative_to(tmp_path).as_posix() for p in d.paths] for name, d in splits.items()}
    all_paths = [p for ps in paths.values() for p in ps]
    assert sorted(all_paths) == sorted(f"{c}/{i:03d}.png" for c in ("zebra", "ant", "cat") for i in range(40))
    assert len(paths["train"]) > len(paths["val"]) > 0 and len(paths["test"]) > 0
    assert paths == {
        name: [p.relative_to(tmp_path).as_posix() for p in build_dataset("folder", split=name, root=tmp_path).paths]
        for name in splits
    }
    dataset = splits["train"]
    assert dataset.class_names == ["ant", "cat", "zebra"] and dataset.in_chans == 3
    image, label = dataset[0]
    assert image.mode == "RGB" and image.size == (12, 10)
    assert dataset.class_names[label] == dataset.paths[0].parent.name


def test_folder_images_are_served_as_rgb_and_broken_files_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "train" / "grey").mkdir(parents=True)
    (tmp_path / "val" / "grey").mkdir(parents=True)
    Image.fromarray(np.full((6, 5), 200, dtype=np.uint8)).save(tmp_path / "train" / "grey" / "a.png")
    (tmp_path / "val" / "grey" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    image, _ = build_dataset("folder", split="train", root=tmp_path)[0]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (200, 200, 200)
    with pytest.raises(VitvizError, match="broken.png"):
        build_dataset("folder", split="val", root=tmp_path)[0]


def test_folder_with_split_folders_is_used_as_given(tmp_path: Path) -> None:
    _make_folder(tmp_path / "train", {"a": 3, "b": 2})
    _make_folder(tmp_path / "val", {"b": 2})
    train, val = (build_dataset("folder", split=s, root=tmp_path) for s in ("train", "val"))
    assert (len(train), len(val)) == (5, 2) and val.class_names == ["a", "b"]
    assert [val[i][1] for i in range(2)] == [1, 1]
    with pytest.raises(VitvizError, match="test"):
        build_dataset("folder", split="test", root=tmp_path)


def test_folder_without_images_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(VitvizError, match="no images"):
        build_dataset("folder", root=tmp_path)
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "readme.txt").write_text("no pictures here")
    with pytest.raises(VitvizError, match="no images"):
        build_dataset("folder", root=tmp_path)
    with pytest.raises(VitvizError, match="needs a root"):
        build_dataset("folder")


def test_a_folder_summary_counts_classes_and_the_images_of_each_split_as_training_reads_them(tmp_path: Path) -> None:
    from vitviz.data.folder import summarize_folder

    _make_folder(tmp_path / "flat", {"zebra": 40, "ant": 40, "cat": 40})
    summary = summarize_folder(f"  {tmp_path / 'flat'} ")
    assert summary.class_names == ["ant", "cat", "zebra"]
    lengths = {s: len(build_dataset("folder", split=s, root=tmp_path / "flat")) for s in ("train", "val", "test")}
    assert summary.images == lengths and summary.total == 120
    assert (
        summary.describe()
        == f"3 classes, 120 images (train {lengths['train']}, val {lengths['val']}, test {lengths['test']})"
    )
    _make_folder(tmp_path / "given" / "train", {"a": 3, "b": 2})
    _make_folder(tmp_path / "given" / "val", {"b": 2})
    assert summarize_folder(tmp_path / "given").images == {"train": 5, "val": 2}  # no test/ folder: none counted


def test_a_folder_training_could_not_use_is_one_line(tmp_path: Path) -> None:
    from vitviz.data.folder import summarize_folder

    with pytest.raises(VitvizError, match="give the path"):
        summarize_folder("  ")
    with pytest.raises(VitvizError, match="does not exist"):
        summarize_folder(tmp_path / "missing")
    with pytest.raises(VitvizError, match="no images"):
        summarize_folder(tmp_path)
    _make_folder(tmp_path / "one", {"only": 20})
    with pytest.raises(VitvizError, match="1 class folder; a classifier needs at least two"):
        summarize_folder(tmp_path / "one")
    _make_folder(tmp_path / "noval" / "train", {"a": 2, "b": 2})
    with pytest.raises(VitvizError, match="no val/"):
        summarize_folder(tmp_path / "noval")  # training needs a val split too


def test_unknown_dataset_names_are_user_errors() -> None:
    assert DATASET_NAMES == ("shapes", "digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "folder")
    with pytest.raises(VitvizError, match="unknown dataset"):
        build_dataset("imagenet")
    with pytest.raises(VitvizError, match="fashion-mnist is not in"):
        build_dataset("Fashion_MNIST", split="test", root="/nonexistent/x")


# ---------------------------------------------------------------- transforms


def test_eval_transform_is_the_analysis_preprocessing() -> None:
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    rng = np.random.default_rng(0)
    # At the input size: only normalised, (x / 255 - mean) / std per channel.
    pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    out = eval_transform(input_size=(24, 40), in_chans=3, mean=mean, std=std)(Image.fromarray(pixels))
    expected = (pixels / 255.0 - np.array(mean)) / np.array(std)
    assert out.shape == (3, 24, 40) and out.dtype == torch.float32
    assert np.allclose(out.numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    # Another size: resized straight to (H, W) with bicubic, nothing cropped.
    big = rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(big).resize((40, 24), Image.BICUBIC)) / 255.0
    out = eval_transform(input_size=(24, 40), in_chans=3, mean=mean, std=std)(Image.fromarray(big))
    assert np.allclose(out.numpy(), ((resized - np.array(mean)) / np.array(std)).transpose(2, 0, 1), atol=1e-5)
    # Left half black, right half white stays split in the middle: the whole image is kept.
    halves = np.zeros((48, 80), dtype=np.uint8)
    halves[:, 40:] = 255
    grey = eval_transform(input_size=(24, 40), in_chans=1, mean=(0.5,), std=(0.5,))(
        Image.fromarray(halves).convert("RGB")
    )
    assert grey.shape == (1, 24, 40)
    assert np.allclose(grey[0, :, :18].numpy(), -1.0, atol=1e-3) and np.allclose(
        grey[0, :, 22:].numpy(), 1.0, atol=1e-3
    )


def test_eval_transform_converts_channels() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    grey = eval_transform(input_size=8, in_chans=1, mean=(0.0,), std=(1.0,))(Image.fromarray(rgb))
    assert np.allclose(grey[0].numpy(), np.asarray(Image.fromarray(rgb).convert("L")) / 255.0)
    colour = eval_transform(input_size=8, in_chans=3, mean=(0.0,) * 3, std=(1.0,) * 3)(Image.fromarray(rgb[:, :, 0]))
    assert colour.shape == (3, 8, 8) and torch.equal(colour[0], colour[2])
    with pytest.raises(VitvizError, match="mean and std"):
        eval_transform(input_size=8, in_chans=1, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize(
    "augment", ["light", "digits", "randaug", {"auto_augment": "rand-m9-mstd0.5", "re_prob": 0.5, "re_mode": "pixel"}]
)
def test_train_transform_is_repeatable_under_a_torch_seed(in_chans: int, augment) -> None:
    dataset = build_dataset("digits" if in_chans == 1 else "shapes", split="val[:16]", img_size=(32, 32))
    stats = (0.5,) * in_chans
    transform = train_transform(input_size=(24, 32), in_chans=in_chans, mean=stats, std=stats, augment=augment)
    python_state = random.getstate()

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.stack([transform(dataset[i][0]) for i in range(len(dataset))])

    first, again, other = run(0), run(0), run(1)
    assert first.shape == (16, in_chans, 24, 32) and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert random.getstate() == python_state  # the caller's Python RNG is left as it was
    plain = eval_transform(input_size=(24, 32), in_chans=in_chans, mean=stats, std=stats)
    assert not torch.equal(first, torch.stack([plain(dataset[i][0]) for i in range(len(dataset))]))


def test_digits_augmentation_shifts_and_zooms_but_never_mirrors() -> None:
    """A handwritten 7 mirrored is not a 7: the digits recipe crops and rescales, it never flips or recolours."""
    canvas = np.zeros((28, 28), np.uint8)
    canvas[4:8, 6:22] = 255  # a 7: top bar
    canvas[8:24, 16:20] = 255  # and its stem on the right
    picture = Image.fromarray(canvas)
    transform = train_transform(input_size=28, in_chans=1, mean=(0.0,), std=(1.0,), augment="digits")
    torch.manual_seed(0)
    for _ in range(50):
        out = transform(picture)[0].numpy()
        columns = out.sum(axis=0)
        ink = np.flatnonzero(columns > 0.5 * columns.max())
        assert ink.mean() > 13.5  # the stem stays on the right half: never mirrored
        assert out.max() <= 1.0 + 1e-6 and out.min() >= 0.0  # intensities only resampled, no colour jitter


def test_train_transform_rejects_unknown_augmentations() -> None:
    with pytest.raises(VitvizError, match="unknown augmentation"):
        train_transform(input_size=32, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3, augment="sparkles")
    with pytest.raises(VitvizError, match="unknown augmentation option"):
        train_transform(input_size=32, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3, augment={"mixup": 0.8})


def test_transformed_dataset_yields_tensors_and_labels() -> None:
    base = build_dataset("digits", split="test[:4]")
    dataset = TransformedDataset(base, eval_transform(input_size=16, in_chans=1, mean=(0.5,), std=(0.5,)))
    image, label = dataset[3]
    assert len(dataset) == 4 and image.shape == (1, 16, 16) and label == base[3][1]


def test_importing_training_is_light() -> None:
    code = "import sys, training; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- in-memory data


@pytest.mark.parametrize(
    ("name", "input_size", "in_chans", "mean", "std"),
    [
        ("shapes", (32, 32), 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),  # rendered at the input size
        ("shapes", (24, 40), 1, (0.45,), (0.22,)),  # resized, RGB made grey, non-square
        ("digits", (16, 16), 1, (0.1307,), (0.3081,)),  # 8x8 grey, upsampled
    ],
)
def test_in_memory_batches_equal_the_eval_transform_bit_for_bit(
    name: str, input_size: tuple[int, int], in_chans: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    from training.data.memory import InMemoryImages

    dataset = build_dataset(name, split="val", img_size=(32, 32), num_samples=40)
    memory = InMemoryImages(dataset, input_size=input_size, in_chans=in_chans, mean=mean, std=std, num_workers=0)
    assert memory.pixels.dtype == torch.uint8 and memory.pixels.shape == (len(dataset), in_chans, *input_size)
    transform = eval_transform(input_size=input_size, in_chans=in_chans, mean=mean, std=std)
    indices = [7, 0, 39, 7, 12]
    images, labels = memory.batch(indices)
    expected = torch.stack([transform(dataset[i][0]) for i in indices])
    assert torch.equal(images, expected)  # exact: a run trains on the same numbers with or without the cache
    assert labels.tolist() == [dataset[i][1] for i in indices]
