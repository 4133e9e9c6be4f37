"""Write synthetic pyramidal tiled TIFFs (tests, benchmarks, demos).

The writer streams: level 0 is produced one tile row (strip) at a time from an array or a tile
callable, and every lower level is built from those strips by 2x2 averaging as they pass, so a
40,000 x 30,000 px slide never sits in memory. Lower-level tiles are kept encoded (compressed)
until their page is written. Pages are successive main-chain IFDs with resolution tags in
centimetres, which OpenSlide reads as ``generic-tiff`` (or ``aperio`` with ``vendor_style``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import imagecodecs
import numpy as np
import numpy.typing as npt

from slidestream.errors import ConfigError

__all__ = ["TileSource", "write_pyramidal_tiff"]

logger = logging.getLogger(__name__)

#: ``source(x, y, width, height)`` -> RGB uint8 ``(height, width, 3)`` for that level-0 px
#: rectangle. The writer asks for whole tiles (smaller at the right/bottom edge), row by row.
TileSource = Callable[[int, int, int, int], npt.NDArray[np.uint8]]

Compression = Literal["jpeg", "deflate", "none"]
VendorStyle = Literal["generic", "aperio"]
_TIFF_COMPRESSION = {"jpeg": 7, "deflate": 8, "none": 1}


def _level_sizes(
    width: int, height: int, tile_size: int, levels: int | None
) -> list[tuple[int, int]]:
    sizes = [(width, height)]
    while (levels is None and max(sizes[-1]) > tile_size) or (
        levels is not None and len(sizes) < levels
    ):
        w, h = sizes[-1]
        if w < 2 or h < 2:
            if levels is not None:
                raise ConfigError(
                    f"levels={levels} is too many for a {width}x{height} px image; "
                    f"use at most {len(sizes)}"
                )
            break
        sizes.append((w // 2, h // 2))
    return sizes


class _Encoder:
    def __init__(self, compression: Compression, quality: int, tile_size: int) -> None:
        self.compression = compression
        self.quality = quality
        self.tile_size = tile_size

    def __call__(self, tile: npt.NDArray[np.uint8]) -> bytes:
        ts = self.tile_size
        if tile.shape[0] != ts or tile.shape[1] != ts:  # edge tile: pad by edge replication
            tile = np.pad(
                tile, ((0, ts - tile.shape[0]), (0, ts - tile.shape[1]), (0, 0)), mode="edge"
            )
        tile = np.ascontiguousarray(tile)
        if self.compression == "jpeg":
            return bytes(imagecodecs.jpeg8_encode(tile, level=self.quality))
        if self.compression == "deflate":
            return bytes(imagecodecs.zlib_encode(tile.tobytes(), level=6))
        return tile.tobytes()


class _Pyramid:
    """Cascade of strip buffers: level k strips -> encoded tiles + halved rows for level k+1."""

    def __init__(self, sizes: list[tuple[int, int]], encode: _Encoder) -> None:
        self.sizes = sizes
        self.encode = encode
        self.ts = encode.tile_size
        self.tiles: list[list[bytes]] = [[] for _ in sizes]
        # rows of level k-1 waiting to be halved into level k
        self.pending: list[npt.NDArray[np.uint8] | None] = [None for _ in sizes]
        # halved rows of level k waiting to fill a tile strip
        self.strip: list[list[npt.NDArray[np.uint8]]] = [[] for _ in sizes]
        self.rows_done = [0 for _ in sizes]

    def encode_strip(self, strip: npt.NDArray[np.uint8]) -> list[bytes]:
        ts = self.ts
        return [self.encode(strip[:, x : x + ts]) for x in range(0, strip.shape[1], ts)]

    def feed(self, level: int, rows: npt.NDArray[np.uint8]) -> None:
        """Give level ``level - 1`` rows to the halving stage of ``level``."""
        if level >= len(self.sizes):
            return
        w, h = self.sizes[level]
        prev = self.pending[level]
        rows = rows if prev is None else np.concatenate([prev, rows], axis=0)
        n = min(rows.shape[0] // 2, h - self.rows_done[level])
        self.pending[level] = rows[2 * n :] if rows.shape[0] > 2 * n else None
        if n <= 0:
            return
        block = rows[: 2 * n, : 2 * w].astype(np.uint16)
        halved = (
            (block[0::2, 0::2] + block[1::2, 0::2] + block[0::2, 1::2] + block[1::2, 1::2] + 2) // 4
        ).astype(np.uint8)
        self.rows_done[level] += n
        self.strip[level].append(halved)
        self._flush(level, final=self.rows_done[level] >= h)

    def _flush(self, level: int, *, final: bool) -> None:
        parts = self.strip[level]
        total = sum(p.shape[0] for p in parts)
        while total >= self.ts or (final and total > 0):
            rows = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
            strip, rest = rows[: self.ts], rows[self.ts :]
            self.tiles[level].extend(self.encode_strip(strip))
            self.feed(level + 1, strip)
            parts = [rest] if rest.shape[0] else []
            total = rest.shape[0]
        self.strip[level] = parts


def write_pyramidal_tiff(
    path: str | Path,
    image: npt.NDArray[np.uint8] | TileSource,
    *,
    mpp: float,
    tile_size: int = 256,
    compression: Compression = "jpeg",
    quality: int = 90,
    levels: int | None = None,
    vendor_style: VendorStyle = "generic",
    size: tuple[int, int] | None = None,
) -> Path:
    """Write a tiled pyramidal TIFF that OpenSlide opens.

    Parameters
    ----------
    path
        Output file (``.tif``/``.tiff``; ``.svs`` for ``vendor_style="aperio"``).
    image
        RGB uint8 ``(H, W, 3)`` level-0 pixels, or a :data:`TileSource` callable (then ``size``
        is required) for slides too large for memory.
    mpp
        µm/px at level 0, written as XResolution/YResolution in px/cm (and ``|MPP = `` for
        Aperio style).
    tile_size
        Tile edge in px (multiple of 16).
    compression
        ``"jpeg"`` (lossy, ``quality``), ``"deflate"`` (lossless) or ``"none"``.
    quality
        JPEG quality 1..100.
    levels
        Number of pyramid levels (each halves the previous); default: until the whole level
        fits in one tile.
    vendor_style
        ``"generic"`` (OpenSlide ``generic-tiff``) or ``"aperio"`` (ImageDescription starting
        "Aperio Image Library" with ``|MPP = ...``; OpenSlide ``aperio``).
    size
        ``(width, height)`` of level 0 in px when ``image`` is a callable.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    ConfigError
        For an invalid argument.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> img = np.zeros((100, 120, 3), np.uint8)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "tiny.tif"
    >>> write_pyramidal_tiff(out, img, mpp=0.5, tile_size=64, compression="deflate").name
    'tiny.tif'
    """
    import tifffile

    out_path = Path(path)
    if compression not in _TIFF_COMPRESSION:
        raise ConfigError(f"compression={compression!r}; use 'jpeg', 'deflate' or 'none'")
    if vendor_style not in ("generic", "aperio"):
        raise ConfigError(f"vendor_style={vendor_style!r}; use 'generic' or 'aperio'")
    if tile_size < 16 or tile_size % 16:
        raise ConfigError(f"tile_size={tile_size} must be a positive multiple of 16 px")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality={quality} must be in 1..100")
    if not mpp > 0:
        raise ConfigError(f"mpp={mpp!r} must be a positive µm/px")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ConfigError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        array = image
        width, height = int(image.shape[1]), int(image.shape[0])

        def _crop(x: int, y: int, w: int, h: int) -> npt.NDArray[np.uint8]:
            return array[y : y + h, x : x + w]

        source: TileSource = _crop
    else:
        if size is None:
            raise ConfigError("size=(width, height) is required when image is a tile callable")
        width, height = int(size[0]), int(size[1])
        source = image
    if width < 1 or height < 1:
        raise ConfigError(f"image size {width}x{height} px must be positive")

    sizes = _level_sizes(width, height, tile_size, levels)
    encoder = _Encoder(compression, quality, tile_size)
    pyramid = _Pyramid(sizes, encoder)
    ts = tile_size

    def level0_tiles() -> Iterator[bytes]:
        for y in range(0, height, ts):
            h = min(ts, height - y)
            strip = np.empty((h, width, 3), dtype=np.uint8)
            for x in range(0, width, ts):
                w = min(ts, width - x)
                tile = np.asarray(source(x, y, w, h), dtype=np.uint8)
                if tile.shape != (h, w, 3):
                    raise ConfigError(
                        f"tile source returned {tile.shape} for x={x} y={y}; expected {(h, w, 3)}"
                    )
                strip[:, x : x + w] = tile
            encoded = pyramid.encode_strip(strip)
            pyramid.feed(1, strip)  # before yielding: the writer stops pulling after the last tile
            yield from encoded

    px_per_cm = 1e4 / float(mpp)
    code = _TIFF_COMPRESSION[compression]
    q_text = f"Q={quality}" if compression == "jpeg" else compression.upper()
    with tifffile.TiffWriter(out_path, bigtiff=width * height * 3 > 2**31) as writer:
        for level, (w, h) in enumerate(sizes):
            scale = width / w
            description = None
            if vendor_style == "aperio":
                head = (
                    f"Aperio Image Library v12.0.0 \r\n{width}x{height} [0,0 {width}x{height}] "
                    f"({ts}x{ts}) {'JPEG' if compression == 'jpeg' else 'RAW'}/RGB {q_text}"
                )
                if level > 0:
                    head = f"Aperio Image Library v12.0.0 \r\n{width}x{height} -> {w}x{h} - "
                description = f"{head}|AppMag = {10.0 / mpp:g}|MPP = {mpp:.6g}"
            tiles: Iterator[bytes] = level0_tiles() if level == 0 else iter(pyramid.tiles[level])
            writer.write(
                tiles,
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(ts, ts),
                compression=code,
                photometric="rgb",
                subfiletype=0 if level == 0 else 1,
                resolution=(px_per_cm / scale, px_per_cm / scale),
                resolutionunit="CENTIMETER",
                description=description,
                metadata=None,
            )
            pyramid.tiles[level] = []  # free the encoded tiles as soon as they are written
    logger.debug("wrote %s: %dx%d px, %d levels, %s", out_path, width, height, len(sizes), code)
    return out_path
