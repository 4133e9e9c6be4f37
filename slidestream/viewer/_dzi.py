"""DeepZoom (DZI) geometry and slide tiles from the project's own slide reading.

The DeepZoom pyramid of a slide has levels ``z = 0 .. n_levels - 1``; the last one is level 0 of
the slide and each level above it halves the one below (rounding up), down to 1 x 1 px. A level
``z`` px is ``2 ** (n_levels - 1 - z)`` level-0 px (``z_downsample``). Tile ``(col, row)`` of
level ``z`` covers DeepZoom px ``[col * tile - overlap, (col + 1) * tile + overlap)`` (no overlap
beyond the image edge), as in OpenSlide's ``DeepZoomGenerator``. Pixels are read with
:meth:`slidestream.wsi.Slide.read_region` from the coarsest slide level not coarser than the
tile, and area-averaged to the tile's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import cv2
import imagecodecs
import numpy as np
import numpy.typing as npt

from slidestream.wsi import Slide

__all__ = [
    "DeepZoomGrid",
    "TileNotFoundError",
    "TileRegion",
    "dzi_xml",
    "encode_jpeg",
    "needs_low_res",
    "read_tile_rgb",
    "render_slide_tile",
    "tile_from_image",
]

_RTOL: Final = 1e-3


class TileNotFoundError(LookupError):
    """A DeepZoom level or tile that does not exist (answered with 404)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TileRegion:
    """Where one DeepZoom tile lies."""

    z: int
    """DeepZoom level."""
    z_size: tuple[int, int]
    """Tile ``(width, height)`` in px of the DeepZoom level (the image size)."""
    l0_origin: tuple[float, float]
    """Top-left ``(x, y)`` in level-0 px."""
    l0_size: tuple[float, float]
    """``(width, height)`` covered in level-0 px (clipped to the slide)."""
    z_downsample: float
    """Level-0 px per DeepZoom px at this level."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeepZoomGrid:
    """The DeepZoom pyramid of an image of level-0 size ``l0_dimensions``.

    Examples
    --------
    >>> grid = DeepZoomGrid(l0_dimensions=(1000, 600), tile_size_px=254, overlap_px=1)
    >>> grid.n_levels, grid.level_dimensions[-1], grid.tile_counts(grid.n_levels - 1)
    (11, (1000, 600), (4, 3))
    >>> grid.region(10, 1, 0).l0_origin
    (253.0, 0.0)
    """

    l0_dimensions: tuple[int, int]
    """Level-0 ``(width, height)`` px."""
    tile_size_px: int = 254
    """Tile edge without overlap."""
    overlap_px: int = 1
    """Overlap on each inner tile side."""

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every DeepZoom level, coarsest (1 x 1) first."""
        dims = [tuple(int(v) for v in self.l0_dimensions)]
        while dims[-1] != (1, 1):
            w, h = dims[-1]
            dims.append((max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2))))
        return tuple((w, h) for w, h in reversed(dims))

    @property
    def n_levels(self) -> int:
        """Number of DeepZoom levels."""
        return len(self.level_dimensions)

    def tile_counts(self, z: int) -> tuple[int, int]:
        """``(columns, rows)`` of tiles at level ``z``."""
        w, h = self._level(z)
        t = self.tile_size_px
        return math.ceil(w / t), math.ceil(h / t)

    def z_downsample(self, z: int) -> float:
        """Level-0 px per px of DeepZoom level ``z``."""
        self._level(z)
        return float(2 ** (self.n_levels - 1 - z))

    def region(self, z: int, col: int, row: int) -> TileRegion:
        """The area of tile ``(col, row)`` of level ``z``.

        Raises
        ------
        TileNotFoundError
            No such level or tile.
        """
        w, h = self._level(z)
        cols, rows = self.tile_counts(z)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFoundError(f"tile {col}_{row} does not exist at level {z} ({cols}x{rows})")
        t, ov = self.tile_size_px, self.overlap_px
        z_x0 = col * t - (ov if col > 0 else 0)
        z_y0 = row * t - (ov if row > 0 else 0)
        z_x1 = min(w, (col + 1) * t + ov)
        z_y1 = min(h, (row + 1) * t + ov)
        ds = self.z_downsample(z)
        l0_w, l0_h = self.l0_dimensions
        l0_x0, l0_y0 = z_x0 * ds, z_y0 * ds
        l0_x1, l0_y1 = min(float(l0_w), z_x1 * ds), min(float(l0_h), z_y1 * ds)
        return TileRegion(
            z=z,
            z_size=(z_x1 - z_x0, z_y1 - z_y0),
            l0_origin=(l0_x0, l0_y0),
            l0_size=(l0_x1 - l0_x0, l0_y1 - l0_y0),
            z_downsample=ds,
        )

    def _level(self, z: int) -> tuple[int, int]:
        dims = self.level_dimensions
        if not 0 <= z < len(dims):
            raise TileNotFoundError(f"DeepZoom level {z} does not exist (0..{len(dims) - 1})")
        return dims[z]


