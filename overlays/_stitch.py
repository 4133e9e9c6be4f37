"""Seam-free nucleus stitching: per-tile core ownership, contour tracing, level-0 polygons.

Runs in CPU worker processes: plain module-level functions over plain arrays and floats, returning
a picklable :class:`~slidestream.overlays.NucleusTable`.

Ownership rule. Tiles overlap by a halo; their *cores* partition the slide. A nucleus belongs to
the one tile whose core holds its centroid. With a halo at least as wide as the largest nucleus, a
nucleus whose centroid lies in a core is entirely inside that tile, so it is segmented whole and
reported exactly once. A nucleus in the core that touches the tile's outer border shows the halo
was too small: it is kept but counted in ``NucleusTable.truncated``.

Pixel convention. Tile pixel ``(c, r)`` covers ``[c, c + 1) x [r, r + 1)`` in continuous tile
coordinates; centroids from ``measure`` follow scikit-image (pixel centre at the integer index), so
``+ 0.5`` turns them into continuous coordinates;
level 0 = ``l0_origin + t_continuous * l0_per_px``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, cast

import cv2
import numpy as np
import numpy.typing as npt
import shapely
from scipy import ndimage

from slidestream.errors import ConfigError

from ._table import GEOMETRY_KEYS, NucleusTable

__all__ = ["MeasureFn", "extract_tile_nuclei", "trace_nuclei"]

logger = logging.getLogger(__name__)

MeasureFn: TypeAlias = Callable[
    [npt.NDArray[np.int32], npt.NDArray[np.uint8], float], Mapping[str, npt.NDArray[Any]]
]
"""``measure_nuclei(labels, rgb, mpp) -> {key: (n,) array}`` aligned with the ``label`` column."""

_POLYGON, _MULTIPOLYGON = 3, 6  # shapely geometry type ids


def _default_measure() -> MeasureFn:
    try:
        module = importlib.import_module("slidestream.models")
        return cast(MeasureFn, module.measure_nuclei)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            "extract_tile_nuclei: slidestream.models.measure_nuclei is not available; pass "
            "measure=<function(labels, rgb, mpp) -> dict of columns>"
        ) from exc


def _largest_contour(mask: npt.NDArray[np.uint8]) -> npt.NDArray[np.int32]:
    """Return the (k, 2) ``(x, y)`` pixel-centre outline of the largest component of ``mask``."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) == 1:
        best = contours[0]
    else:
        best = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    return cast(npt.NDArray[np.int32], best.reshape(-1, 2))


def _largest_polygons(geoms: npt.NDArray[np.object_]) -> npt.NDArray[np.object_]:
    """Replace every non-Polygon (MultiPolygon, collection) by its largest polygon part."""
    types = shapely.get_type_id(geoms)
    for i in np.flatnonzero(types != _POLYGON):
        parts = shapely.get_parts(geoms[i])
        parts = parts[shapely.get_type_id(parts) == _POLYGON]
        if parts.size == 0:
            parts = shapely.get_parts(shapely.buffer(geoms[i], 0.0))
        geoms[i] = parts[int(np.argmax(shapely.area(parts)))] if parts.size else shapely.Polygon()
    return geoms


