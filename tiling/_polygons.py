"""Binary mask -> shapely polygons in level-0 px (exact pixel outlines, then simplified)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import shapely
import shapely.affinity

__all__ = ["mask_to_multipolygon"]


def _runs(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """Horizontal runs of True as rows ``(m_y, m_x0, m_x1)`` (x1 exclusive)."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    diff = np.diff(padded, axis=1)
    starts_y, starts_x = np.nonzero(diff == 1)
    _, ends_x = np.nonzero(diff == -1)
    return np.stack([starts_y, starts_x, ends_x], axis=1).astype(np.int64)


def _merge_vertical(runs: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Merge identical runs on consecutive rows into rectangles ``(m_x0, m_y0, m_x1, m_y1)``."""
    rects: list[list[int]] = []
    open_by_span: dict[tuple[int, int], int] = {}
    for m_y, m_x0, m_x1 in runs.tolist():
        key = (m_x0, m_x1)
        idx = open_by_span.get(key)
        if idx is not None and rects[idx][3] == m_y:
            rects[idx][3] = m_y + 1
        else:
            open_by_span[key] = len(rects)
            rects.append([m_x0, m_y, m_x1, m_y + 1])
    return np.asarray(rects, dtype=np.int64).reshape(-1, 4)


def mask_to_multipolygon(
    mask: npt.NDArray[np.bool_],
    *,
    l0_per_m_px: float,
    l0_dimensions: tuple[int, int],
    simplify_m_px: float = 0.75,
) -> shapely.MultiPolygon:
    """Outline the True pixels of ``mask`` as a valid ``MultiPolygon`` in level-0 px.

    Parameters
    ----------
    mask
        bool ``(H, W)``; pixel ``(m_x, m_y)`` covers level-0
        ``[m_x * l0_per_m_px, (m_x + 1) * l0_per_m_px)`` (same for y).
    l0_per_m_px
        Level-0 px per mask px.
    l0_dimensions
        Level-0 ``(width, height)``; the outlines are clipped to this rectangle.
    simplify_m_px
        Douglas-Peucker tolerance in mask px (topology preserved); 0 = exact pixel outline.

    Returns
    -------
    shapely.MultiPolygon
        Holes kept; empty when the mask has no True pixel.
    """
    if not mask.any():
        return shapely.MultiPolygon()
    rects = _merge_vertical(_runs(mask))
    boxes = shapely.box(rects[:, 0], rects[:, 1], rects[:, 2], rects[:, 3])
    # Pixels touching only at a corner give self-touching rings: repair before simplifying.
    merged = _polygonal(shapely.coverage_union_all(boxes))
    if simplify_m_px > 0:
        merged = _polygonal(shapely.simplify(merged, simplify_m_px, preserve_topology=True))
    l0_w, l0_h = l0_dimensions
    scaled = shapely.affinity.scale(merged, l0_per_m_px, l0_per_m_px, origin=(0.0, 0.0))
    return _polygonal(shapely.clip_by_rect(scaled, 0.0, 0.0, float(l0_w), float(l0_h)))


def _polygonal(geom: shapely.Geometry) -> shapely.MultiPolygon:
    """The valid polygonal part of ``geom`` as a ``MultiPolygon`` (lines and points dropped)."""
    valid = shapely.make_valid(geom, method="structure", keep_collapsed=False)
    polygons: list[shapely.Polygon] = []
    stack = [valid]
    while stack:
        part = stack.pop()
        if isinstance(part, shapely.Polygon):
            if not part.is_empty and part.area > 0:
                polygons.append(part)
        elif isinstance(part, (shapely.MultiPolygon, shapely.GeometryCollection)):
            stack.extend(reversed(list(part.geoms)))
    return shapely.MultiPolygon(polygons)
