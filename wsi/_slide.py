"""The one :class:`Slide` interface over several pixel readers (OpenSlide, fast TIFF, image)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Protocol

import cv2
import numpy as np
import numpy.typing as npt

from slidestream.errors import ConfigError, MissingResolutionError, SlideReadError

__all__ = ["RegionReader", "Slide", "SlideInfo"]

logger = logging.getLogger(__name__)

#: Relative tolerance when comparing a level's µm/px with a target µm/px.
_MPP_RTOL = 1e-3
#: Level pixels read per band when building a thumbnail (bounds memory for single-level slides).
_THUMB_BAND_PIXELS = 16 * 1024 * 1024


class RegionReader(Protocol):
    """What a pixel backend provides; :class:`Slide` adds geometry, resampling and metadata."""

    #: Short backend name for logs and ``Slide.reader``: "openslide", "fast-tiff", "tifffile", ...
    name: str

    def read_l0(
        self, l0_x: int, l0_y: int, level: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]:
        """RGB ``(height, width, 3)`` at ``level``; top-left in level-0 px; padded."""
        ...

    def read_level(
        self, level: int, lv_x: int, lv_y: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]:
        """RGB ``(height, width, 3)`` at ``level``; top-left in that level's px; padded."""
        ...

    def close(self) -> None:
        """Release file handles (idempotent)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideInfo:
    """Metadata of an opened slide (everything but pixels)."""

    path: Path
    """The file (or DICOM folder) that was opened."""
    name: str
    """File name without the slide extension."""
    vendor: str
    """OpenSlide vendor ("aperio", "generic-tiff", ...) or "ome-tiff", "tiff", "image"."""
    level_dimensions: tuple[tuple[int, int], ...]
    """(width, height) of each pyramid level in px of that level, finest first."""
    level_downsamples: tuple[float, ...]
    """Level-0 px per level px, for each level (1.0 first)."""
    mpp_x: float | None
    """µm/px along x at level 0 (``None``: unknown, opened with ``require_mpp=False``)."""
    mpp_y: float | None
    """µm/px along y at level 0 (``None``: unknown)."""
    objective_power: float | None
    """Scanner objective magnification, when the file states it (never used to infer µm/px)."""
    background_rgb: tuple[int, int, int]
    """Colour used for areas outside the slide and under transparent pixels."""
    associated_images: tuple[str, ...]
    """Names of associated images (label, macro, thumbnail, ...)."""
    properties: Mapping[str, str] = field(default_factory=dict)
    """Raw key/value metadata (OpenSlide properties or TIFF tags), read-only."""
    quickhash: str | None = None
    """OpenSlide quickhash-1 when available."""
    files: tuple[Path, ...] = ()
    """The files making up the slide, hashed for the fingerprint when there is no quickhash."""

    def __post_init__(self) -> None:
        if not self.level_dimensions or len(self.level_dimensions) != len(self.level_downsamples):
            raise ConfigError(
                f"{self.path.name}: inconsistent pyramid ({len(self.level_dimensions)} levels, "
                f"{len(self.level_downsamples)} downsamples); the slide file is malformed"
            )
        if (self.mpp_x is None) != (self.mpp_y is None):
            raise ConfigError(f"{self.path.name}: only one of mpp_x, mpp_y is known; pass --mpp")
        for value in (self.mpp_x, self.mpp_y):
            if value is not None and (not math.isfinite(value) or value <= 0.0):
                raise ConfigError(f"{self.path.name}: µm/px {value!r} is not positive; pass --mpp")


class Slide:
    """An opened whole-slide image; use :func:`slidestream.wsi.open_slide` to create one.

    Coordinates are OpenSlide's: locations ``(x, y)`` in level-0 px, sizes ``(width, height)``.
    Pixel arrays are RGB uint8 ``(H, W, 3)``. A Slide holds file handles: use it as a context
    manager, never pickle it (datasets keep the path and reopen it; opening is cheap).
    """

    __slots__ = ("_closed", "_fingerprint", "_fingerprint_fn", "_info", "_reader")

    def __init__(
        self,
        info: SlideInfo,
        reader: RegionReader,
        *,
        fingerprint_fn: Callable[[tuple[Path, ...]], str],
    ) -> None:
        self._info = info
        self._reader = reader
        self._fingerprint: str | None = info.quickhash
        self._fingerprint_fn = fingerprint_fn
        self._closed = False

    # ----------------------------------------------------------------- metadata
    @property
    def info(self) -> SlideInfo:
        """All metadata as one frozen record."""
        return self._info

    @property
    def path(self) -> Path:
        """The opened file or DICOM folder."""
        return self._info.path

    @property
    def name(self) -> str:
        """File name without the slide extension (``a.ome.tif`` -> ``a``)."""
        return self._info.name

    @property
    def vendor(self) -> str:
        """Format/vendor: "aperio", "hamamatsu", "generic-tiff", "dicom", "ome-tiff", "image"..."""
        return self._info.vendor

    @property
    def reader(self) -> str:
        """Which pixel backend serves reads: "openslide", "fast-tiff", "tifffile" or "image"."""
        return self._reader.name

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in px."""
        return self._info.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels (1 for single-level slides)."""
        return len(self._info.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of each level in that level's px, finest first."""
        return self._info.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 px per level px for each level."""
        return self._info.level_downsamples

    @property
    def has_mpp(self) -> bool:
        """Whether the level-0 µm/px is known (from the file or the ``mpp`` argument)."""
        return self._info.mpp_x is not None

    def _known_mpp(self) -> tuple[float, float]:
        if self._info.mpp_x is None or self._info.mpp_y is None:
            raise MissingResolutionError(
                f"{self._info.name}: slide has no µm/px (no openslide.mpp-x, no TIFF "
                "resolution unit); pass --mpp 0.25 (or open_slide(..., mpp=0.25)) with the "
                "scanner's real value"
            )
        return self._info.mpp_x, self._info.mpp_y

    @property
    def mpp_x(self) -> float:
        """µm/px along x at level 0 (:class:`MissingResolutionError` when unknown)."""
        return self._known_mpp()[0]

    @property
    def mpp_y(self) -> float:
        """µm/px along y at level 0 (:class:`MissingResolutionError` when unknown)."""
        return self._known_mpp()[1]

    @property
    def mpp(self) -> float:
        """Mean of :attr:`mpp_x` and :attr:`mpp_y` (µm/px at level 0)."""
        mpp_x, mpp_y = self._known_mpp()
        return 0.5 * (mpp_x + mpp_y)

    @property
    def objective_power(self) -> float | None:
        """Objective magnification stated by the file, or None."""
        return self._info.objective_power

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """Padding colour for areas outside the slide (``openslide.background-color``)."""
        return self._info.background_rgb

    @property
    def associated_images(self) -> tuple[str, ...]:
        """Names of the associated images (label, macro, thumbnail...)."""
        return self._info.associated_images

    @property
    def properties(self) -> Mapping[str, str]:
        """Raw metadata key/values (read-only view)."""
        return MappingProxyType(dict(self._info.properties))

    @property
    def fingerprint(self) -> str:
        """64 hex digits: OpenSlide quickhash-1, else sha256 of the file bytes (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = self._fingerprint_fn(self._info.files or (self._info.path,))
        return self._fingerprint

    def level_mpp(self, level: int) -> float:
        """Mean µm/px of ``level``."""
        return self.mpp * self._info.level_downsamples[self._check_level(level)]

    # ----------------------------------------------------------------- pixels
    def read_region(
        self, location: tuple[int, int], size: tuple[int, int], *, level: int = 0
    ) -> npt.NDArray[np.uint8]:
        """Read a rectangle of one pyramid level.

        Parameters
        ----------
        location
            Top-left ``(x, y)`` in level-0 px (may be negative or past the edge).
        size
            ``(width, height)`` in px of ``level``.
        level
            Pyramid level, 0 = full resolution.

        Returns
        -------
        numpy.ndarray
            RGB uint8 ``(height, width, 3)``; outside the slide is ``background_rgb`` and
            transparent pixels are composited on it.

        Raises
        ------
        SlideReadError
            If tile data in the region is corrupt.
        ConfigError
            For a negative size or an unknown level.

        Examples
        --------
        >>> # a 256 x 256 px patch at level 0 whose top-left is at (1000, 2000) level-0 px
        >>> # patch = slide.read_region((1000, 2000), (256, 256))   # (256, 256, 3) uint8
        """
        self._check_open()
        level = self._check_level(level)
        width, height = self._check_size(size)
        l0_x, l0_y = int(location[0]), int(location[1])
        return self._reader.read_l0(l0_x, l0_y, level, width, height)

    def best_level_for_mpp(self, mpp: float) -> int:
        """The coarsest level whose µm/px is not coarser than ``mpp`` (within 0.1 %).

        Parameters
        ----------
        mpp
            Target µm/px.

        Returns
        -------
        int
            Level index; 0 when ``mpp`` is finer than level 0.
        """
        target = float(mpp)
        if not math.isfinite(target) or target <= 0.0:
            raise ConfigError(f"{self.path.name}: target mpp={mpp!r} must be a positive µm/px")
        best = 0
        for level, downsample in enumerate(self._info.level_downsamples):
            if self.mpp * downsample <= target * (1.0 + _MPP_RTOL):
                best = level
        return best

    def read_at_mpp(
        self, location: tuple[float, float], size: tuple[int, int], mpp: float
    ) -> npt.NDArray[np.uint8]:
        """Read a rectangle at a target resolution.

        Parameters
        ----------
        location
            Top-left ``(x, y)`` in level-0 px (float allowed).
        size
            ``(width, height)`` in px at the target resolution.
        mpp
            Target µm/px.

        Returns
        -------
        numpy.ndarray
            RGB uint8 ``(height, width, 3)``: the region covering ``width * mpp`` by
            ``height * mpp`` µm, read from :meth:`best_level_for_mpp` and area-averaged
            (``cv2.INTER_AREA``) to exactly the requested size. Source pixel bounds are rounded
            to the nearest px of the level read (at most half a source px).

        Examples
        --------
        >>> # 512 x 512 px at 0.5 µm/px from a 0.25 µm/px scan reads 1024 x 1024 level-0 px
        >>> # patch = slide.read_at_mpp((0.0, 0.0), (512, 512), 0.5)
        """
        self._check_open()
        t_width, t_height = self._check_size(size)
        level = self.best_level_for_mpp(mpp)
        downsample = self._info.level_downsamples[level]
        mpp_x, mpp_y = self._known_mpp()
        scale_x = float(mpp) / (mpp_x * downsample)  # level px per target px
        scale_y = float(mpp) / (mpp_y * downsample)
        lv_x0 = float(location[0]) / downsample
        lv_y0 = float(location[1]) / downsample
        ix0, iy0 = round(lv_x0), round(lv_y0)
        ix1 = max(ix0 + 1, round(lv_x0 + t_width * scale_x))
        iy1 = max(iy0 + 1, round(lv_y0 + t_height * scale_y))
        if t_width == 0 or t_height == 0:
            return np.empty((t_height, t_width, 3), dtype=np.uint8)
        lv_w, lv_h = ix1 - ix0, iy1 - iy0
        if level == 0:
            region = self._reader.read_l0(ix0, iy0, 0, lv_w, lv_h)
        else:
            region = self._reader.read_level(level, ix0, iy0, lv_w, lv_h)
        if (lv_w, lv_h) == (t_width, t_height):
            return region
        resized = cv2.resize(region, (t_width, t_height), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(resized, dtype=np.uint8)

    def get_thumbnail(self, max_size: tuple[int, int]) -> npt.NDArray[np.uint8]:
        """The whole slide scaled to fit in ``max_size`` (aspect ratio kept).

        Parameters
        ----------
        max_size
            ``(max_width, max_height)`` in px.

        Returns
        -------
        numpy.ndarray
            RGB uint8 ``(h, w, 3)`` with ``w <= max_width`` and ``h <= max_height``.
        """
        self._check_open()
        max_w, max_h = self._check_size(max_size)
        if max_w == 0 or max_h == 0:
            raise ConfigError(f"{self.path.name}: thumbnail size {max_size!r} must be positive")
        l0_w, l0_h = self.dimensions
        downsample = max(l0_w / max_w, l0_h / max_h)
        t_w = max(1, min(max_w, round(l0_w / downsample)))
        t_h = max(1, min(max_h, round(l0_h / downsample)))
        level = 0
        for idx, ds in enumerate(self._info.level_downsamples):
            if ds <= downsample * (1.0 + _MPP_RTOL):
                level = idx
        lv_w, lv_h = self._info.level_dimensions[level]
        band_rows = max(1, _THUMB_BAND_PIXELS // max(1, lv_w))
        out = np.empty((t_h, t_w, 3), dtype=np.uint8)
        lv_y = 0
        while lv_y < lv_h:
            lv_y_end = min(lv_h, lv_y + band_rows)
            t_y0 = round(lv_y * t_h / lv_h)
            t_y1 = round(lv_y_end * t_h / lv_h)
            if t_y1 > t_y0:
                # align the band to output rows so bands tile the thumbnail exactly
                src_y0 = math.floor(t_y0 * lv_h / t_h)
                src_y1 = max(src_y0 + 1, math.ceil(t_y1 * lv_h / t_h))
                band = self._reader.read_level(level, 0, src_y0, lv_w, src_y1 - src_y0)
                out[t_y0:t_y1] = cv2.resize(band, (t_w, t_y1 - t_y0), interpolation=cv2.INTER_AREA)
            lv_y = lv_y_end
        return out

    # ----------------------------------------------------------------- lifecycle
    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def close(self) -> None:
        """Release the file handles; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            self._reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError(
            f"Slide({self.path.name}) holds open file handles and cannot be pickled; "
            "pass the slide path to workers and call open_slide there"
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._reader.name
        w, h = self.dimensions
        return (
            f"Slide({self.name!r}, vendor={self.vendor!r}, {w}x{h} px, "
            f"{self.level_count} levels, mpp={self.mpp:.4g}, {state})"
        )

    # ----------------------------------------------------------------- checks
    def _check_open(self) -> None:
        if self._closed:
            raise SlideReadError(f"{self.path.name}: slide is closed; reopen it with open_slide")

    def _check_level(self, level: int) -> int:
        if not 0 <= level < len(self._info.level_dimensions):
            raise ConfigError(
                f"{self.path.name}: level {level} does not exist; "
                f"use 0..{len(self._info.level_dimensions) - 1}"
            )
        return int(level)

    def _check_size(self, size: tuple[int, int]) -> tuple[int, int]:
        width, height = int(size[0]), int(size[1])
        if width < 0 or height < 0:
            raise ConfigError(f"{self.path.name}: size {size!r} must be non-negative (w, h) px")
        return width, height
