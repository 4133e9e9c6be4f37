"""Seam-free nucleus stitching: per-tile core ownership, pixel-edge outlines, level-0 polygons.

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

Outlines. A nucleus outline runs along its pixels' edges (vertices on the integer lattice), so
the level-0 polygon is the label's pixels scaled by ``l0_per_px``: its area is the pixel count
times ``l0_per_px**2`` and, rasterised with the pixel-centre rule (QuPath's), it covers exactly
the level-0 pixels that nearest-neighbour upsampling of the label map would give (at integer
scales). Tracing contours through pixel centres instead shrinks every nucleus by half a model
pixel, a large loss of overlap for small nuclei.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Final, TypeAlias, cast

import numpy as np
import numpy.typing as npt
import shapely
from scipy import ndimage

from slidestream.errors import ConfigError

from ._table import GEOMETRY_KEYS, NucleusTable, invalid_outlines

__all__ = [
    "MeasureFn",
    "clip_to_bounds",
    "extract_tile_nuclei",
    "pixel_edge_rings",
    "trace_nuclei",
]

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


_STEP: Final = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.int64)
"""Unit step ``(dx, dy)`` of a crack direction: 0 right, 1 down, 2 left, 3 up (y points down)."""

_TURNS: Final = (1, 0, 3)
"""Successor preference at a lattice point: right turn, straight on, left turn (never back)."""


def _crack_edges(
    labels: npt.NDArray[np.integer[Any]], label_ids: npt.NDArray[np.integer[Any]]
) -> tuple[npt.NDArray[np.int64], ...]:
    """Every unit pixel edge between a traced label and anything else, directed clockwise.

    Returns ``(obj, x, y, d)``, each shape (m,): the index into ``label_ids`` of the label the
    edge belongs to, the start lattice point ``(x, y)`` in padded tile px (pixel ``(c, r)`` of
    ``labels`` covers ``[c + 1, c + 2) x [r + 1, r + 2)``) and the direction (see ``_STEP``).
    The label lies on the right of its edges (y down), so outer rings have a positive shoelace
    area and holes a negative one.
    """
    ids = np.asarray(label_ids, np.int64)
    lut = np.full(max(int(labels.max(initial=0)), int(ids.max(initial=0))) + 1, -1, np.int64)
    lut[ids] = np.arange(ids.size)
    h, w = labels.shape
    k = np.full((h + 2, w + 2), -1, np.int64)
    k[1:-1, 1:-1] = lut[labels]
    parts: list[tuple[npt.NDArray[np.int64], ...]] = []
    a, b = k[:, :-1], k[:, 1:]  # left | right neighbours, edge at lattice x = c + 1
    diff = a != b
    r, c = np.nonzero(diff & (a >= 0))  # a's right edge, downwards
    parts.append((a[r, c], c + 1, r, np.full(r.size, 1, np.int64)))
    r, c = np.nonzero(diff & (b >= 0))  # b's left edge, upwards
    parts.append((b[r, c], c + 1, r + 1, np.full(r.size, 3, np.int64)))
    a, b = k[:-1, :], k[1:, :]  # upper / lower neighbours, edge at lattice y = r + 1
    diff = a != b
    r, c = np.nonzero(diff & (a >= 0))  # a's bottom edge, leftwards
    parts.append((a[r, c], c + 1, r + 1, np.full(r.size, 2, np.int64)))
    r, c = np.nonzero(diff & (b >= 0))  # b's top edge, rightwards
    parts.append((b[r, c], c, r + 1, np.full(r.size, 0, np.int64)))
    return tuple(np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(4))


def _link_edges(
    obj: npt.NDArray[np.int64],
    x: npt.NDArray[np.int64],
    y: npt.NDArray[np.int64],
    d: npt.NDArray[np.int64],
    lattice_shape: tuple[int, int],
) -> npt.NDArray[np.int64]:
    """Successor of every edge along its label's outline (a permutation of ``arange(m)``).

    Where two pixels of a label touch only at a corner, the outline turns right, so each ring
    encloses a 4-connected set of pixels and the two pixels get separate rings.
    """
    m = obj.size
    lh, lw = lattice_shape
    key = ((obj * lh + y) * lw + x) * 4 + d
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    base = ((obj * lh + y + _STEP[d, 1]) * lw + x + _STEP[d, 0]) * 4
    nxt = np.full(m, -1, np.int64)
    for turn in _TURNS:
        want = base + (d + turn) % 4
        pos = np.minimum(np.searchsorted(sorted_key, want), m - 1)
        hit = (sorted_key[pos] == want) & (nxt < 0)
        nxt[hit] = order[pos[hit]]
    return nxt


def _order_cycles(
    nxt: npt.NDArray[np.int64], max_len: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Cycles of the permutation ``nxt`` by pointer jumping: ``(head, to_tail)`` per element.

    ``head`` is the smallest element of the element's cycle (the ring's first edge) and
    ``to_tail`` the number of steps from the element to the last edge before the head, so
    sorting a cycle by decreasing ``to_tail`` walks it from its head. ``max_len`` bounds the
    cycle lengths.
    """
    m = nxt.size
    head = np.arange(m, dtype=np.int64)
    jump = nxt.copy()
    reach = 1
    while reach < max_len:
        head = np.minimum(head, head[jump])
        jump = jump[jump]
        reach *= 2
    is_tail = nxt == head
    jump = np.where(is_tail, np.arange(m, dtype=np.int64), nxt)
    to_tail = (~is_tail).astype(np.int64)
    reach = 1
    while reach < max_len:
        to_tail = to_tail + to_tail[jump]
        jump = jump[jump]
        reach *= 2
    return head, to_tail


