"""vitviz.imagefiles: the one rule for which files are images, and the places that follow it: the CLI's
--images, the studio's sample sets and the folder data set agree on the bundled samples and on any folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitviz.errors import VitvizError
from vitviz.imagefiles import collect_images, image_extensions, images_in, images_under, is_image_name
from vitviz.images import ALLOWED_FORMATS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "assets" / "checkpoints" / "shapes-default.safetensors"
SAMPLES = ROOT / "assets" / "samples"


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (4, 4)).save(folder / name, format="PNG")  # the name, not the bytes, decides


def test_extensions_are_the_decoders_formats() -> None:
    registered = Image.registered_extensions()
    assert all(registered[ext] in ALLOWED_FORMATS for ext in image_extensions())
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= set(image_extensions())
    assert ".eps" in registered and ".eps" not in image_extensions()  # PIL opens it, vitviz refuses it
    assert list(image_extensions()) == sorted(image_extensions())


@pytest.mark.parametrize(
    ("name", "image"),
    [
        ("photo.jpg", True),
        ("PHOTO.JPEG", True),
        ("circle-mask.png", True),  # no name is special: masks are kept in their own folder
        (".photo.png", False),
        ("._photo.jpg", False),  # a macOS resource fork
        ("notes.txt", False),
        ("drawing.svg", False),
        ("page.eps", False),
        ("png", False),
    ],
)
def test_an_image_name_is_visible_with_a_decodable_extension(name: str, image: bool) -> None:
    assert is_image_name(name) is image


def test_a_folder_lists_its_visible_image_files_sorted_by_name(tmp_path: Path) -> None:
    _touch(tmp_path, "b.png", "a.JPG", "C.webp", ".hidden.png", "notes.txt", "b-mask.png")
    (tmp_path / "sub").mkdir()
    _touch(tmp_path / "sub", "deeper.png")
    (tmp_path / "folder.png").mkdir()  # a folder with an image's name is not a file
    assert [p.name for p in images_in(tmp_path)] == ["C.webp", "a.JPG", "b-mask.png", "b.png"]
    assert all(p.parent == tmp_path for p in images_in(tmp_path))


def test_links_to_files_count_and_links_to_folders_are_not_followed(tmp_path: Path) -> None:
    elsewhere, folder = tmp_path / "elsewhere", tmp_path / "folder"
    _touch(elsewhere, "outside.png")
    _touch(folder, "inside.png")
    (folder / "linked.png").symlink_to(elsewhere / "outside.png")
    (folder / "dir-link.png").symlink_to(elsewhere, target_is_directory=True)
    (folder / "sub").symlink_to(elsewhere, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # followed, the walk would never end
    (folder / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    assert [p.name for p in images_in(folder)] == ["inside.png", "linked.png"]
    assert [p.relative_to(folder).as_posix() for p in images_under(folder)] == ["inside.png", "linked.png"]


def test_a_tree_is_walked_folder_by_folder_without_hidden_folders(tmp_path: Path) -> None:
    _touch(tmp_path, "z.png", "a.png")
    _touch(tmp_path / "b", "y.png")
    _touch(tmp_path / "b" / "c", "x.png")
    _touch(tmp_path / ".ipynb_checkpoints", "a-checkpoint.png")
    found = [p.relative_to(tmp_path).as_posix() for p in images_under(tmp_path)]
    assert found == ["a.png", "z.png", "b/y.png", "b/c/x.png"]


def test_the_tree_order_is_torchvisions_image_folder_order(tmp_path: Path) -> None:
    """The folder data set's indices did not move when it stopped listing through torchvision."""
    from torchvision.datasets.folder import make_dataset

    _touch(tmp_path / "cat", "b.png", "a.png", "note.txt")
    _touch(tmp_path / "cat" / "a", "z.jpg")
    _touch(tmp_path / "cat" / "a-b", "y.png")
    _touch(tmp_path / "cat" / "A", "w.png")
    expected = make_dataset(str(tmp_path), {"cat": 0}, is_valid_file=lambda path: is_image_name(os.path.basename(path)))
    assert [str(p) for p in images_under(tmp_path / "cat")] == [path for path, _ in expected]


def test_a_folder_without_images_is_one_line_user_error(tmp_path: Path) -> None:
    _touch(tmp_path, ".hidden.png")
    (tmp_path / "notes.txt").write_text("no pictures")
    with pytest.raises(VitvizError, match=f"no images in folder {tmp_path}") as caught:
        collect_images([tmp_path])
    assert "\n" not in str(caught.value)
    assert images_in(tmp_path) == [] and images_under(tmp_path) == []
    with pytest.raises(VitvizError, match="no such image file or folder"):
        collect_images([tmp_path / "missing"])


def test_files_named_one_by_one_are_kept_in_the_order_given(tmp_path: Path) -> None:
    _touch(tmp_path / "folder", "b.png", "a.png")
    _touch(tmp_path, "z.png")
    (tmp_path / "named.txt").write_text("the decoder says whether this is an image")
    got = collect_images([tmp_path / "z.png", str(tmp_path / "folder"), tmp_path / "named.txt"])
    assert [p.name for p in got] == ["z.png", "a.png", "b.png", "named.txt"]


def test_the_folder_data_set_follows_the_rule(tmp_path: Path) -> None:
    from vitviz.data import build_dataset

    _touch(tmp_path / "train" / "cat", "a.png", "._a.png", "b.jpg", "notes.txt")
    _touch(tmp_path / "train" / "cat" / ".cache", "c.png")
    _touch(tmp_path / "elsewhere", "d.png")
    (tmp_path / "train" / "cat" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _touch(tmp_path / "val" / "cat", "e.png")
    train = build_dataset("folder", split="train", root=tmp_path)
    assert [p.name for p in train.paths] == ["a.png", "b.jpg"]


@pytest.mark.usefixtures("one_torch_thread")
def test_the_command_line_and_the_studio_analyse_the_same_samples(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`analyze --images assets/samples` and the studio's sample set: the same ten images, the same numbers."""
    from vitviz import pipeline
    from vitviz.cli import main
    from vitviz.images import decode_image
    from vitviz.models import file_sha256, load_model
    from vitviz.ui import catalog
    from vitviz.ui.analyses import InputImage, model_input

    monkeypatch.chdir(ROOT)
    argv = ["analyze", str(DEFAULT), "--images", "assets/samples", "--json", "-", "--analyses", "distance,rollout"]
    capsys.readouterr()
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)

    # As the studio does: the picker's default set, decoded, preprocessed one by one, through the service.
    sample_set = catalog.discover_sample_sets()[0]
    loaded = load_model(str(DEFAULT))
    images = [InputImage(p.name, file_sha256(p), np.asarray(decode_image(p))) for p in sample_set.files]
    inputs = [model_input(loaded, image) for image in images]
    studio = pipeline.image_analyses(loaded, inputs, ("distance", "rollout"), pipeline.AnalysisOptions())

    assert len(sample_set.files) == 10
    assert [(ROOT / entry["image"]).resolve() for entry in doc["rollout"]] == [p.resolve() for p in sample_set.files]
    assert doc["distance"]["num_images"] == studio.distance.num_images == 10
    np.testing.assert_array_equal(np.asarray(doc["distance"]["pixels"]), studio.distance.pixels)
    for entry, rollout in zip(doc["rollout"], studio.rollouts, strict=True):
        np.testing.assert_array_equal(np.asarray(entry["map"]), rollout.map)
