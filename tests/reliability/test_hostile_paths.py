"""Hostile and odd paths through the command line: output targets that are not regular files, a full disk under
--figures, data-set folders with link loops, links to / and FIFOs, file names that would split or disguise the
one error line, work limits far beyond memory, models without a classification head, and one rank's bad image
under torchrun.

Everything is generated in the test's temporary folder: FIFOs and symbolic links it creates there, and a link
to /dev/null that is only ever stat-ed (a writer that followed it would be refused, one that replaced it would
replace the link, never the device).
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from tests.reliability.conftest import one_line_cli_error
from vitviz.cli import main
from vitviz.errors import VitvizError, quoted
from vitviz.fileio import atomic_write_text, writable_target

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _refused(code: int, capsys: pytest.CaptureFixture[str]) -> str:
    """The one stderr line of a refused command (status 2); transformers' own progress bars are not counted."""
    err = "".join(line for line in capsys.readouterr().err.splitlines(True) if "Loading weights" not in line)
    assert code == 2, err
    return one_line_cli_error({"stderr": err})


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporary files a writer left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


# --- output paths ----------------------------------------------------------------------------------------


def _analyze(checkpoint: Path, *out: str) -> list[str]:
    return ["analyze", str(checkpoint), "--analyses", "filters", *out]


@pytest.mark.parametrize("kind", ["fifo", "link-to-char-device", "folder", "link-loop"])
def test_json_onto_a_target_that_is_not_a_regular_file_is_refused_and_left_alone(
    kind: str, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tally: dict
) -> None:
    tally["paths: output targets"]["cases"] += 1
    target = tmp_path / "out.json"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "link-to-char-device":
        target.symlink_to("/dev/null")  # stat-ed only: a replacing writer replaces this link, not the device
    elif kind == "folder":
        target.mkdir()
    else:
        target.symlink_to(tmp_path / "loop.json")
        (tmp_path / "loop.json").symlink_to(target)
    before = os.lstat(target)
    line = _refused(main(_analyze(tiny_checkpoint, "--json", str(target))), capsys)
    assert quoted(target) in line, line
    assert "regular file" in line or "loop of symbolic links" in line, line
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)  # the same entry, untouched
    assert _leftovers(tmp_path) == []


def test_the_writer_refuses_a_device_by_stat_alone() -> None:
    """/dev/null itself: `writable_target` only stats it; nothing is opened, created or renamed."""
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with pytest.raises(VitvizError, match="a character device, not a regular file"):
        writable_target("/dev/null")


def test_json_through_a_link_replaces_the_linked_file_and_keeps_the_link(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tally: dict
) -> None:
    tally["paths: output targets"]["cases"] += 2
    results = tmp_path / "results"
    results.mkdir()
    (results / "model.json").write_text("old")
    link, dangling = tmp_path / "latest.json", tmp_path / "next.json"
    link.symlink_to(results / "model.json")
    dangling.symlink_to(results / "new.json")  # a link to a file not written yet
    for target in (link, dangling):
        assert main(_analyze(tiny_checkpoint, "--json", str(target))) == 0, capsys.readouterr().err
        assert target.is_symlink()
    assert "filters" in json.loads((results / "model.json").read_text())
    assert json.loads((results / "new.json").read_text()) == json.loads((results / "model.json").read_text())
    assert _leftovers(tmp_path) == [] and _leftovers(results) == []
    capsys.readouterr()


def test_the_atomic_writer_keeps_the_link_and_replaces_the_file_atomically(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    inode = real.stat().st_ino
    atomic_write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert real.stat().st_ino != inode  # renamed over, not rewritten in place


def test_figures_onto_a_fifo_are_refused(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tally: dict
) -> None:
    tally["paths: output targets"]["cases"] += 1
    folder = tmp_path / "figures"
    folder.mkdir()
    os.mkfifo(folder / "filters.png")
    line = _refused(main(_analyze(tiny_checkpoint, "--figures", str(folder))), capsys)
    assert "FIFO" in line, line
    assert stat.S_ISFIFO(os.lstat(folder / "filters.png").st_mode)


def test_figures_on_a_full_disk_leave_the_previous_figure_and_one_line(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tally
) -> None:
    """ENOSPC half-way through filters.svg: the previous filters.svg stays whole, no partial or temporary file."""
    tally["paths: full disk"]["cases"] += 1
    folder = tmp_path / "figures"
    assert main(_analyze(tiny_checkpoint, "--figures", str(folder))) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert {"filters.png", "filters.svg"} <= set(before)
    real_savefig = Figure.savefig

    def full_disk(self: Figure, fname: object, *args: object, **kwargs: object) -> None:
        buffer = io.BytesIO()
        real_savefig(self, buffer, *args, **{"format": "svg", **kwargs})
        if kwargs.get("format") != "svg" and not str(fname).endswith(".svg"):
            real_savefig(self, fname, *args, **kwargs)
            return
        with open(fname, "wb") as handle:  # type: ignore[arg-type]
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    line = _refused(main(_analyze(tiny_checkpoint, "--figures", str(folder))), capsys)
    assert "No space left on device" in line, line
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)  # no temporary file left
    assert (folder / "filters.svg").read_bytes() == before["filters.svg"]  # the old figure, whole
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(Figure, "savefig", full_disk)
    _refused(main(_analyze(tiny_checkpoint, "--figures", str(fresh))), capsys)
    assert not (fresh / "filters.svg").exists() and _leftovers(fresh) == []


