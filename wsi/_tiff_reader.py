"""Fast TIFF tile reader: raw tile bytes by ``os.pread`` + imagecodecs, assembled in numpy.

Used for TIFF-family slides whose tiles are plain JPEG, JPEG 2000 (Aperio 33005), deflate, LZW
or uncompressed (Aperio SVS, generic tiled TIFF, OME-TIFF). Pixels match OpenSlide/libtiff:
Aperio's JPEG tiles are tagged photometric RGB and carry no JFIF marker, so they are decoded
*without* a YCbCr->RGB transform, as libtiff does. A tile that fails to decode raises
:class:`~slidestream.errors.SlideReadError`; there is no silent fallback.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import numpy.typing as npt

from slidestream.errors import SlideOpenError, SlideReadError

__all__ = ["TiffLevel", "TiffTileReader", "level_from_page"]

logger = logging.getLogger(__name__)

_JPEG = 7
_JPEG2K_APERIO_RGB = 33005
_JPEG2K = 34712
_NONE = 1
_LZW = 5
_DEFLATE = (8, 32946)
_SUPPORTED_COMPRESSION = frozenset({_NONE, _LZW, _JPEG, _JPEG2K_APERIO_RGB, _JPEG2K, *_DEFLATE})
_MINISBLACK, _RGB, _YCBCR = 1, 2, 6
#: Default decoded-tile cache per reader (bytes).
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class TiffLevel:
    """Geometry and encoding of one pyramid level stored as a TIFF page."""

    width: int
    """Level width in px."""
    height: int
    """Level height in px."""
    tile_width: int
    """Tile width in px (the image width for stripped pages)."""
    tile_height: int
    """Tile height in px (rows per strip for stripped pages)."""
    offsets: npt.NDArray[np.int64]
    """File offset of each tile/strip, row-major."""
    bytecounts: npt.NDArray[np.int64]
    """Byte count of each tile/strip (0 = missing tile, painted as background)."""
    compression: int
    """TIFF Compression tag value."""
    photometric: int
    """TIFF PhotometricInterpretation."""
    samples: int
    """Samples per pixel: 1 (grey), 3 (RGB) or 4 (RGB + alpha)."""
    alpha: int
    """ExtraSamples of the 4th sample: 0 none, 1 associated (premultiplied), 2 unassociated."""
    predictor: int
    """TIFF Predictor: 1 none, 2 horizontal differencing."""
    jpegtables: bytes | None
    """Shared JPEGTables (abbreviated tile streams, as in Aperio SVS)."""
    tiled: bool
    """True for tiled pages; stripped pages store a short last strip."""

    @property
    def tiles_across(self) -> int:
        """Number of tile columns."""
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        """Number of tile rows."""
        return -(-self.height // self.tile_height)


def level_from_page(page: Any) -> TiffLevel | str:
    """Describe a tifffile page as a :class:`TiffLevel`, or return why the fast path can't read it.

    Parameters
    ----------
    page
        A ``tifffile.TiffPage``.

    Returns
    -------
    TiffLevel or str
        The level description, or a short reason string when unsupported.
    """
    compression = int(page.compression)
    photometric = int(page.photometric)
    samples = int(page.samplesperpixel)
    if compression not in _SUPPORTED_COMPRESSION:
        return f"compression {compression}"
    if int(page.bitspersample) != 8 or int(page.sampleformat) != 1:
        return f"{page.bitspersample}-bit samples (format {int(page.sampleformat)})"
    if int(page.imagedepth) != 1 or (int(page.planarconfig) != 1 and samples > 1):
        return "3-D or planar-separate data"
    if int(getattr(page, "fillorder", 1)) != 1:
        return "FillOrder 2"
    if samples not in (1, 3, 4):
        return f"{samples} samples per pixel"
    extrasamples = tuple(int(v) for v in (page.extrasamples or ()))
    alpha = 0
    if samples == 4:
        if len(extrasamples) != 1 or extrasamples[0] not in (1, 2):
            return "4 samples without an alpha ExtraSample"
        alpha = extrasamples[0]
    elif extrasamples:
        return "unexpected ExtraSamples"
    if samples == 1 and photometric != _MINISBLACK:
        return f"photometric {photometric} for 1 sample"
    if samples > 1 and photometric not in (_RGB, _YCBCR):
        return f"photometric {photometric}"
    if photometric == _YCBCR and compression != _JPEG:
        return "YCbCr without JPEG"
    predictor = int(page.predictor or 1)
    if predictor not in (1, 2) or (predictor == 2 and compression in (_JPEG, _JPEG2K)):
        return f"predictor {predictor}"
    if page.is_tiled:
        tile_w, tile_h = int(page.tilewidth), int(page.tilelength)
    else:
        tile_w = int(page.imagewidth)
        tile_h = min(int(page.rowsperstrip or page.imagelength), int(page.imagelength))
    level = TiffLevel(
        width=int(page.imagewidth),
        height=int(page.imagelength),
        tile_width=tile_w,
        tile_height=max(1, tile_h),
        offsets=np.asarray(page.dataoffsets, dtype=np.int64),
        bytecounts=np.asarray(page.databytecounts, dtype=np.int64),
        compression=compression,
        photometric=photometric,
        samples=samples,
        alpha=alpha,
        predictor=predictor,
        jpegtables=bytes(page.jpegtables) if page.jpegtables is not None else None,
        tiled=bool(page.is_tiled),
    )
    if level.offsets.size != level.tiles_across * level.tiles_down:
        return f"{level.offsets.size} tiles for a {level.tiles_across}x{level.tiles_down} grid"
    return level


class TiffTileReader:
    """Region reader over :class:`TiffLevel` pages of one file with an LRU decoded-tile cache.

    Parameters
    ----------
    path
        The TIFF file.
    levels
        One :class:`TiffLevel` per pyramid level, finest first.
    downsamples
        Level-0 px per level px for each level.
    background
        RGB used for padding, missing tiles and under transparent pixels.
    name
        Backend name reported by ``Slide.reader``.
    cache_bytes
        Capacity of the decoded-tile cache.
    """

    def __init__(
        self,
        path: Path,
        levels: Sequence[TiffLevel],
        downsamples: Sequence[float],
        background: tuple[int, int, int],
        *,
        name: str = "fast-tiff",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.name = name
        self._path = path
        self._levels = tuple(levels)
        self._downsamples = tuple(float(d) for d in downsamples)
        self._background = background
        self._bg_array = np.asarray(background, dtype=np.uint8)
        self._cache: OrderedDict[tuple[int, int], npt.NDArray[np.uint8]] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_bytes)
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise SlideOpenError(f"{path.name}: cannot open for reading ({exc})") from exc

    # ------------------------------------------------------------------ public
    def read_l0(
        self, l0_x: int, l0_y: int, level: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]:
        """RGB ``(height, width, 3)`` of ``level``; top-left at level-0 ``(l0_x, l0_y)``."""
        downsample = self._downsamples[level]
        if level == 0:
            return self.read_level(0, l0_x, l0_y, width, height)
        # nearest level px: OpenSlide interpolates fractional positions, this snaps to the pixel
        lv_x = math.floor(l0_x / downsample + 0.5)
        lv_y = math.floor(l0_y / downsample + 0.5)
        return self.read_level(level, lv_x, lv_y, width, height)

    def read_level(
        self, level: int, lv_x: int, lv_y: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]:
        """RGB ``(height, width, 3)`` of ``level``; top-left in that level's px; padded."""
        info = self._levels[level]
        out = np.empty((height, width, 3), dtype=np.uint8)
        x0, y0 = max(lv_x, 0), max(lv_y, 0)
        x1, y1 = min(lv_x + width, info.width), min(lv_y + height, info.height)
        if x1 <= x0 or y1 <= y0:
            out[...] = self._bg_array
            return out
        if (x0, y0, x1, y1) != (lv_x, lv_y, lv_x + width, lv_y + height):
            out[...] = self._bg_array
        tw, th = info.tile_width, info.tile_height
        col0, col1 = x0 // tw, (x1 - 1) // tw
        row0, row1 = y0 // th, (y1 - 1) // th
        if (
            col0 == col1
            and row0 == row1
            and (lv_x, lv_y, width, height) == (col0 * tw, row0 * th, tw, th)
            and info.samples == 3
            and (level, row0 * info.tiles_across + col0) not in self._cache
        ):
            # tile-aligned read of one whole tile: decode straight into the output array
            self._decode_into(level, info, col0, row0, out)
            return out
        for row in range(row0, row1 + 1):
            ty0 = row * th
            sy0, sy1 = max(y0, ty0), min(y1, ty0 + th)
            for col in range(col0, col1 + 1):
                tx0 = col * tw
                sx0, sx1 = max(x0, tx0), min(x1, tx0 + tw)
                tile = self._tile(level, info, col, row)
                out[sy0 - lv_y : sy1 - lv_y, sx0 - lv_x : sx1 - lv_x] = tile[
                    sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0
                ]
        return out

    def close(self) -> None:
        """Close the file descriptor and drop the cache (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._cache.clear()
        self._cache_bytes = 0

    # ------------------------------------------------------------------ tiles
    def _tile(self, level: int, info: TiffLevel, col: int, row: int) -> npt.NDArray[np.uint8]:
        key = (level, row * info.tiles_across + col)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        rows = min(info.tile_height, info.height - row * info.tile_height)
        tile = np.empty((rows, info.tile_width, 3), dtype=np.uint8)
        self._decode_into(level, info, col, row, tile)
        self._cache[key] = tile
        self._cache_bytes += tile.nbytes
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return tile

    def _decode_into(
        self, level: int, info: TiffLevel, col: int, row: int, out: npt.NDArray[np.uint8]
    ) -> None:
        """Decode tile ``(col, row)`` into ``out`` (``(rows, tile_width, 3)``, C-contiguous)."""
        index = row * info.tiles_across + col
        nbytes = int(info.bytecounts[index])
        offset = int(info.offsets[index])
        if nbytes == 0 or offset == 0:
            out[...] = self._bg_array
            return
        if self._fd is None:
            raise SlideReadError(f"{self._path.name}: slide is closed; reopen it with open_slide")
        try:
            data = os.pread(self._fd, nbytes, offset)
            if len(data) != nbytes:
                raise ValueError(f"file truncated: {len(data)} of {nbytes} bytes at {offset}")
            self._decode(info, data, out)
        except Exception as exc:  # any codec failure means corrupt tile data
            raise SlideReadError(
                f"{self._path.name}: cannot decode level {level} tile col={col} row={row} "
                f"(level px x={col * info.tile_width} y={row * info.tile_height}, "
                f"{info.tile_width}x{info.tile_height}): {type(exc).__name__}: {exc}; "
                "the tile data is corrupt"
            ) from exc

    def _decode(self, info: TiffLevel, data: bytes, out: npt.NDArray[np.uint8]) -> None:
        rows, width = out.shape[0], out.shape[1]
        full = rows == info.tile_height and width == info.tile_width
        if info.compression == _JPEG:
            colorspace: int | None = None
            outcolorspace: int | None = _RGB if info.samples >= 3 else None
            if info.photometric == _RGB and data[6:10] != b"JFIF":
                colorspace = _RGB  # Aperio: RGB components, no colour transform (as libtiff)
            if info.samples == 3 and full:
                decoded = imagecodecs.jpeg8_decode(
                    data,
                    tables=info.jpegtables,
                    colorspace=colorspace,
                    outcolorspace=outcolorspace,
                    out=out,
                )
                if decoded is not out and decoded.shape != out.shape:
                    raise ValueError(f"JPEG tile is {decoded.shape}, expected {out.shape}")
                if decoded is not out:
                    out[...] = decoded
                return
            pixels = imagecodecs.jpeg8_decode(
                data, tables=info.jpegtables, colorspace=colorspace, outcolorspace=outcolorspace
            )
        elif info.compression in (_JPEG2K, _JPEG2K_APERIO_RGB):
            pixels = imagecodecs.jpeg2k_decode(data)
        else:
            if info.compression == _LZW:
                raw = imagecodecs.lzw_decode(data)
            elif info.compression in _DEFLATE:
                raw = imagecodecs.zlib_decode(data)
            else:
                raw = data
            stored_rows = info.tile_height if info.tiled else rows
            need = stored_rows * info.tile_width * info.samples
            if len(raw) < need:
                raise ValueError(f"tile holds {len(raw)} bytes, expected {need}")
            pixels = np.frombuffer(raw, dtype=np.uint8, count=need).reshape(
                stored_rows, info.tile_width, info.samples
            )
            if info.predictor == 2:
                pixels = np.cumsum(pixels, axis=1, dtype=np.uint8)
        self._to_rgb(info, np.asarray(pixels, dtype=np.uint8), out)

    def _to_rgb(
        self, info: TiffLevel, pixels: npt.NDArray[np.uint8], out: npt.NDArray[np.uint8]
    ) -> None:
        """Copy decoded samples into RGB ``out``, padding short tiles, compositing alpha."""
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        rows = min(out.shape[0], pixels.shape[0])
        cols = min(out.shape[1], pixels.shape[1])
        if (rows, cols) != out.shape[:2]:
            out[...] = self._bg_array
        src = pixels[:rows, :cols]
        dst = out[:rows, :cols]
        channels = src.shape[2]
        if channels in (1, 3):
            dst[...] = src
        elif channels == 4:
            alpha = src[..., 3:4].astype(np.float32) / 255.0
            rgb = src[..., :3].astype(np.float32)
            bg = self._bg_array.astype(np.float32)
            if info.alpha == 1:  # premultiplied
                mixed = rgb + bg * (1.0 - alpha)
            else:
                mixed = rgb * alpha + bg * (1.0 - alpha)
            dst[...] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
        else:
            raise ValueError(f"decoded tile has {channels} channels")
