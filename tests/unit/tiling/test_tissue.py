"""Tissue detection: stained blobs found, background and marker/pen/edge artefacts excluded."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import shapely
from PIL import Image

from slidestream.errors import ConfigError
from slidestream.tiling import TilingConfig, TissueMask, detect_tissue, plan_tiles

from .conftest import FakeSlide, draw_disk, he_slide_image

MPP = 2.0  # level-0 µm/px of the synthetic slide


def _artefact_slide() -> tuple[npt.NDArray[np.uint8], dict[str, npt.NDArray[np.bool_]]]:
    """2400 x 1800 px at 2 µm/px: H&E and IHC blobs, a black marker stroke, green and blue pen,
    a black slide-edge border, on white. Returns the image and the region masks (level 0)."""
    rng = np.random.default_rng(1)
    h, w = 1800, 2400
    img = np.full((h, w, 3), 242, dtype=np.uint8)
    img = np.clip(img.astype(np.int16) + rng.integers(-5, 6, img.shape), 0, 255).astype(np.uint8)
    regions: dict[str, npt.NDArray[np.bool_]] = {}

    def region(draw: object) -> npt.NDArray[np.bool_]:
        m = np.zeros((h, w), np.uint8)
        draw(m)  # type: ignore[operator]
        return m.astype(bool)

    # H&E blob: pink with dense purple nuclei.
    regions["he"] = region(lambda m: cv2.circle(m, (600, 600), 350, 1, -1))
    img[regions["he"]] = (226, 150, 196)
    for _ in range(800):
        x, y = rng.integers(300, 900, 2)
        if regions["he"][y, x]:
            draw_disk(img, int(x), int(y), 4, (80, 40, 130))
    # IHC blob: pale blue haematoxylin counterstain with brown DAB spots.
    regions["ihc"] = region(lambda m: cv2.ellipse(m, (1700, 500), (380, 260), 0, 0, 360, 1, -1))
    img[regions["ihc"]] = (196, 198, 222)
    for _ in range(400):
        x, y = rng.integers(1320, 2080, 2), rng.integers(240, 760)
        x = int(x[0])
        if regions["ihc"][y, x]:
            draw_disk(img, x, int(y), 5, (140, 90, 50))
    # Black marker stroke, green and blue pen marks on the glass.
    regions["black"] = region(lambda m: cv2.line(m, (300, 1300), (1100, 1450), 1, 40))
    img[regions["black"]] = (18, 18, 22)
    regions["green"] = region(lambda m: cv2.ellipse(m, (1500, 1350), (200, 120), 0, 0, 360, 1, 30))
    img[regions["green"]] = (40, 160, 80)
    regions["blue"] = region(lambda m: cv2.line(m, (1900, 1100), (2200, 1600), 1, 35))
    img[regions["blue"]] = (30, 60, 160)
    # Black scanner border along the left edge.
    regions["border"] = np.zeros((h, w), bool)
    regions["border"][:, :40] = True
    img[regions["border"]] = (5, 5, 5)
    return img, regions


def _in_mask(tissue: TissueMask, region: npt.NDArray[np.bool_]) -> float:
    """Fraction of ``region`` (level-0 bool) whose pixels fall in tissue mask pixels."""
    m_h, m_w = tissue.mask.shape
    d = tissue.l0_per_m_px
    ys, xs = np.nonzero(region)
    return float(
        tissue.mask[
            np.minimum(ys // d, m_h - 1).astype(int), np.minimum(xs // d, m_w - 1).astype(int)
        ].mean()
    )


@pytest.fixture(scope="module")
def artefact_case() -> tuple[FakeSlide, dict[str, npt.NDArray[np.bool_]], TissueMask]:
    img, regions = _artefact_slide()
    slide = FakeSlide(img, mpp=MPP)
    return slide, regions, detect_tissue(slide, mask_mpp=8.0)


def test_detects_he_and_ihc_blobs(artefact_case: tuple[FakeSlide, dict, TissueMask]) -> None:
    _, regions, tissue = artefact_case
    assert tissue.mpp == 8.0
    assert tissue.mask.shape == (1800 // 4, 2400 // 4)
    # Interiors (shrunk by one mask pixel) are fully tissue.
    for name in ("he", "ihc"):
        interior = cv2.erode(regions[name].astype(np.uint8), np.ones((17, 17), np.uint8)).astype(
            bool
        )
        assert _in_mask(tissue, interior) > 0.98, name


def test_excludes_background_and_artefacts(
    artefact_case: tuple[FakeSlide, dict, TissueMask],
) -> None:
    _, regions, tissue = artefact_case
    for name in ("black", "green", "blue", "border"):
        assert _in_mask(tissue, regions[name]) < 0.02, name
    near_tissue = cv2.dilate(
        (regions["he"] | regions["ihc"]).astype(np.uint8), np.ones((41, 41), np.uint8)
    ).astype(bool)
    background = ~near_tissue
    for name in ("black", "green", "blue", "border"):
        background &= ~regions[name]
    assert _in_mask(tissue, background) < 0.01
    expected_mm2 = (regions["he"].sum() + regions["ihc"].sum()) * MPP**2 / 1e6
    assert tissue.tissue_area_mm2 == pytest.approx(expected_mm2, rel=0.08)


def test_polygons_follow_the_mask(
    artefact_case: tuple[FakeSlide, dict, TissueMask], tmp_path: Path
) -> None:
    slide, _, tissue = artefact_case
    poly = tissue.to_polygons()
    assert isinstance(poly, shapely.MultiPolygon) and poly.is_valid
    assert len(poly.geoms) == 2
    l0_area_um2 = poly.area * MPP**2
    assert l0_area_um2 / 1e6 == pytest.approx(tissue.tissue_area_mm2, rel=0.03)
    assert shapely.box(0, 0, *slide.dimensions).contains(poly)
    assert poly.contains(shapely.Point(600, 600)) and poly.contains(shapely.Point(1700, 500))
    # PNG: 255 = tissue, written atomically (no temp files left behind).
    out = tissue.to_png(tmp_path / "mask.png")
    png = np.asarray(Image.open(out))
    assert png.dtype == np.uint8 and png.shape == tissue.mask.shape
    np.testing.assert_array_equal(png == 255, tissue.mask)
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]


def test_polygons_keep_holes() -> None:
    mask = np.zeros((40, 40), bool)
    mask[5:35, 5:35] = True
    mask[15:25, 15:25] = False
    tissue = TissueMask(mask=mask, mpp=8.0, slide_mpp=0.5, l0_dimensions=(640, 640))
    poly = tissue.to_polygons(simplify_m_px=0)
    assert len(poly.geoms) == 1 and len(poly.geoms[0].interiors) == 1
    assert poly.area == pytest.approx((30 * 30 - 10 * 10) * 16**2)
    empty = TissueMask(mask=np.zeros((4, 4), bool), mpp=8.0, slide_mpp=0.5, l0_dimensions=(64, 64))
    assert empty.to_polygons().is_empty and empty.tissue_area_mm2 == 0.0


def test_tiny_and_blank_slides() -> None:
    tiny = FakeSlide(np.full((16, 16, 3), 200, np.uint8), mpp=0.5)
    tissue = detect_tissue(tiny)
    assert tissue.mask.shape == (16, 16) and tissue.mpp == 0.5
    assert not tissue.mask.any()
    blank = FakeSlide(np.full((3000, 4000, 3), 243, np.uint8), mpp=0.5)
    assert not detect_tissue(blank).mask.any()
    with pytest.raises(ConfigError):
        detect_tissue(blank, mask_mpp=0.0)


def test_mask_drives_tile_selection(artefact_case: tuple[FakeSlide, dict, TissueMask]) -> None:
    slide, regions, tissue = artefact_case
    grid = plan_tiles(
        slide, TilingConfig(tile_mpp=4.0, tile_size_px=64, min_tissue_fraction=0.5), tissue
    )
    assert len(grid) > 0
    for tile in grid:
        cx = int(tile.l0_x + tile.l0_width / 2)
        cy = int(tile.l0_y + tile.l0_height / 2)
        assert not (regions["black"] | regions["green"] | regions["blue"])[cy, cx]


def test_large_pyramid_reads_a_low_level_fast() -> None:
    """A 40,000 x 30,000 px slide at 0.25 µm/px: only a coarse level is read, well under 2 s."""

    class BigSlide(FakeSlide):
        def __init__(self) -> None:
            super().__init__(he_slide_image(1250, 938), mpp=0.25 * 32)
            self.mpp = 0.25
            self.dimensions = (40_000, 30_000)
            self.level_downsamples = (1.0, 4.0, 16.0, 32.0)
            self.read_levels: list[int] = []

        def best_level_for_mpp(self, mpp: float) -> int:
            return 3 if mpp >= 8.0 else 0

        def read_at_mpp(
            self, location: tuple[float, float], size: tuple[int, int], mpp: float
        ) -> npt.NDArray[np.uint8]:
            assert mpp == 8.0
            x, y = round(location[0] / 32), round(location[1] / 32)
            return self.read_region((x, y), size)

    slide = BigSlide()
    t0 = time.perf_counter()
    tissue = detect_tissue(slide)
    elapsed = time.perf_counter() - t0
    assert tissue.mask.shape == (938, 1250)
    assert 0.05 < tissue.tissue_fraction < 0.5
    assert elapsed < 2.0


@pytest.mark.realdata
def test_cmu_small_region(shared_data: Path) -> None:
    from slidestream.wsi import open_slide

    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        assert slide.level_count == 1
        tissue = detect_tissue(slide)
    # Skin section covering roughly a third of the 2220 x 2967 field.
    assert tissue.mask.shape == (186, 139)
    assert 0.25 < tissue.tissue_fraction < 0.55
    assert 0.4 < tissue.tissue_area_mm2 < 0.9
    poly = tissue.to_polygons()
    assert poly.is_valid and not poly.is_empty
    assert poly.area * 0.499**2 / 1e6 == pytest.approx(tissue.tissue_area_mm2, rel=0.1)


@pytest.mark.realdata
def test_tiny_dicom_slide(shared_data: Path) -> None:
    from slidestream.wsi import open_slide

    with open_slide(shared_data / "slides" / "synthetic" / "dicom_boxes") as slide:
        tissue = detect_tissue(slide)
    assert tissue.mask.shape == (16, 16)
    assert tissue.l0_dimensions == (16, 16)