# --- work limits and meaning -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "a.png"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--steps", "1000000000"], "--steps 1000000000 is more than the model's 16 patches: use at most 16"),
        (["--steps", "17"], "use at most 16"),
        (["--ig-steps", "1000000000", "--methods", "integrated-gradients"], "between 1 and 8192"),
        (["--ig-steps", "8193"], "between 1 and 8192"),
        (["--ig-max-steps", "1000000000"], "--ig-max-steps must be between --ig-steps (50) and 8192"),
    ],
)
def test_faithfulness_counts_beyond_the_model_or_memory_are_one_line(
    options: list[str], expected: str, tiny_checkpoint: Path, one_image: Path, capsys, tally: dict
) -> None:
    tally["limits: counts"]["cases"] += 1
    argv = ["faithfulness", str(tiny_checkpoint), "--images", str(one_image), *options, "--json", "-"]
    assert expected in _refused(main(argv), capsys)


def test_faithfulness_at_the_bounds_and_a_huge_batch_runs(
    tiny_checkpoint: Path, one_image: Path, capsys: pytest.CaptureFixture[str], tally: dict
) -> None:
    """S = n, 256 IG steps and --batch-size 10^9 (a batch is never more than the work there is) all finish."""
    tally["limits: counts"]["cases"] += 1
    argv = ["faithfulness", str(tiny_checkpoint), "--images", str(one_image), "--steps", "16", "--json", "-"]
    argv += ["--methods", "integrated-gradients,random", "--ig-steps", "256", "--batch-size", "1000000000"]
    assert main(argv) == 0, capsys.readouterr().err
    document = json.loads(capsys.readouterr().out)
    assert document["protocol"]["steps"] == 16 and set(document["methods"]) == {"integrated-gradients", "random"}


def _headless_models(folder: Path) -> dict[str, str]:
    """Models whose output is features, not class logits: a vitviz checkpoint and a Hugging Face ViTModel."""
    from tests.reliability.conftest import safetensors_bytes, tiny_checkpoint_parts
    from vitviz.support import save_tiny_hf

    checkpoint = folder / "headless.safetensors"
    checkpoint.write_bytes(safetensors_bytes(*tiny_checkpoint_parts(num_classes=0)))
    save_tiny_hf("ViTModel", folder / "vit-model")
    return {"checkpoint": str(checkpoint), "hf-vitmodel": f"hf:{folder / 'vit-model'}"}


def test_faithfulness_on_a_model_without_a_classification_head_is_one_line(
    tmp_path: Path, one_image: Path, capsys: pytest.CaptureFixture[str], tally: dict
) -> None:
    models = _headless_models(tmp_path)
    capsys.readouterr()  # transformers' progress while saving
    for name, model in models.items():
        tally["limits: no classification head"]["cases"] += 1
        argv = ["faithfulness", model, "--images", str(one_image), "--methods", "rollout", "--json", "-"]
        line = _refused(main(argv), capsys)
        assert "the model has no classification head" in line, (name, line)


# --- the support table tells the truth -------------------------------------------------------------------


def _table_samples() -> list[tuple[str, str]]:
    """Per timm family of the stored support table, its smallest architecture whose row says it works, and the
    reduced size the survey built it at ("depth=2,img_size=64")."""
    from vitviz import support

    best: dict[str, tuple[int, str, str]] = {}
    for row in support.rows_of(support.load_table()):
        working = all(s == "ok" or s.startswith("not_applicable") for s in row.status.values())
        if row.name.startswith("hf:") or not working:
            continue
        candidate = (row.params or 0, row.name, row.built_with)
        best[row.family] = min(best.get(row.family, candidate), candidate)
    return [(name, built_with) for _, name, built_with in sorted(best.values(), key=lambda c: c[1])]


