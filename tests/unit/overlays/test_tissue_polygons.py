"""Tissue class map -> polygons (holes kept, islands dropped) and class assignment."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import shapely

from slidestream.errors import ConfigError
from slidestream.overlays import (
    UNCLASSIFIED,
    assign_classes,
    class_map_to_polygons,
    class_map_to_raster,
    raster_to_polygons,
    tissue_class_regions,
)

CELL = 100.0  # level-0 px per grid cell
MPP = 0.5  # level-0 µm/px -> one cell = 50 µm, 2,500 µm²
ORIGIN = (1000.0, 2000.0)
NAMES = ["Tumor", "Stroma", "Necrosis"]


def grid() -> npt.NDArray[np.float32]:
    """40 x 60 cells: Tumor ring with a Stroma core, a lumen hole, a 1-cell Necrosis speck."""
    rng = np.random.default_rng(0)
    p = np.full((40, 60, 3), np.nan, np.float32)
    yy, xx = np.mgrid[:40, :60]
    tissue = ((yy - 20) / 18) ** 2 + ((xx - 30) / 27) ** 2 < 1
    p[tissue] = (0.8, 0.15, 0.05)
    p[tissue & ((yy - 20) ** 2 + (xx - 40) ** 2 < 36)] = (0.1, 0.85, 0.05)
    p[(yy - 20) ** 2 + (xx - 15) ** 2 < 16] = np.nan  # lumen (hole in tumour), 8 cells across
    p[10, 30] = (0.05, 0.05, 0.9)  # tiny island: 1 cell = 2,500 µm²
    p[tissue] += rng.uniform(0, 0.05, (int(tissue.sum()), 3)).astype(np.float32)
    return p


@pytest.fixture(scope="module")
def polys() -> dict[str, shapely.Geometry]:
    return class_map_to_polygons(
        grid(), l0_cell_size=(CELL, CELL), l0_origin=ORIGIN, class_names=NAMES, mpp=MPP,
        min_island_area_um2=10_000,
    )  # fmt: skip


def test_classes_holes_islands(polys: dict[str, shapely.Geometry]) -> None:
    assert set(polys) == {"Tumor", "Stroma"}  # the necrosis speck is absorbed
    tumor, stroma = polys["Tumor"], polys["Stroma"]
    assert tumor.is_valid and stroma.is_valid
    tumor_parts = shapely.get_parts(tumor)
    holes = sum(len(p.interiors) for p in tumor_parts)
    assert holes == 2  # the lumen and the stroma core
    lumen_centre = shapely.Point(ORIGIN[0] + 15.5 * CELL, ORIGIN[1] + 20.5 * CELL)
    assert not tumor.contains(lumen_centre) and not stroma.contains(lumen_centre)
    speck = shapely.Point(ORIGIN[0] + 30.5 * CELL, ORIGIN[1] + 10.5 * CELL)
    assert tumor.contains(speck)  # filled by its surroundings
    # level-0 frame and area in µm²: stroma disc radius 6 cells = 300 µm
    stroma_um2 = stroma.area * MPP**2
    assert stroma_um2 == pytest.approx(np.pi * 300**2, rel=0.1)
    assert stroma.centroid.x == pytest.approx(ORIGIN[0] + 40.5 * CELL, abs=CELL / 2)


def test_classes_do_not_overlap(polys: dict[str, shapely.Geometry]) -> None:
    union = shapely.union_all(list(polys.values()))
    assert union.area == pytest.approx(sum(p.area for p in polys.values()), rel=1e-6)


def test_islands_kept_when_above_threshold() -> None:
    polys = class_map_to_polygons(
        grid(), l0_cell_size=(CELL, CELL), l0_origin=ORIGIN, class_names=NAMES, mpp=MPP,
        min_island_area_um2=100, smoothing_sigma_cells=0,
    )  # fmt: skip
    assert "Necrosis" in polys


def test_tissue_mask_excludes_cells() -> None:
    p = np.zeros((10, 10, 2), np.float32)
    p[..., 0] = 1
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    polys = class_map_to_polygons(
        p, l0_cell_size=(10, 10), class_names=["a", "b"], mpp=1.0, tissue_mask=mask,
        smoothing_sigma_cells=0, min_island_area_um2=0,
    )  # fmt: skip
    assert polys["a"].area == pytest.approx(36 * 100, rel=0.01)  # corners are rounded
    assert polys["a"].bounds == pytest.approx((20, 20, 80, 80), abs=1)


def test_assign_classes() -> None:
    raster = class_map_to_raster(
        grid(), l0_cell_size=(CELL, CELL), l0_origin=ORIGIN, class_names=NAMES, mpp=MPP,
        min_island_area_um2=10_000,
    )  # fmt: skip
    cell = lambda c, r: (ORIGIN[0] + (c + 0.5) * CELL, ORIGIN[1] + (r + 0.5) * CELL)  # noqa: E731
    pts = np.array(
        [
            cell(40, 20),  # stroma core
            cell(25, 25),  # tumour
            cell(15, 20),  # lumen centre, 4 cells from tissue
            (-50_000.0, 0.0),  # far off the raster
            cell(30, 10),  # absorbed necrosis speck
        ]
    )
    got = assign_classes(pts, raster)
    assert got.tolist() == ["Stroma", "Tumor", UNCLASSIFIED, UNCLASSIFIED, "Tumor"]
    near = assign_classes(pts[2:3], raster, max_distance_l0=6 * CELL)
    assert near.tolist() == ["Tumor"]
    assert assign_classes(np.zeros((0, 2)), raster).shape == (0,)


def test_raster_and_polygons_agree() -> None:
    raster = class_map_to_raster(
        grid(), l0_cell_size=(CELL, CELL), l0_origin=ORIGIN, class_names=NAMES, mpp=MPP,
        min_island_area_um2=10_000,
    )  # fmt: skip
    polys = raster_to_polygons(raster, min_island_area_um2=10_000)
    rng = np.random.default_rng(1)
    pts = rng.uniform(
        (ORIGIN[0], ORIGIN[1]), (ORIGIN[0] + 60 * CELL, ORIGIN[1] + 40 * CELL), (2000, 2)
    )
    cls = assign_classes(pts, raster, max_distance_l0=0)
    inside = shapely.contains_xy(polys["Tumor"], pts[:, 0], pts[:, 1])
    agree = np.mean(inside == (cls == "Tumor"))
    assert agree > 0.97  # only simplification at the borders differs


def test_bad_shapes_raise() -> None:
    with pytest.raises(ConfigError):
        class_map_to_polygons(
            np.zeros((4, 4, 3), np.float32), l0_cell_size=(1, 1), class_names=["a"], mpp=1.0
        )


def test_tissue_regions() -> None:
    regions = tissue_class_regions(
        grid(), class_names=NAMES, l0_cell_size=(CELL, CELL), l0_origin=ORIGIN, mpp=MPP,
        min_island_area_um2=10_000,
    )  # fmt: skip
    areas = regions.class_area_mm2()
    assert areas["Necrosis"] == 0.0
    assert areas["Stroma"] == pytest.approx(np.pi * 0.3**2, rel=0.1)
    x = np.array([ORIGIN[0] + 40.5 * CELL, ORIGIN[0] + 25.5 * CELL, -1e6])
    y = np.array([ORIGIN[1] + 20.5 * CELL, ORIGIN[1] + 25.5 * CELL, 0.0])
    names, index = regions.assign(x, y)
    assert names.tolist() == ["Stroma", "Tumor", UNCLASSIFIED]
    assert index.tolist() == [1, 0, 3]
    assert set(regions.polygons()) == {"Tumor", "Stroma"}
