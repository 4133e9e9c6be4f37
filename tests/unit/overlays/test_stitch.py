"""Seam-free stitching: every nucleus reported exactly once, whatever the tile size."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import shapely
from skimage.segmentation import relabel_sequential

from slidestream.errors import ConfigError
from slidestream.overlays import MeasureFn, NucleusTable, extract_tile_nuclei

L0_ORIGIN = (1000.0, 500.0)  # level-0 px of the label image's top-left corner
L0_PER_PX = 2.0  # model px -> level-0 px
MPP = 0.5


def tile_and_extract(
    labels: npt.NDArray[np.int32], stride: int, halo: int, measure: MeasureFn
) -> NucleusTable:
    """Cut ``labels`` into overlapping tiles (zero padded), extract per tile, concatenate."""
    h, w = labels.shape
    size = stride + 2 * halo
    padded = np.pad(labels, ((halo, size), (halo, size)))
    rgb = np.zeros((size, size, 3), np.uint8)
    tables = []
    for row in range(-(-h // stride)):
        for col in range(-(-w // stride)):
            t_x, t_y = col * stride - halo, row * stride - halo
            tile = padded[t_y + halo : t_y + halo + size, t_x + halo : t_x + halo + size]
            tile = relabel_sequential(tile)[0].astype(np.int32)  # a model numbers from 1 per tile
            tables.append(
                extract_tile_nuclei(
                    tile,
                    rgb,
                    core=(halo, halo, halo + stride, halo + stride),
                    l0_origin=(L0_ORIGIN[0] + t_x * L0_PER_PX, L0_ORIGIN[1] + t_y * L0_PER_PX),
                    l0_per_px=L0_PER_PX,
                    mpp=MPP,
                    measure=measure,
                )
            )
    return NucleusTable.concat(tables)


def whole(labels: npt.NDArray[np.int32], measure: MeasureFn) -> NucleusTable:
    h, w = labels.shape
    return extract_tile_nuclei(
        labels,
        np.zeros((h, w, 3), np.uint8),
        core=(0, 0, w, h),
        l0_origin=L0_ORIGIN,
        l0_per_px=L0_PER_PX,
        mpp=MPP,
        measure=measure,
    )


def by_position(t: NucleusTable) -> npt.NDArray[np.intp]:
    return np.lexsort((t.centroid_y.round(6), t.centroid_x.round(6)))


@pytest.fixture(scope="module")
def reference(slide_labels: npt.NDArray[np.int32], measure: MeasureFn) -> NucleusTable:
    return whole(slide_labels, measure)


@pytest.mark.parametrize("stride", [64, 100])
def test_each_nucleus_reported_once_with_its_area(
    slide_labels: npt.NDArray[np.int32], reference: NucleusTable, stride: int, measure: MeasureFn
) -> None:
    tiled = tile_and_extract(slide_labels, stride=stride, halo=20, measure=measure)
    assert len(tiled) == len(reference) == slide_labels.max()
    assert tiled.truncated == 0
    a, b = tiled, reference
    ia, ib = by_position(a), by_position(b)
    np.testing.assert_allclose(a.centroid_x[ia], b.centroid_x[ib], atol=1e-9)
    np.testing.assert_allclose(a.centroid_y[ia], b.centroid_y[ib], atol=1e-9)
    np.testing.assert_allclose(a.measurements["area_um2"][ia], b.measurements["area_um2"][ib])
    np.testing.assert_allclose(
        shapely.area(a.polygons()[ia]), shapely.area(b.polygons()[ib]), rtol=1e-9
    )
    for name in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"):
        np.testing.assert_allclose(getattr(a, name)[ia], getattr(b, name)[ib])


def test_nuclei_straddle_many_seams(slide_labels: npt.NDArray[np.int32]) -> None:
    """The fixture really tests seams: many nuclei cross tile borders at varied offsets."""
    stride = 64
    crossing = [
        np.unique(slide_labels[:, x - 1 : x + 1][slide_labels[:, x - 1 : x + 1] > 0]).size
        for x in range(stride, slide_labels.shape[1], stride)
    ]
    assert sum(crossing) >= 40


def test_polygons_valid_closed_level0(
    reference: NucleusTable, slide_labels: npt.NDArray[np.int32]
) -> None:
    polys = reference.polygons()
    assert shapely.is_valid(polys).all()
    starts, ends = reference.offsets[:-1], reference.offsets[1:] - 1
    np.testing.assert_array_equal(reference.coords[starts], reference.coords[ends])
    assert (np.diff(reference.offsets) >= 4).all()
    # level-0 frame: inside the image's level-0 extent, areas scale with l0_per_px²
    h, w = slide_labels.shape
    x, y = reference.coords.T
    assert x.min() >= L0_ORIGIN[0] and x.max() <= L0_ORIGIN[0] + w * L0_PER_PX
    assert y.min() >= L0_ORIGIN[1] and y.max() <= L0_ORIGIN[1] + h * L0_PER_PX
    pixel_area_l0 = reference.measurements["area_um2"] / MPP**2 * L0_PER_PX**2
    ratio = shapely.area(polys) / pixel_area_l0
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)
    assert ratio.min() > 0.8 and ratio.max() < 1.25
    # every centroid lies inside its own polygon
    pts = shapely.points(reference.centroids())
    assert shapely.contains(polys, pts).all()


def test_centroid_and_box_in_level0(measure: MeasureFn) -> None:
    labels = np.zeros((40, 40), np.int32)
    labels[10:14, 20:26] = 1  # 6 x 4 px rectangle, centre (22.5, 11.5) in index coords
    t = extract_tile_nuclei(
        labels, np.zeros((40, 40, 3), np.uint8), core=(0, 0, 40, 40),
        l0_origin=(-10.0, 100.0), l0_per_px=4.0, mpp=1.0, measure=measure,
    )  # fmt: skip
    assert len(t) == 1
    assert t.centroid_x[0] == pytest.approx(-10 + 23.0 * 4)
    assert t.centroid_y[0] == pytest.approx(100 + 12.0 * 4)
    assert (t.bbox_x0[0], t.bbox_y0[0], t.bbox_x1[0], t.bbox_y1[0]) == (70.0, 140.0, 94.0, 156.0)
    poly = t.polygons()[0]
    assert poly.bounds == (70.0, 140.0, 94.0, 156.0)
    assert poly.area == pytest.approx(24 * 16)


def test_small_halo_counts_truncated(
    slide_labels: npt.NDArray[np.int32], measure: MeasureFn
) -> None:
    tiled = tile_and_extract(slide_labels, stride=64, halo=2, measure=measure)
    assert tiled.truncated > 0


def test_core_ownership_excludes_outside_centroids(measure: MeasureFn) -> None:
    labels = np.zeros((30, 30), np.int32)
    labels[2:6, 2:6] = 1  # centroid (3.5, 3.5): outside core
    labels[12:16, 12:16] = 2  # inside
    labels[0:4, 14:18] = 3  # touches the border, centroid outside the core: dropped silently
    t = extract_tile_nuclei(
        labels, np.zeros((30, 30, 3), np.uint8), core=(8, 8, 22, 22),
        l0_origin=(0.0, 0.0), l0_per_px=1.0, mpp=0.5, measure=measure,
    )  # fmt: skip
    assert len(t) == 1 and t.truncated == 0
    assert t.centroid_x[0] == pytest.approx(14.0)


def test_degenerate_and_invalid_shapes_become_valid_polygons(measure: MeasureFn) -> None:
    labels = np.zeros((30, 30), np.int32)
    labels[5, 5] = 1  # single pixel
    labels[10, 3:9] = 2  # one-pixel line
    labels[15:20, 15:20] = 3
    labels[20, 20] = 3  # diagonal tail: bow-tie contour
    labels[22:25, 5:8] = 4
    labels[22:25, 7] = 0
    labels[23, 7] = 4
    t = extract_tile_nuclei(
        labels, np.zeros((30, 30, 3), np.uint8), core=(0, 0, 30, 30),
        l0_origin=(0.0, 0.0), l0_per_px=1.0, mpp=0.5, measure=measure,
    )  # fmt: skip
    polys = t.polygons()
    assert len(t) == 4
    assert shapely.is_valid(polys).all() and (shapely.area(polys) > 0).all()
    assert shapely.area(polys[0]) == pytest.approx(1.0)
    assert shapely.area(polys[1]) == pytest.approx(6.0)


def test_table_concat_slice_pickle(reference: NucleusTable) -> None:
    a, b = reference.slice(0, 10), reference.slice(10, len(reference))
    both = NucleusTable.concat([a, NucleusTable.empty(reference.measurement_names), b])
    np.testing.assert_array_equal(both.coords, reference.coords)
    np.testing.assert_array_equal(both.offsets, reference.offsets)
    classed = both.with_classes(np.full(len(both), "Tumor"))
    back = pickle.loads(pickle.dumps(classed))
    assert len(back) == len(reference) and (back.classes == "Tumor").all()
    mixed = NucleusTable.concat([a.with_classes(np.full(10, "Stroma")), b])
    assert mixed.classes is not None and mixed.classes[0] == "Stroma"
    assert mixed.classes[-1] == "Unclassified"
    with pytest.raises(ConfigError):
        reference.with_classes(["x"])


def test_shape_mismatch_is_config_error(measure: MeasureFn) -> None:
    with pytest.raises(ConfigError):
        extract_tile_nuclei(
            np.zeros((4, 4), np.int32), np.zeros((5, 4, 3), np.uint8), core=(0, 0, 4, 4),
            l0_origin=(0.0, 0.0), l0_per_px=1.0, mpp=0.5, measure=measure,
        )  # fmt: skip


def test_many_offsets_random_images(measure: MeasureFn, make_labels: Any) -> None:
    """Other layouts and seeds: counts agree between two tile sizes and the whole image."""
    for seed in (2, 3):
        labels = make_labels((200, 260), 300, seed=seed, max_radius=7)
        n = len(whole(labels, measure))
        assert len(tile_and_extract(labels, stride=48, halo=16, measure=measure)) == n
        assert len(tile_and_extract(labels, stride=80, halo=16, measure=measure)) == n