def trace_nuclei(
    labels: npt.NDArray[np.integer[Any]],
    label_ids: npt.NDArray[np.integer[Any]],
    slices: Sequence[tuple[slice, ...] | None],
    *,
    simplify_tolerance_px: float = 0.5,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Trace one valid, closed, simplified outline per label, in continuous tile px.

    The outline is the pixel-centre contour (``cv2.findContours``) grown by half a pixel with
    mitred square joins, which follows the pixel edges (area ~ pixel count); invalid contours are
    repaired with ``shapely.make_valid`` (the largest polygon is kept; holes are dropped) and the
    ring is simplified within ``simplify_tolerance_px``.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Instance labels, 0 = background.
    label_ids : ndarray of int, shape (n,)
        Labels to trace, in output order.
    slices : list
        ``scipy.ndimage.find_objects(labels)``.
    simplify_tolerance_px : float
        Douglas-Peucker tolerance in tile px.

    Returns
    -------
    coords : ndarray of float64, shape (M, 2)
        Closed rings, ``(x, y)`` in continuous tile px (pixel edges at integers).
    offsets : ndarray of int64, shape (n + 1,)
        Ring ``i`` is ``coords[offsets[i]:offsets[i + 1]]``.
    """
    n = len(label_ids)
    if n == 0:
        return np.zeros((0, 2), np.float64), np.zeros(1, np.int64)
    outlines: list[npt.NDArray[np.int32]] = []
    origins = np.zeros((n, 2), np.float64)  # crop origin (x, y) in tile px
    extents = np.zeros((n, 2), np.float64)  # crop (width, height) in px
    for j, lab in enumerate(label_ids):
        sl = slices[int(lab) - 1]
        if sl is None:  # measured but absent from the image: cannot happen with a sane measure
            raise ConfigError(f"trace_nuclei: label {int(lab)} is not in the label image")
        crop = np.pad((labels[sl] == lab).view(np.uint8), 1)
        # geometry is computed in crop coordinates, so a nucleus gets the same outline whichever
        # tile it is traced in (no dependence of rounding / simplification ties on the position)
        outlines.append(_largest_contour(crop) - 1)  # padded crop -> crop pixel index
        origins[j] = sl[1].start, sl[0].start
        extents[j] = sl[1].stop - sl[1].start, sl[0].stop - sl[0].start
    sizes = np.fromiter((len(o) for o in outlines), np.int64, n)
    flat = np.concatenate(outlines).astype(np.float64)
    owner = np.repeat(np.arange(n), sizes)
    geoms = np.empty(n, dtype=object)
    is_poly = sizes >= 3
    if is_poly.any():
        sel = is_poly[owner]
        rings = shapely.linearrings(
            flat[sel], indices=np.repeat(np.arange(is_poly.sum()), sizes[is_poly])
        )
        geoms[is_poly] = shapely.polygons(rings)
        poly_idx = np.flatnonzero(is_poly)
        bad = poly_idx[~shapely.is_valid(geoms[poly_idx])]
        if bad.size:
            geoms[bad] = shapely.make_valid(geoms[bad])
    for i in np.flatnonzero(sizes == 2):
        geoms[i] = shapely.LineString(outlines[i])
    for i in np.flatnonzero(sizes == 1):
        geoms[i] = shapely.Point(outlines[i][0])
    grown = shapely.buffer(geoms, 0.5, cap_style="square", join_style="mitre")
    # mitres overshoot 45-degree corners: clip to the pixels' box (pixel centres at integers)
    grown = shapely.intersection(
        grown, shapely.box(-0.5, -0.5, extents[:, 0] - 0.5, extents[:, 1] - 0.5)
    )
    grown = _largest_polygons(grown)
    simple = shapely.simplify(grown, simplify_tolerance_px, preserve_topology=False)
    redo = np.flatnonzero(~shapely.is_valid(simple) | shapely.is_empty(simple))
    if redo.size:
        simple[redo] = shapely.simplify(grown[redo], simplify_tolerance_px, preserve_topology=True)
    simple = _largest_polygons(simple)
    coords, index = shapely.get_coordinates(shapely.get_exterior_ring(simple), return_index=True)
    counts = np.bincount(index, minlength=n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    coords += origins[index] + 0.5  # crop pixel index -> continuous tile px (edges at integers)
    return coords, offsets


def extract_tile_nuclei(
    labels: npt.NDArray[np.int32],
    rgb: npt.NDArray[np.uint8],
    *,
    core: tuple[int, int, int, int],
    l0_origin: tuple[float, float],
    l0_per_px: float,
    mpp: float,
    measure: MeasureFn | None = None,
    simplify_tolerance_px: float = 0.5,
) -> NucleusTable:
    """Return the nuclei this tile owns, as level-0 polygons with their measurements.

    Parameters
    ----------
    labels : ndarray of int32, shape (H, W)
        Instance labels of the whole tile (halo included) at the model's resolution; 0 =
        background, nuclei 1..L.
    rgb : ndarray of uint8, shape (H, W, 3)
        The tile image at the same resolution (for colour / optical-density measurements).
    core : (x0, y0, x1, y1)
        The tile's core in tile-local px; the tile owns nuclei whose centroid lies in
        ``[x0, x1) x [y0, y1)``.
    l0_origin : (x, y)
        Level-0 px position of the tile's top-left corner (may be negative for edge tiles).
    l0_per_px : float
        Level-0 px per tile px (tile µm/px / slide µm/px).
    mpp : float
        Tile µm/px, passed to ``measure``.
    measure : callable, optional
        ``measure(labels, rgb, mpp) -> dict`` with columns ``label``, ``centroid_x``,
        ``centroid_y`` (tile px, scikit-image convention) and measurements; default
        ``slidestream.models.measure_nuclei``.
    simplify_tolerance_px : float
        Outline simplification tolerance in tile px (0.5 = half a model pixel).

    Returns
    -------
    NucleusTable
        Owned nuclei in ``measure``'s label order; centroids, boxes and polygons in level-0 px;
        every ``measure`` column except geometry as a float64 measurement.

    Raises
    ------
    ConfigError
        On mismatched shapes, an empty core or a non-positive scale.
    """
    if labels.ndim != 2 or rgb.shape[:2] != labels.shape:
        raise ConfigError(
            f"extract_tile_nuclei: labels {labels.shape} and rgb {rgb.shape} must be (H, W) and "
            "(H, W, 3) at the same resolution"
        )
    x0, y0, x1, y1 = core
    if not (x1 > x0 and y1 > y0) or not (l0_per_px > 0 and mpp > 0):
        raise ConfigError(
            f"extract_tile_nuclei: core {core} must have x1 > x0, y1 > y0 and l0_per_px "
            f"{l0_per_px} / mpp {mpp} must be > 0"
        )
    fn = measure if measure is not None else _default_measure()
    columns = fn(labels, rgb, mpp)
    label_ids = np.asarray(columns["label"], np.int64)
    cx = np.asarray(columns["centroid_x"], np.float64)
    cy = np.asarray(columns["centroid_y"], np.float64)
    own = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    label_ids = label_ids[own]
    slices = ndimage.find_objects(labels)
    h, w = labels.shape
    boxes = np.array(
        [
            (s[1].start, s[0].start, s[1].stop, s[0].stop)
            if (s := slices[lab - 1])
            else (0, 0, 0, 0)
            for lab in label_ids
        ],
        dtype=np.float64,
    ).reshape(-1, 4)
    touches = (boxes[:, 0] <= 0) | (boxes[:, 1] <= 0) | (boxes[:, 2] >= w) | (boxes[:, 3] >= h)
    truncated = int(touches.sum())
    if truncated:
        logger.warning(
            "%d nuclei in the core of the tile at level-0 (%.0f, %.0f) touch its outer border: "
            "the halo is smaller than the largest nucleus; raise the tile overlap",
            truncated,
            *l0_origin,
        )
    coords, offsets = trace_nuclei(
        labels, label_ids, slices, simplify_tolerance_px=simplify_tolerance_px
    )
    ox, oy = l0_origin
    coords *= l0_per_px
    coords += (ox, oy)
    return NucleusTable(
        centroid_x=ox + (cx[own] + 0.5) * l0_per_px,
        centroid_y=oy + (cy[own] + 0.5) * l0_per_px,
        bbox_x0=ox + boxes[:, 0] * l0_per_px,
        bbox_y0=oy + boxes[:, 1] * l0_per_px,
        bbox_x1=ox + boxes[:, 2] * l0_per_px,
        bbox_y1=oy + boxes[:, 3] * l0_per_px,
        coords=coords,
        offsets=offsets,
        measurements={
            k: np.asarray(v, np.float64)[own] for k, v in columns.items() if k not in GEOMETRY_KEYS
        },
        truncated=truncated,
    )
