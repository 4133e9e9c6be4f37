"""Tissue class map: patch probability grid -> smoothed class raster -> one polygon per class.

Frames. The patch grid has ``(rows, cols)`` cells; cell ``(r, c)`` covers level-0 px
``[x0 + c * w, x0 + (c + 1) * w) x [y0 + r * h, y0 + (r + 1) * h)`` with ``(x0, y0) = l0_origin``
and ``(w, h) = l0_cell_size``. The class raster is that grid upsampled ``upsample`` times (so
region borders are not patch-blocky); its pixel ``(i, j)`` covers level-0 px
``x0 + j * w / upsample ...``. All polygons are in level-0 px, areas in µm² via the level-0 µm/px.

Algorithm. (1) Probabilities are smoothed with a Gaussian by normalised convolution, so cells
outside the tissue neither count nor leak in. (2) They are upsampled bilinearly and the argmax
taken inside the (bilinearly upsampled) tissue mask. (3) Every connected region — of a class, or
of background — smaller than ``min_island_area_um2`` is given to its surroundings (each pixel takes
the label of the nearest kept pixel): tiny islands vanish, tiny holes are filled, larger holes
(lumen, fat) are kept. (4) Each class is vectorised exactly along pixel edges, so the classes form
a coverage (shared borders, no gaps or overlaps), and the coverage is simplified jointly
(``shapely.coverage_simplify``) to remove the staircase while keeping shared borders shared.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
import shapely
from scipy import ndimage
from shapely.geometry.base import BaseGeometry

from slidestream.errors import ConfigError

from ._table import UNCLASSIFIED

__all__ = [
    "ClassRaster",
    "TissueRegions",
    "assign_classes",
    "class_map_to_polygons",
    "class_map_to_raster",
    "raster_to_polygons",
    "tissue_class_regions",
]

logger = logging.getLogger(__name__)

_NO_TISSUE = -1


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class ClassRaster:
    """A tissue class label image placed on the slide."""

    labels: npt.NDArray[np.int16]
    """(H, W) int16 index into ``class_names``; -1 = no tissue."""
    class_names: tuple[str, ...]
    """Class name per label value."""
    l0_origin: tuple[float, float]
    """Level-0 px ``(x, y)`` of the raster's top-left corner."""
    l0_pixel_size: tuple[float, float]
    """Level-0 px ``(width, height)`` of one raster pixel."""
    l0_cell_size: tuple[float, float]
    """Level-0 px ``(width, height)`` of one cell of the original patch grid."""
    mpp: float
    """Level-0 µm/px."""

    def __post_init__(self) -> None:
        if self.labels.ndim != 2 or min(self.l0_pixel_size) <= 0 or self.mpp <= 0:
            raise ConfigError(
                f"ClassRaster: labels {self.labels.shape} must be 2-D and pixel size "
                f"{self.l0_pixel_size} / mpp {self.mpp} positive"
            )


def _validate(
    probabilities: npt.NDArray[np.floating], class_names: Sequence[str], mpp: float
) -> None:
    if probabilities.ndim != 3 or probabilities.shape[2] != len(class_names):
        raise ConfigError(
            f"class map: probabilities have shape {probabilities.shape}, expected (rows, cols, K) "
            f"with K = {len(class_names)} class names"
        )
    if mpp <= 0:
        raise ConfigError(f"class map: mpp {mpp} must be > 0 (level-0 µm/px)")


