"""The repository stands alone and its text speaks of the project.

- Nothing in it points outside it: no file names the folder beside the checkout or a design document there
  (the project's own is docs/design.md).
- Its Markdown and Python speak of the project, not of the work that made it: no "session <n>" or
  "issue <n>".
- The MNIST test set that the mnist-small preset and the tests read ships in assets/data/mnist, complete.

The first two list every offending line, so one run shows everything left to fix.
"""

from __future__ import annotations

import functools
import gzip
import math
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "assets" / "data" / "mnist"

# Spelled in pieces so that this file does not name them itself.
OUTSIDE_REFERENCES = ("../" + "shared", "shared" + "/DESIGN")
OLD_DESIGN_NAME = "DESIGN" + ".md"  # the project's design document is docs/design.md
WORK_NARRATION = re.compile(r"\b(sessions? [0-9]|issue #?[0-9]+)", re.IGNORECASE)

# name: (gzip size in bytes, IDX magic number, shape from the header)
MNIST_FILES = {
    "t10k-images-idx3-ubyte.gz": (1_648_877, 0x00000803, (10_000, 28, 28)),
    "t10k-labels-idx1-ubyte.gz": (4_542, 0x00000801, (10_000,)),
}


@functools.cache
def _repository_files() -> list[Path]:
    """Every file git tracks or would add (untracked but not ignored) that exists in the working tree."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the repository's file list comes from git")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    names = sorted({name for name in listed.split("\0") if name})
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def _text_files(suffixes: tuple[str, ...] | None = None) -> list[tuple[Path, str]]:
    files = []
    for path in _repository_files():
        if suffixes is not None and path.suffix not in suffixes:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (checkpoints, images, archives): searched as bytes below
            continue
        files.append((path, data.decode("utf-8", errors="replace")))
    return files


def _offending_lines(files: list[tuple[Path, str]], matches: Callable[[str], bool]) -> list[str]:
    found = []
    for path, text in files:
        for number, line in enumerate(text.splitlines(), start=1):
            if matches(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:160]}")
    return found


def test_nothing_in_the_repository_points_outside_it() -> None:
    offenders = _offending_lines(_text_files(), lambda line: any(ref in line for ref in OUTSIDE_REFERENCES))
    for path in _repository_files():  # binary files too: a checkpoint's metadata could hold a path
        data = path.read_bytes()
        if b"\0" in data[:8192] and any(ref.encode() in data for ref in OUTSIDE_REFERENCES):
            offenders.append(f"{path.relative_to(ROOT)}: (binary file)")
    assert not offenders, "files that point outside the repository:\n" + "\n".join(offenders)


def test_the_design_document_is_named_as_docs_design_md() -> None:
    offenders = _offending_lines(_text_files((".md", ".py")), lambda line: OLD_DESIGN_NAME in line)
    assert not offenders, f"files naming {OLD_DESIGN_NAME} instead of docs/design.md:\n" + "\n".join(offenders)


def test_docs_and_code_speak_of_the_project_not_of_sessions_or_issues() -> None:
    offenders = _offending_lines(_text_files((".md", ".py")), lambda line: WORK_NARRATION.search(line) is not None)
    assert not offenders, "lines that speak of sessions or issues:\n" + "\n".join(offenders)


@pytest.mark.parametrize("name", sorted(MNIST_FILES))
def test_the_mnist_test_set_ships_complete(name: str) -> None:
    size, magic, shape = MNIST_FILES[name]
    path = MNIST / name
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    assert path.stat().st_size == size
    raw = gzip.decompress(path.read_bytes())
    dims = magic & 0xFF
    header = [int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(1 + dims)]
    assert header == [magic, *shape]
    assert len(raw) == 4 * (1 + dims) + math.prod(shape)  # nothing missing, nothing extra


def test_the_mnist_test_set_names_its_source_and_licence() -> None:
    readme = (MNIST / "README.md").read_text(encoding="utf-8")
    for words in ("LeCun", "Cortes", "Burges", "CC BY-SA 3.0"):
        assert words in readme
