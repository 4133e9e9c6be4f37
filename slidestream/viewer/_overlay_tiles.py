"""Nuclei drawn by the server as transparent PNG tiles of the slide's DeepZoom pyramid.

Two styles, chosen by the DeepZoom level's µm/px (so that a slide with millions of nuclei stays
smooth: the work of a tile depends on its pixels and on the nuclei inside it only):

* coarser than :data:`DENSITY_ABOVE_MPP`: a **density map**, nuclei per mm² on 16 µm bins (the
  index's raster, area-averaged by powers of two and sampled bilinearly), in ``overlay.png``'s
  colour map, scaled to the slide's 99th percentile, transparent where there are no nuclei;
* finer: one **dot** per nucleus in its class/type colour, of the nucleus's size (at least
  1.5 px across), drawn with OpenCV.

Pixels are RGBA; tiles cover exactly the slide tiles of
:class:`~slidestream.viewer.DeepZoomGrid`.
"""

from __future__ import annotations

import math
import threading
from typing import Final

import cv2
import imagecodecs
import numpy as np
import numpy.typing as npt

from slidestream.overlays import density_colormap

from ._dzi import TileRegion
from ._nuclei_index import NucleusIndex

__all__ = ["DENSITY_ABOVE_MPP", "DensityPyramid", "render_nuclei_tile"]

#: DeepZoom levels coarser than this (µm per DeepZoom px) show the density map.
DENSITY_ABOVE_MPP: Final = 4.0
_DOT_ALPHA: Final = 230
_DENSITY_ALPHA: Final = 210
#: Densities under this share of the scale are transparent.
_DENSITY_FLOOR: Final = 0.03


class DensityPyramid:
    """The density raster of an index, and its 2x area-averaged reductions (built lazily)."""

    def __init__(self, index: NucleusIndex) -> None:
        self.bin_l0 = index.density_bin_l0
        self.scale = index.density_scale
        self._levels: list[npt.NDArray[np.float32]] = [index.density]
        self._lock = threading.Lock()

    def level(self, k: int) -> npt.NDArray[np.float32]:
        """Reduction ``k`` (bins of ``bin_l0 * 2**k`` level-0 px)."""
        with self._lock:
            while len(self._levels) <= k:
                prev = self._levels[-1]
                if min(prev.shape) <= 1:
                    break
                h, w = prev.shape
                nxt = cv2.resize(
                    prev, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA
                )
                self._levels.append(np.asarray(nxt, np.float32))
            return self._levels[min(k, len(self._levels) - 1)]


def _encode_png(rgba: npt.NDArray[np.uint8]) -> bytes:
    return bytes(imagecodecs.png_encode(rgba, level=1))


def _density_tile(pyramid: DensityPyramid, region: TileRegion) -> npt.NDArray[np.uint8] | None:
    out_w, out_h = region.z_size
    ds = region.z_downsample  # level-0 px per tile px
    k = max(0, math.floor(math.log2(max(1.0, ds / pyramid.bin_l0))))
    raster = pyramid.level(k)
    bin_l0 = pyramid.bin_l0 * (2**k)
    # output px (u, v) centre -> raster coordinates (bin centres at integers)
    sx = ds / bin_l0
    tx = region.l0_origin[0] / bin_l0 + 0.5 * sx - 0.5
    ty = region.l0_origin[1] / bin_l0 + 0.5 * sx - 0.5
    matrix = np.array([[sx, 0.0, tx], [0.0, sx, ty]], np.float64)
    values = cv2.warpAffine(
        raster,
        matrix,
        (out_w, out_h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    scaled = np.asarray(values, np.float32) / np.float32(pyramid.scale)
    visible = scaled >= _DENSITY_FLOOR
    if not visible.any():
        return None
    rgba = np.zeros((out_h, out_w, 4), np.uint8)
    rgba[..., :3] = density_colormap(np.clip(scaled, 0.0, 1.0))
    fade = np.clip((scaled - _DENSITY_FLOOR) / (4 * _DENSITY_FLOOR), 0.0, 1.0)
    rgba[..., 3] = np.where(visible, np.round(fade * _DENSITY_ALPHA), 0).astype(np.uint8)
    return rgba


def _dot_tile(
    index: NucleusIndex, region: TileRegion, colours: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8] | None:
    out_w, out_h = region.z_size
    ds = region.z_downsample
    x0, y0 = region.l0_origin
    w, h = region.l0_size
    pos = index.in_box(x0, y0, x0 + w, y0 + h, margin_l0=index.max_radius_l0)
    if pos.size == 0:
        return None
    u = (index.x[pos] - x0) / ds
    v = (index.y[pos] - y0) / ds
    r = np.maximum(index.radius_l0[pos] / ds, 0.75)
    codes = index.codes[pos]
    rgba = np.zeros((out_h, out_w, 4), np.uint8)
    lut = np.zeros((len(colours), 4), np.uint8)
    lut[:, :3] = colours
    lut[:, 3] = _DOT_ALPHA
    small = r < 1.5
    if small.any():
        # sub-2-px dots: a 2 x 2 px block each, vectorised
        su = np.floor(u[small] - 0.5).astype(np.int64)
        sv = np.floor(v[small] - 0.5).astype(np.int64)
        colour = lut[codes[small]]
        for du in (0, 1):
            for dv in (0, 1):
                uu, vv = su + du, sv + dv
                ok = (uu >= 0) & (uu < out_w) & (vv >= 0) & (vv < out_h)
                rgba[vv[ok], uu[ok]] = colour[ok]
    big = np.flatnonzero(~small)
    if big.size:
        shift = 2  # sub-pixel centres: OpenCV's fixed-point coordinates (1/4 px)
        cu = np.round(u[big] * (1 << shift)).astype(np.int64)
        cv = np.round(v[big] * (1 << shift)).astype(np.int64)
        rr = np.round(r[big] * (1 << shift)).astype(np.int64)
        colour_big = lut[codes[big]].tolist()
        for i in range(big.size):
            cv2.circle(
                rgba,
                (int(cu[i]), int(cv[i])),
                int(rr[i]),
                colour_big[i],
                thickness=-1,
                lineType=cv2.LINE_8,
                shift=shift,
            )
    if not rgba[..., 3].any():
        return None
    return rgba


def render_nuclei_tile(
    index: NucleusIndex,
    pyramid: DensityPyramid,
    region: TileRegion,
    colours: npt.NDArray[np.uint8],
    *,
    empty: dict[tuple[int, int], bytes],
) -> bytes:
    """One nucleus overlay tile as a PNG (RGBA).

    Parameters
    ----------
    index
        The slide's nuclei.
    pyramid
        Their density raster.
    region
        The DeepZoom tile.
    colours
        ``(len(index.categories), 3)`` uint8 RGB per category of the colour key.
    empty
        Cache of fully transparent tiles by size (filled here).

    Returns
    -------
    bytes
        PNG image of size ``region.z_size``.
    """
    mpp = index.mpp * region.z_downsample
    if mpp > DENSITY_ABOVE_MPP:
        rgba = _density_tile(pyramid, region)
    else:
        rgba = _dot_tile(index, region, colours)
    if rgba is None:
        size = region.z_size
        blank = empty.get(size)
        if blank is None:
            blank = _encode_png(np.zeros((size[1], size[0], 4), np.uint8))
            empty[size] = blank
        return blank
    return _encode_png(rgba)
