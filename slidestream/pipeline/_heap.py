"""Returning the C heap's free memory to the OS during long inference passes."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["TRIM_EVERY_BATCHES", "release_free_heap"]

TRIM_EVERY_BATCHES = 4
"""Batches between two returns of the C heap's free memory to the OS."""


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> None:
    """Give the free pages of every glibc malloc arena back to the OS (no-op without glibc).

    CPU inference in this process allocates and frees tens of MB of activations per batch from
    several threads. glibc keeps freed blocks below its (self-raising) mmap threshold in
    per-thread arenas, and on some runs the resident size of the main process grew from 0.6 GB to
    2.9 GB of free heap during the tissue pass of a 157 mm² slide (``bench/memory.py``). Trimming
    every few batches (a few ms each) keeps it near the working set.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
