"""Nucleus outlines follow pixel edges: level-0 polygons give back exactly the label's pixels."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import shapely

from slidestream.overlays import MeasureFn, NucleusTable, extract_tile_nuclei
from slidestream.overlays._stitch import pixel_edge_rings, trace_nuclei


def rasterise_centres(table: NucleusTable, shape: tuple[int, int]) -> npt.NDArray[np.int64]:
    """Label image (1..n in table order) of level-0 polygons by QuPath's pixel-centre rule.

    Level-0 pixel ``(c, r)`` covers ``[c, c + 1) x [r, r + 1)`` and belongs to a polygon when
    ``(c + 0.5, r + 0.5)`` lies strictly inside (``shapely.contains_xy``; no ties occur on
    pixel-edge outlines at integer scales).
    """
    out = np.zeros(shape, np.int64)
    for n, poly in enumerate(table.polygons(), start=1):
        x0, y0, x1, y1 = (int(v) for v in np.round(shapely.bounds(poly)))
        yy, xx = np.mgrid[max(y0, 0) : min(y1, shape[0]), max(x0, 0) : min(x1, shape[1])]
        inside = shapely.contains_xy(poly, xx + 0.5, yy + 0.5)
        out[yy[inside], xx[inside]] = n
    return out


def nearest_upsample(labels: npt.NDArray[np.int32], factor: int) -> npt.NDArray[np.int32]:
    return np.repeat(np.repeat(labels, factor, axis=0), factor, axis=1)


@pytest.mark.parametrize("l0_per_px", [1, 2, 3])
def test_polygons_rasterise_back_to_the_label_pixels(
    measure: MeasureFn, make_labels: Any, l0_per_px: int
) -> None:
    """Labels -> level-0 polygons -> pixel-centre raster == nearest-upsampled labels, exactly."""
    labels = make_labels((90, 120), 120, seed=5, max_radius=8)
    labels[40:43, 10:25] = labels.max() + 1  # a thin bar, straight edges and square corners
    h, w = labels.shape
    table = extract_tile_nuclei(
        labels, np.zeros((h, w, 3), np.uint8), core=(0, 0, w, h),
        l0_origin=(0.0, 0.0), l0_per_px=float(l0_per_px), mpp=0.5, measure=measure,
    )  # fmt: skip
    ids = np.asarray(measure(labels, np.zeros((h, w, 3), np.uint8), 0.5)["label"])
    assert len(table) == ids.size > 30
    raster = rasterise_centres(table, (h * l0_per_px, w * l0_per_px))
    expected = nearest_upsample(labels, l0_per_px)
    # raster ids are table positions; map them back to the labels they came from
    back = np.concatenate([[0], ids])[raster]
    np.testing.assert_array_equal(back, expected)
    # polygon area in level-0 px² == pixel count x l0_per_px², nucleus by nucleus
    pixel_count = np.bincount(labels.ravel(), minlength=int(ids.max()) + 1)[ids]
    np.testing.assert_array_equal(shapely.area(table.polygons()), pixel_count * l0_per_px**2)
    np.testing.assert_allclose(
        table.measurements["area_um2"] / 0.5**2, shapely.area(table.polygons()) / l0_per_px**2
    )


def test_non_integer_scale_matches_nearest_resampling(measure: MeasureFn, make_labels: Any) -> None:
    """At a non-integer scale every nucleus still overlaps its resampled pixels (IoU > 0.97)."""
    labels = make_labels((80, 80), 60, seed=9, max_radius=9)
    h, w = labels.shape
    s = 1.9786  # 0.5 µm/px model on a 0.2527 µm/px slide
    table = extract_tile_nuclei(
        labels, np.zeros((h, w, 3), np.uint8), core=(0, 0, w, h),
        l0_origin=(0.0, 0.0), l0_per_px=s, mpp=0.5, measure=measure,
    )  # fmt: skip
    l0_shape = (int(h * s), int(w * s))
    raster = rasterise_centres(table, l0_shape)
    cy, cx = ((np.arange(n) + 0.5) / s for n in l0_shape)  # level-0 pixel centres in model px
    resampled = labels[cy.astype(int)[:, None], cx.astype(int)[None, :]]
    ids = np.asarray(measure(labels, np.zeros((h, w, 3), np.uint8), 0.5)["label"])
    for n, lab in enumerate(ids, start=1):
        a, b = raster == n, resampled == lab
        assert (a & b).sum() / (a | b).sum() > 0.97


@pytest.mark.parametrize("tolerance", [0.0, 0.5])
def test_outline_does_not_depend_on_the_tile(
    measure: MeasureFn, make_labels: Any, tolerance: float
) -> None:
    """The same nucleus traced at two tile offsets gives the same level-0 ring, vertex by vertex."""
    labels = make_labels((60, 60), 30, seed=4)
    shifted = np.pad(labels, ((13, 0), (7, 0)))
    kw: dict[str, Any] = {
        "l0_per_px": 2.0, "mpp": 0.5, "measure": measure, "simplify_tolerance_px": tolerance
    }  # fmt: skip
    a = extract_tile_nuclei(
        labels, np.zeros((60, 60, 3), np.uint8), core=(0, 0, 60, 60), l0_origin=(100.0, 40.0), **kw
    )
    b = extract_tile_nuclei(
        shifted, np.zeros((73, 67, 3), np.uint8), core=(0, 0, 67, 73), l0_origin=(86.0, 14.0), **kw
    )
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.coords, b.coords)


def test_pixel_edge_rings_special_shapes() -> None:
    labels = np.zeros((12, 14), np.int32)
    labels[1:4, 1:4] = 1
    labels[2, 2] = 0  # a hole: filled
    labels[6, 1:5] = 2  # a one-pixel bar
    labels[1:3, 7:9] = 3
    labels[3, 9] = 3  # touches the block only at a corner: the smaller part is dropped
    # a loop whose ends touch at a corner: its outer ring pinches itself at lattice (10, 8)
    for r, c in [(7, 9), (6, 9), (6, 10), (6, 11), (7, 11), (8, 11), (8, 10)]:
        labels[r, c] = 4
    labels[11, 13] = 5  # a single pixel in the image corner
    ids = np.array([5, 4, 3, 2, 1])
    vertices, offsets = pixel_edge_rings(labels, ids)
    rings = [vertices[a:b] for a, b in itertools.pairwise(offsets)]
    assert rings[0].tolist() == [[14, 11], [14, 12], [13, 12], [13, 11]]
    areas = [shapely.Polygon(r).area for r in rings]
    assert areas == [1.0, 7.0, 4.0, 4.0, 9.0]
    assert shapely.Polygon(rings[3]).is_valid and shapely.Polygon(rings[4]).is_valid
    assert not shapely.Polygon(rings[1]).is_valid  # the pinched loop: trace_nuclei repairs it
    coords, offs = trace_nuclei(labels, ids)
    polys = shapely.polygons(
        shapely.linearrings(coords, indices=np.repeat(np.arange(5), np.diff(offs)))
    )
    assert shapely.is_valid(polys).all()
    np.testing.assert_array_equal(shapely.area(polys), [1.0, 8.0, 4.0, 4.0, 9.0])  # holes filled
    np.testing.assert_array_equal(coords[offs[:-1]], coords[offs[1:] - 1])  # closed rings


def test_simplified_outlines_stay_close(measure: MeasureFn, make_labels: Any) -> None:
    labels = make_labels((100, 100), 80, seed=6)
    h, w = labels.shape
    ids = np.asarray(measure(labels, np.zeros((h, w, 3), np.uint8), 0.5)["label"])
    coords, offsets = trace_nuclei(labels, ids, simplify_tolerance_px=0.5)
    polys = shapely.polygons(
        shapely.linearrings(coords, indices=np.repeat(np.arange(ids.size), np.diff(offsets)))
    )
    assert shapely.is_valid(polys).all()
    pixel_count = np.bincount(labels.ravel())[ids]
    ratio = shapely.area(polys) / pixel_count
    assert abs(float(np.mean(ratio)) - 1.0) < 0.02 and ratio.min() > 0.85


def test_missing_label_is_config_error() -> None:
    from slidestream.errors import ConfigError

    with pytest.raises(ConfigError, match="not in the label image"):
        trace_nuclei(np.ones((3, 3), np.int32), np.array([1, 2]))