def pixel_edge_rings(
    labels: npt.NDArray[np.integer[Any]], label_ids: npt.NDArray[np.integer[Any]]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Trace the exact pixel-edge outline of each label (the crack boundary of its pixels).

    The outline of a label is the outer ring of its largest 4-connected part: rasterised with
    the pixel-centre rule it gives back exactly those pixels, and its area is their count.
    Holes are dropped (filled). Corners where the outline turns are kept, collinear lattice
    points are not. Two pixels touching only at a corner are separate parts; a part whose
    outline pinches itself at a corner gives a self-touching ring (see ``trace_nuclei``).

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Instance labels, 0 = background.
    label_ids : ndarray of int, shape (n,)
        Distinct labels to trace, each present in ``labels``, in output order.

    Returns
    -------
    vertices : ndarray of int64, shape (M, 2)
        Open rings (first vertex not repeated), ``(x, y)`` lattice points in tile px: pixel
        ``(c, r)`` covers ``[c, c + 1) x [r, r + 1)``. Rings run clockwise on screen (y down),
        positive shoelace area.
    offsets : ndarray of int64, shape (n + 1,)
        Ring ``i`` is ``vertices[offsets[i]:offsets[i + 1]]``.

    Raises
    ------
    ConfigError
        If a label of ``label_ids`` is not in ``labels``.

    Examples
    --------
    >>> labels = np.zeros((4, 5), np.int32)
    >>> labels[1:3, 1:4] = 7
    >>> labels[2, 3] = 0
    >>> vertices, offsets = pixel_edge_rings(labels, np.array([7]))
    >>> vertices.tolist()
    [[4, 1], [4, 2], [3, 2], [3, 3], [1, 3], [1, 1]]
    """
    n = len(label_ids)
    if n == 0:
        return np.zeros((0, 2), np.int64), np.zeros(1, np.int64)
    h, w = labels.shape
    obj, x, y, d = _crack_edges(labels, label_ids)
    per_label = np.bincount(obj, minlength=n)
    if (per_label == 0).any():
        missing = np.asarray(label_ids)[per_label == 0][:5].tolist()
        raise ConfigError(f"trace_nuclei: labels {missing} are not in the label image")
    nxt = _link_edges(obj, x, y, d, (h + 3, w + 3))
    head, to_tail = _order_cycles(nxt, int(per_label.max()))
    # shoelace area (x2) of every ring, from its edges; keep the largest outer ring per label
    twice_area = np.bincount(
        head, weights=x * (y + _STEP[d, 1]) - (x + _STEP[d, 0]) * y, minlength=obj.size
    )
    heads = np.flatnonzero(head == np.arange(obj.size))
    by_label = np.lexsort((heads, -twice_area[heads], obj[heads]))
    first = np.ones(heads.size, bool)
    first[1:] = obj[heads[by_label[1:]]] != obj[heads[by_label[:-1]]]
    best = np.empty(n, np.int64)
    best[obj[heads[by_label[first]]]] = heads[by_label[first]]
    edge = np.flatnonzero(best[obj] == head)
    edge = edge[np.lexsort((-to_tail[edge], obj[edge]))]  # by label, each ring from its head
    owner, d_ring = obj[edge], d[edge]
    counts = np.bincount(owner, minlength=n)
    ends = np.cumsum(counts)
    prev = np.arange(-1, edge.size - 1)
    prev[ends - counts] = ends - 1  # a ring's first edge follows its last
    corner = d_ring[prev] != d_ring  # the outline turns at the edge's start point
    vertices = np.stack([x[edge[corner]], y[edge[corner]]], axis=1) - 1  # padded -> tile px
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(owner[corner], minlength=n), out=offsets[1:])
    return vertices, offsets


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
    *,
    simplify_tolerance_px: float = 0.0,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Trace one valid, closed outline per label, in continuous tile px.

    The outline follows the pixel edges (:func:`pixel_edge_rings`): rasterised with the
    pixel-centre rule (QuPath's, at any integer level-0 scale) it covers exactly the label's
    pixels, and its area is their count (holes filled; the largest 4-connected part). A ring
    that pinches itself at a pixel corner is repaired with ``shapely.make_valid`` (largest
    polygon, holes dropped). With ``simplify_tolerance_px > 0`` the outline is then simplified
    (Douglas-Peucker) within that tolerance, which trades exactness for fewer vertices.

    Geometry is computed in each nucleus's own frame (its bounding box's corner at the
    origin), so a nucleus gets the same outline whichever tile traces it.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Instance labels, 0 = background.
    label_ids : ndarray of int, shape (n,)
        Distinct labels to trace, each present in ``labels``, in output order.
    simplify_tolerance_px : float
        Douglas-Peucker tolerance in tile px; 0 keeps the exact pixel-edge outline.

    Returns
    -------
    coords : ndarray of float64, shape (M, 2)
        Closed rings (first position repeated), ``(x, y)`` in continuous tile px (pixel
        ``(c, r)`` covers ``[c, c + 1) x [r, r + 1)``).
    offsets : ndarray of int64, shape (n + 1,)
        Ring ``i`` is ``coords[offsets[i]:offsets[i + 1]]``.

    Raises
    ------
    ConfigError
        If a label of ``label_ids`` is not in ``labels``.
    """
    n = len(label_ids)
    if n == 0:
        return np.zeros((0, 2), np.float64), np.zeros(1, np.int64)
    vertices, offsets = pixel_edge_rings(labels, label_ids)
    counts = np.diff(offsets)
    owner = np.repeat(np.arange(n), counts)
    origins = np.minimum.reduceat(vertices, offsets[:-1], axis=0)  # each ring has >= 4 vertices
    local = (vertices - origins[owner]).astype(np.float64)
    geoms = shapely.polygons(shapely.linearrings(local, indices=owner))
    bad = np.flatnonzero(~shapely.is_valid(geoms))
    if bad.size:
        geoms[bad] = _largest_polygons(shapely.make_valid(geoms[bad]))
    if simplify_tolerance_px > 0:
        simple = shapely.simplify(geoms, simplify_tolerance_px, preserve_topology=False)
        redo = np.flatnonzero(~shapely.is_valid(simple) | shapely.is_empty(simple))
        if redo.size:
            simple[redo] = shapely.simplify(
                geoms[redo], simplify_tolerance_px, preserve_topology=True
            )
        geoms = _largest_polygons(simple)
    coords, index = shapely.get_coordinates(shapely.get_exterior_ring(geoms), return_index=True)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(index, minlength=n), out=offsets[1:])
    coords += origins[index]  # nucleus frame -> continuous tile px (edges at integers)
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
    simplify_tolerance_px: float = 0.0,
    l0_bounds: tuple[float, float] | None = None,
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
        Outline simplification tolerance in tile px; 0 (default) keeps the exact pixel-edge
        outline, whose area is the nucleus's pixel count.
    l0_bounds : (width, height), optional
        The slide's level-0 size: outlines are clipped to ``[0, width] x [0, height]`` (a tile
        at the slide's edge is padded, and an upsampled watershed can reach half a pixel past
        it) and nuclei whose centroid lies outside are dropped. Measurements stay those of the
        nucleus's pixels.

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
    coords, offsets = trace_nuclei(labels, label_ids, simplify_tolerance_px=simplify_tolerance_px)
    ox, oy = l0_origin
    coords *= l0_per_px
    coords += (ox, oy)
    table = NucleusTable(
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
    if l0_bounds is not None:
        table = clip_to_bounds(table, l0_bounds)
    return _validated(table)


def _validated(table: NucleusTable) -> NucleusTable:
    """``table`` with :attr:`NucleusTable.outlines_valid` set: outlines that rounding to 0.01 px
    would make invalid are repaired (largest valid part), or dropped if that fails (logged)."""
    bad = np.flatnonzero(invalid_outlines(table.coords, table.offsets))
    if bad.size == 0:
        return replace(table, outlines_valid=True)
    polygons = table.polygons()
    fixed = _largest_polygons(shapely.set_precision(shapely.make_valid(polygons[bad]), 0.01))
    polygons[bad] = fixed
    coords, index = shapely.get_coordinates(shapely.get_exterior_ring(polygons), return_index=True)
    offsets = np.zeros(len(table) + 1, np.int64)
    np.cumsum(np.bincount(index, minlength=len(table)), out=offsets[1:])
    keep = ~invalid_outlines(coords, offsets) & (np.diff(offsets) >= 4)
    if not keep.all():
        logger.warning("dropped %d nuclei whose outline could not be repaired", int((~keep).sum()))
    repaired = replace(table, coords=np.ascontiguousarray(coords, np.float64), offsets=offsets)
    idx = np.flatnonzero(keep)
    if idx.size < len(table):
        polygons = repaired.polygons()[idx]
        coords, index = shapely.get_coordinates(
            shapely.get_exterior_ring(polygons), return_index=True
        )
        offsets = np.zeros(idx.size + 1, np.int64)
        np.cumsum(np.bincount(index, minlength=idx.size), out=offsets[1:])
        repaired = NucleusTable(
            centroid_x=table.centroid_x[idx],
            centroid_y=table.centroid_y[idx],
            bbox_x0=table.bbox_x0[idx],
            bbox_y0=table.bbox_y0[idx],
            bbox_x1=table.bbox_x1[idx],
            bbox_y1=table.bbox_y1[idx],
            coords=np.ascontiguousarray(coords, np.float64),
            offsets=offsets,
            measurements={k: v[idx] for k, v in table.measurements.items()},
            classes=None if table.classes is None else table.classes[idx],
            truncated=table.truncated,
        )
    return replace(repaired, outlines_valid=True)


def clip_to_bounds(table: NucleusTable, l0_bounds: tuple[float, float]) -> NucleusTable:
    """Clip every outline of ``table`` to the slide ``[0, width] x [0, height]`` (level-0 px).

    Nuclei whose centroid lies outside the slide are dropped; an outline crossing the edge is
    intersected with the slide (its largest polygon part kept) and its box shrunk to it; nuclei
    inside (nearly all) are untouched. Measurements are kept (they describe the pixels).

    Parameters
    ----------
    table : NucleusTable
        Nuclei in level-0 px.
    l0_bounds : (width, height)
        The slide's level-0 size in px.

    Returns
    -------
    NucleusTable
        ``table`` itself when nothing crosses the edge, else the clipped copy.
    """
    width, height = l0_bounds
    inside = (
        (table.centroid_x >= 0)
        & (table.centroid_x < width)
        & (table.centroid_y >= 0)
        & (table.centroid_y < height)
    )
    past_x = (table.bbox_x0 < 0) | (table.bbox_x1 > width)
    crossing = inside & (past_x | (table.bbox_y0 < 0) | (table.bbox_y1 > height))
    if inside.all() and not crossing.any():
        return table
    polygons = table.polygons()
    box = shapely.box(0.0, 0.0, width, height)
    bbox = np.stack([table.bbox_x0, table.bbox_y0, table.bbox_x1, table.bbox_y1], axis=1)
    idx = np.flatnonzero(crossing)
    if idx.size:
        clipped = _largest_polygons(shapely.intersection(polygons[idx], box))
        polygons[idx] = clipped
        bbox[idx] = shapely.bounds(clipped).reshape(-1, 4)
        inside[idx[shapely.is_empty(clipped) | ~(shapely.area(clipped) > 0)]] = False
    keep = np.flatnonzero(inside)
    polygons, bbox = polygons[keep], bbox[keep]
    coords, index = shapely.get_coordinates(shapely.get_exterior_ring(polygons), return_index=True)
    offsets = np.zeros(keep.size + 1, np.int64)
    np.cumsum(np.bincount(index, minlength=keep.size), out=offsets[1:])
    logger.debug(
        "clipped %d nuclei to the slide, dropped %d outside it", idx.size, len(table) - keep.size
    )
    return NucleusTable(
        centroid_x=table.centroid_x[keep],
        centroid_y=table.centroid_y[keep],
        bbox_x0=bbox[:, 0].copy(),
        bbox_y0=bbox[:, 1].copy(),
        bbox_x1=bbox[:, 2].copy(),
        bbox_y1=bbox[:, 3].copy(),
        coords=np.ascontiguousarray(coords, dtype=np.float64),
        offsets=offsets,
        measurements={k: v[keep] for k, v in table.measurements.items()},
        classes=None if table.classes is None else table.classes[keep],
        truncated=table.truncated,
    )