def class_map_to_raster(
    probabilities: npt.NDArray[np.floating],
    *,
    l0_cell_size: tuple[float, float],
    l0_origin: tuple[float, float] = (0.0, 0.0),
    class_names: Sequence[str],
    mpp: float,
    smoothing_sigma_cells: float = 1.0,
    min_island_area_um2: float = 20_000.0,
    tissue_mask: npt.NDArray[np.bool_] | None = None,
    upsample: int = 4,
) -> ClassRaster:
    """Smooth a patch probability grid and return the cleaned class raster.

    Parameters
    ----------
    probabilities : ndarray of float, shape (rows, cols, K)
        Class probabilities per patch-grid cell; NaN where no patch was classified.
    l0_cell_size : (width, height)
        Level-0 px covered by one grid cell.
    l0_origin : (x, y)
        Level-0 px of the grid's top-left corner.
    class_names : sequence of str, length K
    mpp : float
        Level-0 µm/px.
    smoothing_sigma_cells : float
        Gaussian sigma in grid cells (0 = no smoothing).
    min_island_area_um2 : float
        Regions (class islands, or background holes) smaller than this are absorbed by their
        surroundings.
    tissue_mask : ndarray of bool, shape (rows, cols), optional
        Cells that are tissue; default: cells whose probabilities are all finite.
    upsample : int
        Raster pixels per grid cell along each axis.

    Returns
    -------
    ClassRaster
    """
    _validate(probabilities, class_names, mpp)
    if upsample < 1 or smoothing_sigma_cells < 0:
        raise ConfigError(
            f"class map: upsample {upsample} must be >= 1 and smoothing_sigma_cells "
            f"{smoothing_sigma_cells} >= 0"
        )
    probs = np.asarray(probabilities, np.float32)
    valid: npt.NDArray[np.bool_] = np.asarray(np.isfinite(probs).all(axis=2), bool)
    if tissue_mask is not None:
        if tissue_mask.shape != valid.shape:
            raise ConfigError(
                f"class map: tissue_mask shape {tissue_mask.shape} differs from the grid "
                f"{valid.shape}; pass one bool per grid cell"
            )
        valid &= tissue_mask
    weight = valid.astype(np.float32)
    num = np.asarray(np.where(valid[..., None], probs, np.float32(0)), np.float32)
    den = weight
    if smoothing_sigma_cells > 0:
        s = smoothing_sigma_cells
        num = np.asarray(ndimage.gaussian_filter(num, sigma=(s, s, 0), mode="constant"), np.float32)
        den = np.asarray(ndimage.gaussian_filter(weight, sigma=s, mode="constant"), np.float32)
    rows, cols, k = probs.shape
    size = (cols * upsample, rows * upsample)

    def up(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(cv2.resize(a, size, interpolation=cv2.INTER_LINEAR), np.float32)

    # the outline follows the lightly smoothed tissue mask (no patch staircase)
    soft = ndimage.gaussian_filter(weight, sigma=smoothing_sigma_cells, mode="constant")
    tissue = up(soft if smoothing_sigma_cells > 0 else weight) >= 0.5
    den_up = up(den)
    score = np.stack([up(np.ascontiguousarray(num[..., i])) for i in range(k)], axis=2)
    labels = np.argmax(score, axis=2).astype(np.int16)
    labels[~tissue | (den_up <= 0)] = _NO_TISSUE
    l0_pixel = (l0_cell_size[0] / upsample, l0_cell_size[1] / upsample)
    min_px = min_island_area_um2 / (l0_pixel[0] * l0_pixel[1] * mpp * mpp)
    labels = _absorb_small_regions(labels, min_px)
    return ClassRaster(
        labels=labels,
        class_names=tuple(class_names),
        l0_origin=(float(l0_origin[0]), float(l0_origin[1])),
        l0_pixel_size=l0_pixel,
        l0_cell_size=(float(l0_cell_size[0]), float(l0_cell_size[1])),
        mpp=float(mpp),
    )


def _absorb_small_regions(labels: npt.NDArray[np.int16], min_px: float) -> npt.NDArray[np.int16]:
    """Give every 4-connected region smaller than ``min_px`` pixels to its nearest kept pixels."""
    if min_px <= 1:
        return labels
    removed = np.zeros(labels.shape, bool)
    for value in np.unique(labels):
        comp, n = ndimage.label(labels == value)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())
        small = sizes < min_px
        small[0] = False
        if value == _NO_TISSUE:  # background touching the border is outside, never a hole
            border = np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))
            small[border] = False
        removed |= small[comp]
    if not removed.any():
        return labels
    if removed.all():
        return np.full_like(labels, _NO_TISSUE)
    idx = ndimage.distance_transform_edt(removed, return_distances=False, return_indices=True)
    return np.asarray(labels[tuple(idx)], np.int16)


def _class_coverage(labels: npt.NDArray[np.int16], value: int) -> BaseGeometry:
    """Exact pixel-edge (Multi)Polygon of ``labels == value`` in raster px."""
    mask = np.pad(labels == value, ((0, 0), (1, 1))).view(np.int8)
    d = np.diff(mask, axis=1)
    r0, c0 = np.nonzero(d == 1)
    _, c1 = np.nonzero(d == -1)
    if r0.size == 0:
        return shapely.Polygon()
    boxes = shapely.box(c0, r0, c1, r0 + 1)
    return shapely.union_all(boxes)