def dzi_xml(grid: DeepZoomGrid, image_format: str) -> str:
    """The ``.dzi`` descriptor of a pyramid (``image_format``: ``jpeg`` or ``png``)."""
    w, h = grid.l0_dimensions
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
        f'Format="{image_format}" Overlap="{grid.overlap_px}" TileSize="{grid.tile_size_px}">'
        f'<Size Width="{w}" Height="{h}"/></Image>\n'
    )


def read_tile_rgb(slide: Slide, region: TileRegion) -> npt.NDArray[np.uint8]:
    """The RGB pixels of a DeepZoom tile, ``(height, width, 3)`` uint8 of ``region.z_size``."""
    level, lv_ds = _read_level_ds(slide.level_downsamples, region.z_downsample)
    l0_x, l0_y = region.l0_origin
    l0_w, l0_h = region.l0_size
    lv_w = max(1, math.ceil(l0_w / lv_ds - 1e-6))
    lv_h = max(1, math.ceil(l0_h / lv_ds - 1e-6))
    pixels = slide.read_region((round(l0_x), round(l0_y)), (lv_w, lv_h), level=level)
    out_w, out_h = region.z_size
    if (lv_w, lv_h) == (out_w, out_h):
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    resized = cv2.resize(pixels, (out_w, out_h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(resized, dtype=np.uint8)


def needs_low_res(level_downsamples: tuple[float, ...], region: TileRegion) -> bool:
    """True when the slide has no level within 2x of the tile (it would read > 4x its pixels)."""
    _, lv_ds = _read_level_ds(level_downsamples, region.z_downsample)
    return lv_ds * 2.0 < region.z_downsample * (1.0 - _RTOL)


def _read_level_ds(downsamples: tuple[float, ...], z_downsample: float) -> tuple[int, float]:
    level = 0
    for idx, ds in enumerate(downsamples):
        if ds <= z_downsample * (1.0 + _RTOL):
            level = idx
    return level, downsamples[level]


def tile_from_image(
    image: npt.NDArray[np.uint8], l0_dimensions: tuple[int, int], region: TileRegion
) -> npt.NDArray[np.uint8]:
    """A DeepZoom tile cut from a downsampled image of the whole slide (area-averaged)."""
    img_h, img_w = image.shape[:2]
    sx, sy = img_w / l0_dimensions[0], img_h / l0_dimensions[1]  # image px per level-0 px
    x0, y0 = region.l0_origin[0] * sx, region.l0_origin[1] * sy
    x1 = (region.l0_origin[0] + region.l0_size[0]) * sx
    y1 = (region.l0_origin[1] + region.l0_size[1]) * sy
    ix0, iy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    ix1, iy1 = min(img_w, max(ix0 + 1, math.ceil(x1))), min(img_h, max(iy0 + 1, math.ceil(y1)))
    crop = image[iy0:iy1, ix0:ix1]
    out_w, out_h = region.z_size
    resized = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(resized, dtype=np.uint8)


def render_slide_tile(slide: Slide, region: TileRegion, *, quality: int) -> bytes:
    """A DeepZoom tile of ``slide`` encoded as JPEG (libjpeg-turbo, 4:2:0).

    Parameters
    ----------
    slide
        The open slide.
    region
        The tile (see :meth:`DeepZoomGrid.region`).
    quality
        JPEG quality 1..100.

    Returns
    -------
    bytes
        The JPEG image of size ``region.z_size``.
    """
    return encode_jpeg(read_tile_rgb(slide, region), quality=quality)


def encode_jpeg(rgb: npt.NDArray[np.uint8], *, quality: int) -> bytes:
    """RGB ``(H, W, 3)`` uint8 as JPEG (libjpeg-turbo)."""
    return bytes(imagecodecs.jpeg8_encode(rgb, level=quality))
