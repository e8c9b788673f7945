"""glibc malloc settings for CPU inference: keep freed tensor memory for the next forward instead of unmapping it.

A forward of a ViT on the CPU allocates and frees tensors of a few hundred KB to tens of MB many times: the
attention of every layer, its head-fused copy, the MLP's hidden activations. glibc's malloc serves requests
above its mmap threshold (128 KB, raised on the fly up to 32 MB) with fresh mappings and gives the top of its
heap back to the kernel whenever more than its trim threshold (twice the mmap threshold) lies free there. The
next forward then touches that memory again as new pages: measured on ViT-S/16 at batch 1 on 2 cores, about
1,000 page faults per analysed forward (4 MB of pages zeroed by the kernel), 5% of the forward's time, and more
or less from one call to the next depending on where the heap's top happens to be.

``tune_malloc()`` fixes the two thresholds (`mallopt`): allocations below 32 MB come from the heap, and the heap
is trimmed only when 256 MB lie free at its top. Memory a forward freed is reused by the next one; the process
keeps up to that much freed memory instead of returning it at once. It is process-wide, so the library never
calls it on import and no library code reads it: vitviz's own programs call it at start (``python -m vitviz``,
the app, the bench), and the results are the same with or without it, only the time differs. PyTorch's CPU
performance guide gives the same advice in the form of a caching allocator (jemalloc or tcmalloc).

Set ``VITVIZ_MALLOC=default`` to leave glibc's own behaviour alone. Elsewhere (macOS, Windows, musl) this does
nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)

__all__ = ["MMAP_THRESHOLD", "RELEASE_EVERY", "TRIM_THRESHOLD", "release_free_memory", "releasing", "tune_malloc"]

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 * 2**20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc on Linux (musl has mallopt as a stub), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def _left_alone() -> bool:
    return os.environ.get("VITVIZ_MALLOC", "").lower() == "default"


@functools.cache
def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once); True if they were set."""
    if _left_alone():
        logger.info("VITVIZ_MALLOC=default: glibc malloc left as it is")
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        logger.warning("glibc refused the malloc thresholds; analyses run with its defaults")
    return done


RELEASE_EVERY = 512  # units of a data-set run's progress (images, maps) between two releases


def release_free_memory() -> bool:
    """Give the pages of freed heap memory back to the kernel (glibc's ``malloc_trim(0)``); True if it ran.

    A data-set run keeps a few small objects per batch (its per-image numbers) while it allocates and frees the
    batch's large tensors around them, so the heap's free memory is left in pieces that glibc keeps resident:
    measured on `python -m vitviz compare` of the bundled default and hybrid, the resident memory grew by
    about 40 kB per image (docs/benchmarks.md). ``malloc_trim`` returns the pages of those free pieces; the next
    batch faults in what it needs again. Nothing where glibc is absent or with ``VITVIZ_MALLOC=default``.
    """
    libc = None if _left_alone() else _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def releasing(update: Callable[[int], object], every: int | None = None) -> Callable[[int], None]:
    """A progress callback that passes its units on to `update` and calls `release_free_memory` each time
    another `every` (default RELEASE_EVERY) units are done: what vitviz's programs hand their data-set runs."""
    every = RELEASE_EVERY if every is None else every
    done = 0

    def progress(units: int) -> None:
        nonlocal done
        update(units)
        before, done = done, done + units
        if done // every > before // every:
            release_free_memory()

    return progress