def raster_to_polygons(
    raster: ClassRaster, *, min_island_area_um2: float = 0.0, simplify_tolerance_px: float = 1.5
) -> dict[str, BaseGeometry]:
    """Vectorise a class raster: one valid (Multi)Polygon per present class, in level-0 px.

    Parameters
    ----------
    raster : ClassRaster
    min_island_area_um2 : float
        Polygon parts smaller than this after simplification are dropped.
    simplify_tolerance_px : float
        ``shapely.coverage_simplify`` tolerance in raster px (~ sqrt of the removed triangle area).

    Returns
    -------
    dict
        Class name -> Polygon or MultiPolygon (holes kept), in the order of ``class_names``;
        classes with no area are left out.
    """
    present = [v for v in range(len(raster.class_names)) if (raster.labels == v).any()]
    geoms = np.array([_class_coverage(raster.labels, v) for v in present], dtype=object)
    if geoms.size and simplify_tolerance_px > 0:
        geoms = shapely.coverage_simplify(geoms, simplify_tolerance_px)
    sx, sy = raster.l0_pixel_size
    ox, oy = raster.l0_origin
    min_l0_px2 = min_island_area_um2 / (raster.mpp * raster.mpp)
    out: dict[str, BaseGeometry] = {}
    for value, geom in zip(present, geoms, strict=True):
        g = shapely.transform(geom, lambda xy: xy * (sx, sy) + (ox, oy))
        if not g.is_valid:
            g = shapely.make_valid(g)
        parts = shapely.get_parts(g)
        parts = parts[(shapely.get_type_id(parts) == 3) & (shapely.area(parts) >= min_l0_px2)]
        parts = parts[shapely.area(parts) > 0]
        if parts.size == 0:
            continue
        name = raster.class_names[value]
        out[name] = parts[0] if parts.size == 1 else shapely.MultiPolygon(list(parts))
    return out


def class_map_to_polygons(
    probabilities: npt.NDArray[np.floating],
    *,
    l0_cell_size: tuple[float, float],
    l0_origin: tuple[float, float] = (0.0, 0.0),
    class_names: Sequence[str],
    mpp: float,
    smoothing_sigma_cells: float = 1.0,
    min_island_area_um2: float = 20_000.0,
    tissue_mask: npt.NDArray[np.bool_] | None = None,
    upsample: int = 4,
) -> dict[str, BaseGeometry]:
    """Turn a patch probability grid into one level-0 (Multi)Polygon per tissue class.

    ``class_map_to_raster`` followed by ``raster_to_polygons``; see those for the parameters.
    Use them separately when the raster is also needed (for :func:`assign_classes`).

    Examples
    --------
    >>> import numpy as np
    >>> p = np.zeros((4, 6, 2), np.float32); p[..., 0] = 1; p[:, 3:] = (0, 1)
    >>> polys = class_map_to_polygons(p, l0_cell_size=(100, 100), class_names=["a", "b"],
    ...                               mpp=0.5, smoothing_sigma_cells=0, min_island_area_um2=0)
    >>> {k: round(v.area) for k, v in polys.items()}
    {'a': 120000, 'b': 120000}
    """
    raster = class_map_to_raster(
        probabilities,
        l0_cell_size=l0_cell_size,
        l0_origin=l0_origin,
        class_names=class_names,
        mpp=mpp,
        smoothing_sigma_cells=smoothing_sigma_cells,
        min_island_area_um2=min_island_area_um2,
        tissue_mask=tissue_mask,
        upsample=upsample,
    )
    return raster_to_polygons(raster, min_island_area_um2=min_island_area_um2)


