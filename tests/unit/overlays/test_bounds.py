"""Regression (issue 19): no outline outside the slide, no invalid outline written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely

from slidestream.errors import GeometryError
from slidestream.overlays import NucleusTable, extract_tile_nuclei, write_nuclei_geojson
from slidestream.overlays._geojson import check_nuclei_geometry


def _edge_tile(measure: object) -> tuple[NucleusTable, NucleusTable]:
    """A 64 px tile whose right part lies past the slide's edge at level-0 x = 4000, with a
    nucleus straddling the edge (as a 2x watershed on padded maps can make)."""
    labels = np.zeros((64, 64), np.int32)
    yy, xx = np.mgrid[:64, :64]
    labels[np.hypot(yy - 32, xx - 30) <= 6] = 1  # straddles x = 32 px = level-0 4000
    labels[np.hypot(yy - 12, xx - 12) <= 4] = 2  # inside
    labels[np.hypot(yy - 50, xx - 50) <= 4] = 3  # entirely past the edge
    rgb = np.full((64, 64, 3), 200, np.uint8)
    kwargs = {
        "core": (0, 0, 64, 64),
        "l0_origin": (3936.0, 0.0),
        "l0_per_px": 2.0,
        "mpp": 0.5,
        "measure": measure,
    }
    raw = extract_tile_nuclei(labels, rgb, **kwargs)  # type: ignore[arg-type]
    clipped = extract_tile_nuclei(labels, rgb, l0_bounds=(4000.0, 3000.0), **kwargs)  # type: ignore[arg-type]
    return raw, clipped


def test_outlines_are_clipped_to_the_slide(measure: object) -> None:
    raw, clipped = _edge_tile(measure)
    assert raw.coords[:, 0].max() > 4000  # the bug: a vertex past the slide
    assert len(raw) == 3 and len(clipped) == 2  # the nucleus outside is dropped
    assert clipped.coords[:, 0].max() <= 4000.0 and clipped.bbox_x1.max() <= 4000.0
    polys = clipped.polygons()
    assert shapely.is_valid(polys).all() and (shapely.area(polys) > 0).all()
    assert shapely.box(0, 0, 4000, 3000).covers(shapely.MultiPolygon(list(polys)))
    # the nucleus inside is untouched
    i, j = int(np.argmin(clipped.centroid_x)), int(np.argmin(raw.centroid_x))
    np.testing.assert_array_equal(
        clipped.coords[clipped.offsets[i] : clipped.offsets[i + 1]],
        raw.coords[raw.offsets[j] : raw.offsets[j + 1]],
    )


def test_an_invalid_or_out_of_bounds_outline_is_never_written(
    measure: object, tmp_path: Path
) -> None:
    raw, clipped = _edge_tile(measure)
    out = tmp_path / "n.geojson"
    with pytest.raises(GeometryError, match="outside the slide"):
        write_nuclei_geojson(out, [raw], id_namespace="x", l0_bounds=(4000.0, 3000.0))
    assert not out.exists() and not list(tmp_path.iterdir())
    assert write_nuclei_geojson(out, [clipped], id_namespace="x", l0_bounds=(4000.0, 3000.0)) == 2
    # a self-intersecting ring ("bow tie") is refused as well
    bow = np.array([[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]], np.float64)
    table = NucleusTable(
        centroid_x=np.array([5.0]), centroid_y=np.array([5.0]),
        bbox_x0=np.array([0.0]), bbox_y0=np.array([0.0]),
        bbox_x1=np.array([10.0]), bbox_y1=np.array([10.0]),
        coords=bow, offsets=np.array([0, 5]),
    )  # fmt: skip
    with pytest.raises(GeometryError, match="invalid"):
        check_nuclei_geometry(table)
    check_nuclei_geometry(table, as_points=True)  # a point is fine
