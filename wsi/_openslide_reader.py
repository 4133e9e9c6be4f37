"""OpenSlide backend: opens every format OpenSlide knows and is the pixel reference."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from slidestream.errors import SlideOpenError, SlideReadError

from ._resolution import mpp_from_properties, mpp_from_tiff_resolution

__all__ = ["OpenSlideReader", "background_from_properties", "open_openslide", "reader_versions"]

logger = logging.getLogger(__name__)


def open_openslide(path: Path) -> Any:
    """Open ``path`` with OpenSlide; a DICOM folder opens through its first readable file.

    Raises
    ------
    SlideOpenError
        When OpenSlide cannot open it (message carries OpenSlide's reason).
    """
    import openslide

    candidates = [path]
    if path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not candidates:
            raise SlideOpenError(f"{path}: folder is empty; pass a slide file or a DICOM folder")
    last: Exception | None = None
    for candidate in candidates:
        try:
            return openslide.OpenSlide(str(candidate))
        except openslide.OpenSlideError as exc:  # includes OpenSlideUnsupportedFormatError
            last = exc
    raise SlideOpenError(
        f"{path.name}: OpenSlide cannot open it ({last}); "
        "check the file is a complete whole-slide image"
    ) from last


def background_from_properties(properties: Mapping[str, str]) -> tuple[int, int, int]:
    """``openslide.background-color`` (hex RRGGBB) as RGB, white when absent or malformed."""
    value = properties.get("openslide.background-color", "")
    if len(value) == 6:
        try:
            rgb = int(value, 16)
        except ValueError:
            return (255, 255, 255)
        return ((rgb >> 16) & 0xFF, (rgb >> 8) & 0xFF, rgb & 0xFF)
    return (255, 255, 255)


def mpp_candidates(
    properties: Mapping[str, str],
) -> tuple[tuple[str, tuple[float, float] | None], ...]:
    """The resolution chain's sources from OpenSlide properties, in priority order."""

    def _float(key: str) -> float | None:
        try:
            return float(properties[key])
        except (KeyError, ValueError):
            return None

    return (
        ("openslide.mpp-x/y", mpp_from_properties(properties)),
        (
            "tiff.XResolution/YResolution",
            mpp_from_tiff_resolution(
                _float("tiff.XResolution"),
                _float("tiff.YResolution"),
                properties.get("tiff.ResolutionUnit"),
            ),
        ),
    )


def objective_power(properties: Mapping[str, str]) -> float | None:
    """``openslide.objective-power`` as float, or None."""
    try:
        value = float(properties["openslide.objective-power"])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def composite_rgba(
    rgba: npt.NDArray[np.uint8], background: tuple[int, int, int]
) -> npt.NDArray[np.uint8]:
    """Composite un-premultiplied RGBA ``(H, W, 4)`` over ``background``; returns RGB."""
    alpha = rgba[..., 3]
    if alpha.size == 0 or int(alpha.min()) == 255:
        return np.ascontiguousarray(rgba[..., :3])
    out = np.empty((*rgba.shape[:2], 3), dtype=np.uint8)
    out[...] = background
    opaque = alpha == 255
    out[opaque] = rgba[..., :3][opaque]
    partial = (alpha > 0) & ~opaque
    if partial.any():
        a = alpha[partial].astype(np.float32)[:, None] / 255.0
        fg = rgba[..., :3][partial].astype(np.float32)
        bg = np.asarray(background, dtype=np.float32)[None, :]
        out[partial] = np.clip(np.rint(fg * a + bg * (1.0 - a)), 0, 255).astype(np.uint8)
    return out


class OpenSlideReader:
    """Pixels through ``openslide.OpenSlide.read_region`` (alpha composited on background)."""

    name = "openslide"

    def __init__(self, path: Path, handle: Any, background: tuple[int, int, int]) -> None:
        self._path = path
        self._handle: Any = handle
        self._background = background
        self._downsamples: tuple[float, ...] = tuple(handle.level_downsamples)

    def read_l0(
        self, l0_x: int, l0_y: int, level: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]:
        """RGB ``(height, width, 3)`` of ``level`` with its top-left at level-0 ``(l0_x, l0_y)``."""
        if width == 0 or height == 0:
            return np.empty((height, width, 3), dtype=np.uint8)
        import openslide

        if self._handle is None:
            raise SlideReadError(f"{self._path.name}: slide is closed; reopen it with open_slide")
        try:
            image = self._handle.read_region((l0_x, l0_y), level, (width, height))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self._path.name}: cannot read level {level} region x={l0_x} y={l0_y} "
                f"{width}x{height} ({exc}); the tile data is corrupt"
            ) from exc
        rgba = np.asarray(image, dtype=np.uint8)
        return composite_rgba(rgba, self._background)

    def read_level(
        self, level: int, lv_x: int, lv_y: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]:
        """RGB ``(height, width, 3)`` of ``level`` with its top-left in that level's px."""
        downsample = self._downsamples[level]
        return self.read_l0(
            round(lv_x * downsample), round(lv_y * downsample), level, width, height
        )

    def close(self) -> None:
        """Close the OpenSlide handle (idempotent)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def reader_versions() -> dict[str, str]:
    """Versions of the slide-reading libraries (the OpenSlide C library included)."""
    import openslide
    import tifffile

    return {
        "libopenslide": str(openslide.__library_version__),
        "openslide-python": str(openslide.__version__),
        "tifffile": str(tifffile.__version__),
    }
