"""The one way vitviz writes a file that must never be half-written: checkpoints, run state, JSON, caches.

The data goes to a temporary file in the target's folder, is flushed and fsynced, then renamed over the
target, and the folder entry is fsynced too; on any failure the temporary file is removed and the previous
target is left as it was.

Only regular files are replaced. A symbolic link to a regular file (or to nothing yet) keeps its link: the file
it points to is replaced, atomically, in that file's folder. Any other existing target (a FIFO, a device such
as /dev/null, a socket, a folder, a loop of links) is refused with a VitvizError before anything is written:
renaming over it would destroy it, and writing into it could block for ever or reach a device.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vitviz.errors import VitvizError, quoted

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a stat mode is, in words ("a FIFO (named pipe)", ...); "a regular file" for one."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def writable_target(path: str | Path) -> Path:
    """The regular file that writing `path` replaces: `path` itself, or the file a symbolic link points to.

    Raises:
        VitvizError: `path` exists and is not a regular file (or a link to one), or is a loop of links.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # follows links
    except FileNotFoundError:
        mode = None  # nothing there yet (or a link to nothing yet): the file is created
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise VitvizError(f"cannot write {quoted(path)}: it is a loop of symbolic links") from None
        raise
    if mode is not None and not stat.S_ISREG(mode):
        raise VitvizError(
            f"cannot write {quoted(path)}: it is {file_kind(mode)}, not a regular file "
            "(results are written only to regular files; for standard output use -)"
        )
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable: the folder entry must reach the disk too."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that takes a file name; rename it over `path` on success.

    The caller writes the whole file to the yielded path; it is then fsynced, renamed and the folder fsynced.
    If the block raises, the temporary file is removed and `path` is untouched. A `path` that exists and is not
    a regular file (or a link to one) is refused first (`writable_target`).

    `durable=False` leaves out both fsyncs: readers still see the old file or the new one, never a mix, but after
    a crash of the machine (not of the process) the rename may be lost or the file empty. For files rewritten
    every few seconds whose content is stale by the next write (a running job's progress), where two fsyncs
    cost more than the write.
    """
    path = writable_target(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes owner-only files; these are ordinary files
        if durable:
            with open(tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp_path, path)
        if durable:
            fsync_dir(folder)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` so that readers see either the old or the new file, never a mix."""
    with atomic_path(path, durable=durable) as tmp_path, open(tmp_path, "wb") as handle:
        handle.write(data)
        handle.flush()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, durable: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"), durable=durable)