SAMPLES = _table_samples()


def test_the_samples_cover_every_timm_family_and_naflexvit() -> None:
    assert len(SAMPLES) >= 12 and any(name.startswith("naflexvit") for name, _ in SAMPLES)


@pytest.mark.parametrize(("name", "built_with"), SAMPLES, ids=[name for name, _ in SAMPLES])
def test_a_working_row_works_through_the_users_timm_entry_point(
    name: str, built_with: str, one_image: Path, capsys: pytest.CaptureFixture[str], tally: dict
) -> None:
    """`timm:<name>` as a user types it is accepted (built on the meta device: the same checks, no memory), and
    `info` and `analyze` run on `timm:<name>?<the survey's reduced size>`, the source the survey itself loads."""
    import torch

    from vitviz.models import load_model

    tally["support table: rows sampled"]["cases"] += 1
    with torch.device("meta"):
        load_model(f"timm:{name}")
    source = f"timm:{name}" + ("" if built_with == "default" else "?" + built_with.replace(",", "&"))
    assert main(["info", source, "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["source"] == source  # what a result or checkpoint records
    argv = ["analyze", source, "--images", str(one_image), "--analyses", "rollout", "--json", "-"]
    assert main(argv) == 0, capsys.readouterr().err
    document = json.loads(capsys.readouterr().out)
    assert document["model"]["source"] == source
    assert np.isfinite(np.asarray(document["rollout"][0]["map"], dtype=float)).all()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("timm:vit_tiny_patch16_224?depth=1000000", "depth must be an integer from 1 to 64"),
        ("timm:vit_tiny_patch16_224?img_size=99999999", "img_size must be an integer from 8 to 4096"),
        ("timm:vit_tiny_patch16_224?depth=two", "got 'two'"),
        ("timm:vit_tiny_patch16_224?pretrained_cfg_overlay=x", "unknown timm keyword 'pretrained_cfg_overlay'"),
        ("timm:vit_tiny_patch16_224?depth=2&depth=3", "given twice"),
        ("timm:vit_tiny_patch16_224?depth=2\nimg_size=64", "got '2\\nimg_size=64'"),
    ],
)
def test_timm_keyword_arguments_are_checked_in_one_line(
    source: str, expected: str, capsys: pytest.CaptureFixture[str], tally: dict
) -> None:
    tally["support table: timm keywords"]["cases"] += 1
    assert expected in _refused(main(["info", source]), capsys)


def test_a_timm_model_without_a_head_is_refused_by_faithfulness(
    one_image: Path, capsys: pytest.CaptureFixture[str], tally: dict
) -> None:
    tally["limits: no classification head"]["cases"] += 1
    source = "timm:vit_tiny_patch16_224?depth=1&img_size=32&num_classes=0"
    argv = ["faithfulness", source, "--images", str(one_image), "--methods", "rollout", "--json", "-"]
    assert "the model has no classification head" in _refused(main(argv), capsys)


# --- data-set folders ------------------------------------------------------------------------------------


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


def _hostile_tree(root: Path) -> int:
    """An ImageFolder tree with train/ and test/: 3 real test images, and in test/ a link loop (a/again -> .), a
    link to / (b/root), a class folder that is a link to / (c), and a FIFO named pipe.png. Returns 3."""
    for split in ("train", "test"):
        for index, name in enumerate(("a", "b")):
            _png(root / split / name / f"{index}.png", index)
    _png(root / "test" / "a" / "sub" / "2.png", 2)
    (root / "test" / "a" / "again").symlink_to(".")
    (root / "test" / "b" / "root").symlink_to("/")
    (root / "train" / "c").mkdir()
    (root / "test" / "c").symlink_to("/")
    os.mkfifo(root / "test" / "a" / "pipe.png")
    return 3


def _cli(*argv: str, timeout: int = 240) -> tuple[int, str, str]:
    """`python -m vitviz` in a child process (a hang is a failure, not a stuck suite)."""
    import subprocess
    import sys

    from tests.reliability.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "vitviz", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return done.returncode, done.stdout, done.stderr


