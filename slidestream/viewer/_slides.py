"""Open slides for the viewer: a few reader handles per slide, the least recently used closed.

A :class:`~slidestream.wsi.Slide` keeps a decoded-tile cache that is not safe to share between
threads, so each request borrows one handle of its slide for the time of one read
(:meth:`SlidePool.lease`); up to ``readers_per_slide`` requests of one slide read at once. When
more than ``max_open`` slides are open the least recently used one is closed as soon as no
request holds one of its handles.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from slidestream.errors import SlideOpenError
from slidestream.wsi import Slide, open_slide

__all__ = ["LOW_RES_PX", "SlideGeometry", "SlidePool", "SlideReaders"]

logger = logging.getLogger(__name__)

LOW_RES_PX: Final = 2048
"""Longest side of the kept low-resolution image of a slide (px)."""
HANDLE_CACHE_BYTES: Final = 16 * 1024 * 1024
"""Decoded-tile cache of each open handle (the encoded DeepZoom tiles are cached apart)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideGeometry:
    """What the viewer needs to know about a slide besides its pixels."""

    dimensions: tuple[int, int]
    """Level-0 ``(width, height)`` px."""
    level_downsamples: tuple[float, ...]
    """Level-0 px per level px, finest first."""
    level_dimensions: tuple[tuple[int, int], ...]
    """``(width, height)`` of each level."""
    mpp: float
    """Mean level-0 µm/px."""
    background_rgb: tuple[int, int, int]
    """Colour outside the slide."""
    vendor: str
    """Format vendor."""


class SlideReaders:
    """Up to ``size`` open handles of one slide file, lent one request at a time."""

    def __init__(self, path: Path, *, size: int, expected_fingerprint: str | None) -> None:
        self.path = path
        first = open_slide(path, tile_cache_bytes=HANDLE_CACHE_BYTES)
        try:
            quickhash = first.info.quickhash
            if (
                expected_fingerprint
                and quickhash is not None
                and quickhash.lower() != expected_fingerprint.lower()
            ):
                raise SlideOpenError(
                    f"{path}: this file is not the slide that was analysed (fingerprint "
                    f"{quickhash[:12]}…, results are of {expected_fingerprint[:12]}…); "
                    "rerun slidestream run on it"
                )
            self.geometry = SlideGeometry(
                dimensions=first.dimensions,
                level_downsamples=first.level_downsamples,
                level_dimensions=first.level_dimensions,
                mpp=first.mpp,
                background_rgb=first.background_rgb,
                vendor=first.vendor,
            )
        except BaseException:
            first.close()
            raise
        self._size = max(1, size)
        self._idle: queue.LifoQueue[Slide] = queue.LifoQueue()
        self._idle.put(first)
        self._opened = 1
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False
        self._all: list[Slide] = [first]
        self._low_res: npt.NDArray[np.uint8] | None = None
        self._low_res_lock = threading.Lock()

    @contextmanager
    def lease(self) -> Iterator[Slide]:
        """Borrow a handle (opening another one while fewer than ``size`` are open)."""
        with self._lock:
            if self._retired:
                raise SlideOpenError(f"{self.path}: slide was closed; retry the request")
            self._users += 1
            grow = self._idle.empty() and self._opened < self._size
            if grow:
                self._opened += 1
        try:
            if grow:
                try:
                    slide = open_slide(self.path, tile_cache_bytes=HANDLE_CACHE_BYTES)
                except BaseException:
                    with self._lock:
                        self._opened -= 1
                    raise
                with self._lock:
                    self._all.append(slide)
            else:
                slide = self._idle.get()
            try:
                yield slide
            finally:
                self._idle.put(slide)
        finally:
            with self._lock:
                self._users -= 1
                close_now = self._retired and self._users == 0
            if close_now:
                self._close_all()

    def low_res(self) -> npt.NDArray[np.uint8]:
        """The whole slide at most :data:`LOW_RES_PX` px across, read once and kept.

        For DeepZoom tiles coarser than every level of the slide (a slide without a pyramid,
        or whose coarsest level is still large): cutting them from this image reads the slide
        once instead of once per tile.
        """
        with self._low_res_lock:
            if self._low_res is None:
                w, h = self.geometry.dimensions
                scale = max(1.0, max(w, h) / LOW_RES_PX)
                size = (max(1, round(w / scale)), max(1, round(h / scale)))
                with self.lease() as slide:
                    self._low_res = slide.get_thumbnail(size)
            return self._low_res

    def retire(self) -> None:
        """Close every handle once no request uses one (idempotent)."""
        with self._lock:
            self._retired = True
            close_now = self._users == 0
        if close_now:
            self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            handles, self._all = self._all, []
        for slide in handles:
            slide.close()


class SlidePool:
    """The open slides of a viewer, keyed by ``(name, version)``; at most ``max_open`` kept."""

    def __init__(self, *, max_open: int, readers_per_slide: int) -> None:
        self._max_open = max(1, max_open)
        self._per_slide = readers_per_slide
        self._open: OrderedDict[tuple[str, int], SlideReaders] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[tuple[str, int], threading.Lock] = {}

    def get(
        self, key: tuple[str, int], path: Path, *, fingerprint: str | None = None
    ) -> SlideReaders:
        """The readers of a slide, opening it when needed.

        Raises
        ------
        SlideOpenError
            The file is missing, unreadable or not the analysed slide.
        MissingResolutionError
            The slide has no µm/px.
        """
        with self._lock:
            readers = self._open.get(key)
            if readers is not None:
                self._open.move_to_end(key)
                return readers
            gate = self._opening.setdefault(key, threading.Lock())
        with gate:  # one opening per slide at a time
            with self._lock:
                readers = self._open.get(key)
                if readers is not None:
                    return readers
            readers = SlideReaders(path, size=self._per_slide, expected_fingerprint=fingerprint)
            evicted: list[SlideReaders] = []
            with self._lock:
                for old_key in [k for k in self._open if k[0] == key[0]]:
                    evicted.append(self._open.pop(old_key))  # an older version of the slide
                self._open[key] = readers
                while len(self._open) > self._max_open:
                    evicted.append(self._open.popitem(last=False)[1])
                self._opening.pop(key, None)
        for old in evicted:
            old.retire()
        logger.debug("opened %s (%d slides open)", path, len(self._open))
        return readers

    def close(self) -> None:
        """Close every slide (idempotent)."""
        with self._lock:
            items, self._open = list(self._open.values()), OrderedDict()
        for readers in items:
            readers.retire()

    def __len__(self) -> int:
        return len(self._open)
