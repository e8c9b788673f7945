"""Which files are images: the one rule shared by the CLI, the studio's sample sets and the folder data set.

An image file is a visible regular file (its name does not start with ".", so macOS "._photo.jpg" resource
forks and editor back-ups are out) whose extension is one of the formats `vitviz.images.decode_image`
opens, so no listed file is refused for its format later. No other name is special: the bundled samples'
object masks live in assets/masks/, away from the images to analyse.

Folders are listed in sorted order. A symbolic link to a file counts as that file; a symbolic link to a
folder is never followed, and neither is a hidden folder entered. Files named one by one (`collect_images`)
are taken as given: the decoder then says in one line if one is not an image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image

from vitviz.errors import VitvizError, shown
from vitviz.fileio import file_kind
from vitviz.images import ALLOWED_FORMATS


@lru_cache(maxsize=1)
def image_extensions() -> tuple[str, ...]:
    """File extensions (lower case, with the dot, sorted) of the formats vitviz.images decodes."""
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in ALLOWED_FORMATS))


def is_image_name(name: str) -> bool:
    """Whether a file called `name` would be an image file: visible, with a decodable format's extension."""
    return not name.startswith(".") and name.lower().endswith(image_extensions())


def images_in(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name (sub-folders are not entered)."""
    folder = Path(folder)
    with os.scandir(folder) as entries:
        names = [entry.name for entry in entries if is_image_name(entry.name) and entry.is_file()]
    return [folder / name for name in sorted(names)]


def images_under(folder: Path, skipped: list[Path] | None = None) -> list[Path]:
    """The image files in `folder` and its visible sub-folders, folder by folder in path order, each by name.

    Links to folders are not followed, so a link back up the tree (or to /) cannot make the walk endless; entries
    with an image's name that are not regular files (a FIFO, a device, a socket) are never opened. Both are
    appended to `skipped` when it is given, so the caller can say what it left out.
    """
    found: list[Path] = []
    for root, dirs, names in os.walk(folder):  # followlinks=False: lists links to folders in dirs, never enters
        if skipped is not None:
            skipped += [Path(root, name) for name in dirs if os.path.islink(os.path.join(root, name))]
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        for name in names:
            if not is_image_name(name):
                continue
            if os.path.isfile(os.path.join(root, name)):  # stat only: a FIFO is not opened
                found.append(Path(root, name))
            elif skipped is not None:
                skipped.append(Path(root, name))
    return sorted(found, key=lambda path: (str(path.parent), path.name))


def collect_images(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand image files and folders (their image files, sorted) into a list of files, in the order given.

    Raises:
        VitvizError: a path does not exist, or a folder holds no image file.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = images_in(path)
            if not found:
                raise VitvizError(f"no images in folder {shown(raw)} (looked for {', '.join(image_extensions())})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise VitvizError(f"{shown(raw)} is {file_kind(path.stat().st_mode)}, not an image file")
        else:
            raise VitvizError(f"no such image file or folder: {shown(raw)}")
    return files