def test_a_folder_with_link_loops_links_to_root_and_a_fifo_counts_only_real_images(
    tiny_checkpoint: Path, tmp_path: Path, tally: dict
) -> None:
    tally["data-set folders: hostile trees"]["cases"] += 4
    real = _hostile_tree(tmp_path / "data")
    argv = ["analyze", str(tiny_checkpoint), "--dataset", f"folder:{tmp_path / 'data'}", "--analyses", "rollout"]
    code, out, err = _cli(*argv, "--limit", "5", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["dataset"]["num_images"] == real
    notes = [line for line in err.splitlines() if "skipped" in line]
    assert notes == ["vitviz: skipped 4 entries that are not regular files or are links to folders"], err
    assert stat.S_ISFIFO(os.lstat(tmp_path / "data" / "test" / "a" / "pipe.png").st_mode)


def test_a_fifo_named_as_an_image_is_never_opened(tmp_path: Path, capsys, tally: dict) -> None:
    """--images pipe.png and the decoder itself: one line, at once (opening a FIFO with no writer blocks)."""
    from vitviz.images import decode_image

    tally["data-set folders: hostile trees"]["cases"] += 1
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(VitvizError, match="FIFO"):
        decode_image(tmp_path / "pipe.png")
    code, _, err = _cli("analyze", "timm:vit_tiny_patch16_224?depth=1", "--images", str(tmp_path / "pipe.png"),
                        "--json", "-", timeout=120)  # fmt: skip
    assert code == 2 and "FIFO" in one_line_cli_error({"stderr": err}), err


NASTY_NAMES = {"newline": "bad\nname.png", "right-to-left": "bad\u202egnp.exe.png", "quote": "it's bad.png"}


@pytest.mark.parametrize("kind", list(NASTY_NAMES))
def test_file_names_that_would_split_or_disguise_the_error_line_are_escaped(
    kind: str, tiny_checkpoint: Path, tmp_path: Path, capsys, tally: dict
) -> None:
    tally["data-set folders: file names"]["cases"] += 1
    name = NASTY_NAMES[kind]
    for split in ("train", "test"):
        _png(tmp_path / "data" / split / "a" / "0.png", 0)
        (tmp_path / "data" / split / "a" / name).write_bytes(b"not an image")
    for source in (["--images", str(tmp_path / "data" / "test" / "a")], ["--dataset", f"folder:{tmp_path / 'data'}"]):
        argv = ["analyze", str(tiny_checkpoint), *source, "--analyses", "rollout", "--json", "-"]
        line = _refused(main(argv), capsys)
        assert quoted(name) in line and "\u202e" not in line, line
        assert "\\n" in line if kind == "newline" else True


# --- torchrun: one rank's bad image ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["analyze", "faithfulness"])
def test_one_ranks_bad_image_stops_every_rank_with_one_line(
    command: str, tiny_checkpoint: Path, tmp_path: Path, tally: dict
) -> None:
    """4 test images in batches of 1 over 2 gloo processes: rank 1 takes images 1 and 3, and image 1 is not an
    image. Every rank exits 2; rank 0 prints the one line, rank 1 nothing (torchrun's own report aside)."""
    import socket
    import subprocess
    import sys

    from tests.reliability.conftest import ROOT

    tally["torchrun: one rank's bad image"]["cases"] += 1
    for index in range(4):
        _png(tmp_path / "data" / "train" / "a" / f"{index}.png", index)
        _png(tmp_path / "data" / "test" / "a" / f"{index}.png", index)
    (tmp_path / "data" / "test" / "a" / "1.png").write_bytes(b"not an image")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [command, str(tiny_checkpoint), "--dataset", f"folder:{tmp_path / 'data'}", "--batch-size", "1"]
    argv += ["--analyses", "rollout"] if command == "analyze" else ["--methods", "random", "--steps", "4"]
    logs = tmp_path / "logs"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    torchrun += [f"--log-dir={logs}", "--redirects=3", "-m", "vitviz", *argv, "--json", str(tmp_path / "out.json")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    stderr = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(stderr) == [0, 1], done.stderr[-2000:]
    lines = stderr[0].splitlines()  # progress notes ("vitviz: random: deletion AUC ...") and the one error
    assert all(line.startswith("vitviz: ") for line in lines), stderr[0]
    errors = [line for line in lines if line.startswith("vitviz: error: ")]
    assert len(errors) == 1 and "could not read image '1.png'" in errors[0], stderr[0]
    assert stderr[1].strip() == "", stderr[1]
    assert done.stderr.count("exitcode  : 2") + done.stderr.count("exitcode: 2") >= 1, done.stderr[-2000:]
    assert "Traceback" not in "".join(stderr.values()) and not (tmp_path / "out.json").exists()