def assign_classes(
    centroids_l0: npt.NDArray[np.floating],
    raster: ClassRaster,
    *,
    max_distance_l0: float | None = None,
) -> npt.NDArray[np.str_]:
    """Return the tissue class of each point by a vectorised raster lookup.

    A point on a class pixel gets that class. A point outside every class region (beyond the
    tissue outline, in a hole, off the raster) gets the class of the nearest class pixel if it is
    within ``max_distance_l0`` (default: one patch-grid cell, which covers nuclei at the ragged
    tissue edge that the coarse grid cut off), else :data:`UNCLASSIFIED`.

    Parameters
    ----------
    centroids_l0 : ndarray of float, shape (N, 2)
        Points ``(x, y)`` in level-0 px.
    raster : ClassRaster
    max_distance_l0 : float, optional
        Largest distance, level-0 px, at which the nearest class is used.

    Returns
    -------
    ndarray of str, shape (N,)
    """
    pts = np.asarray(centroids_l0, np.float64).reshape(-1, 2)
    names = np.array([*raster.class_names, UNCLASSIFIED])
    if pts.shape[0] == 0:
        return names[:0]
    h, w = raster.labels.shape
    sx, sy = raster.l0_pixel_size
    fx = (pts[:, 0] - raster.l0_origin[0]) / sx
    fy = (pts[:, 1] - raster.l0_origin[1]) / sy
    col = np.clip(np.floor(fx), 0, w - 1).astype(np.intp)
    row = np.clip(np.floor(fy), 0, h - 1).astype(np.intp)
    off_x = np.maximum(np.maximum(-fx, fx - w), 0) * sx  # distance past the raster edge, l0 px
    off_y = np.maximum(np.maximum(-fy, fy - h), 0) * sy
    off = np.hypot(off_x, off_y)
    value = raster.labels[row, col].astype(np.intp)
    value[off > 0] = _NO_TISSUE
    missing = np.flatnonzero(value == _NO_TISSUE)
    if missing.size and (raster.labels != _NO_TISSUE).any():
        limit = max(raster.l0_cell_size) if max_distance_l0 is None else max_distance_l0
        dist, idx = ndimage.distance_transform_edt(
            raster.labels == _NO_TISSUE, sampling=(sy, sx), return_indices=True
        )
        r, c = row[missing], col[missing]
        near = raster.labels[idx[0][r, c], idx[1][r, c]].astype(np.intp)
        total = dist[r, c] + off[missing]
        value[missing] = np.where(total <= limit, near, len(raster.class_names))
    value[value == _NO_TISSUE] = len(raster.class_names)
    return names[value]


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class TissueRegions:
    """A slide's tissue class map: the class raster plus its polygons (built once)."""

    raster: ClassRaster
    """The cleaned class raster (for vectorised lookups)."""
    class_polygons: dict[str, BaseGeometry]
    """Class name -> (Multi)Polygon in level-0 px."""

    def polygons(self) -> dict[str, BaseGeometry]:
        """Class name -> (Multi)Polygon in level-0 px (classes without area left out)."""
        return dict(self.class_polygons)

    def class_area_mm2(self) -> dict[str, float]:
        """Area of every class (0.0 when absent), mm², from the polygons."""
        um2_per_px = self.raster.mpp**2
        return {
            name: float(self.class_polygons[name].area) * um2_per_px / 1e6
            if name in self.class_polygons
            else 0.0
            for name in self.raster.class_names
        }

    def assign(
        self,
        centroid_x: npt.NDArray[np.floating],
        centroid_y: npt.NDArray[np.floating],
        *,
        max_distance_l0: float | None = None,
    ) -> tuple[npt.NDArray[np.str_], npt.NDArray[np.intp]]:
        """Class of each point (level-0 px), see :func:`assign_classes`.

        Returns
        -------
        names : ndarray of str, shape (N,)
        index : ndarray of intp, shape (N,)
            Position in ``class_names``; ``len(class_names)`` for :data:`UNCLASSIFIED`.
        """
        pts = np.stack([np.asarray(centroid_x), np.asarray(centroid_y)], axis=1)
        names = assign_classes(pts, self.raster, max_distance_l0=max_distance_l0)
        lookup = {n: i for i, n in enumerate(self.raster.class_names)}
        index = np.array([lookup.get(str(n), len(lookup)) for n in np.unique(names)], np.intp)
        _, inverse = np.unique(names, return_inverse=True)
        return names, index[inverse.ravel()]


def tissue_class_regions(
    probabilities: npt.NDArray[np.floating],
    tissue_mask: npt.NDArray[np.bool_] | None = None,
    *,
    class_names: Sequence[str],
    l0_cell_size: tuple[float, float],
    mpp: float,
    l0_origin: tuple[float, float] = (0.0, 0.0),
    smoothing_sigma_cells: float = 1.0,
    min_island_area_um2: float = 20_000.0,
    upsample: int = 4,
) -> TissueRegions:
    """Build the raster and the polygons once; see :func:`class_map_to_raster` for parameters."""
    raster = class_map_to_raster(
        probabilities,
        l0_cell_size=l0_cell_size,
        l0_origin=l0_origin,
        class_names=class_names,
        mpp=mpp,
        smoothing_sigma_cells=smoothing_sigma_cells,
        min_island_area_um2=min_island_area_um2,
        tissue_mask=tissue_mask,
        upsample=upsample,
    )
    polys = raster_to_polygons(raster, min_island_area_um2=min_island_area_um2)
    return TissueRegions(raster=raster, class_polygons=polys)
