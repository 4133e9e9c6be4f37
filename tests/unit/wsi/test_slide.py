"""Generated slides: round trips, geometry, resampling, padding, resolution chain, lifecycle."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import numpy.typing as npt
import openslide
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slidestream.errors import ConfigError, MissingResolutionError, SlideReadError
from slidestream.wsi import SLIDE_EXTENSIONS, open_slide, slide_name
from slidestream.wsi.synthetic import write_pyramidal_tiff

from .conftest import TINY_MPP, halve, make_pattern


def test_deflate_round_trip_is_pixel_exact_at_every_level(
    tiny_deflate: Path, tiny_image: npt.NDArray[np.uint8]
) -> None:
    expected = tiny_image
    with open_slide(tiny_deflate) as slide:
        assert slide.vendor == "generic-tiff" and slide.reader == "fast-tiff"
        assert slide.level_dimensions == ((333, 250), (166, 125), (83, 62))
        assert slide.mpp_x == pytest.approx(TINY_MPP, rel=1e-6)
        for level in range(slide.level_count):
            w, h = slide.level_dimensions[level]
            np.testing.assert_array_equal(slide.read_region((0, 0), (w, h), level=level), expected)
            expected = halve(expected)


def test_openslide_reader_agrees_with_fast_reader(tiny_deflate: Path) -> None:
    with open_slide(tiny_deflate) as fast, open_slide(tiny_deflate, reader="openslide") as ref:
        assert ref.reader == "openslide"
        for level in range(fast.level_count):
            # OpenSlide interpolates between level px for non-integer downsamples (2.003, 4.02)
            loc = (-20, 30) if level == 0 else (0, 0)
            np.testing.assert_array_equal(
                fast.read_region(loc, (200, 250), level=level),
                ref.read_region(loc, (200, 250), level=level),
            )


def test_jpeg_aperio_style_opens_as_aperio(
    tiny_jpeg_aperio: Path, tiny_image: npt.NDArray[np.uint8]
) -> None:
    with open_slide(tiny_jpeg_aperio) as slide:
        assert slide.vendor == "aperio" and slide.reader == "fast-tiff"
        assert slide.mpp == pytest.approx(TINY_MPP)
        ours = slide.read_region((0, 0), slide.dimensions).astype(np.int16)
    assert np.abs(ours - tiny_image).mean() < 12  # lossy, but the right picture
    reference = openslide.OpenSlide(str(tiny_jpeg_aperio))
    theirs = np.asarray(reference.read_region((0, 0), 0, reference.dimensions))[..., :3]
    reference.close()
    assert np.abs(ours - theirs).max() <= 2


def test_out_of_bounds_is_background(tiny_deflate: Path, tiny_image: npt.NDArray[np.uint8]) -> None:
    with open_slide(tiny_deflate) as slide:
        patch = slide.read_region((-10, -5), (30, 20))
        assert (patch[:5] == 255).all() and (patch[:, :10] == 255).all()
        np.testing.assert_array_equal(patch[5:, 10:], tiny_image[:15, :20])
        assert (slide.read_region((5000, 5000), (8, 8)) == 255).all()
        edge = slide.read_region((320, 240), (20, 20))
        np.testing.assert_array_equal(edge[:10, :13], tiny_image[240:, 320:])
        assert (edge[10:] == 255).all() and (edge[:, 13:] == 255).all()
        assert slide.read_region((0, 0), (0, 5)).shape == (5, 0, 3)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    x=st.integers(-80, 360),
    y=st.integers(-80, 280),
    w=st.integers(1, 150),
    h=st.integers(1, 150),
)
def test_region_equals_padded_crop(
    tiny_deflate: Path, tiny_image: npt.NDArray[np.uint8], x: int, y: int, w: int, h: int
) -> None:
    padded = np.full((250 + 2 * 300, 333 + 2 * 300, 3), 255, np.uint8)
    padded[300:550, 300:633] = tiny_image
    with open_slide(tiny_deflate) as slide:
        np.testing.assert_array_equal(
            slide.read_region((x, y), (w, h)), padded[300 + y : 300 + y + h, 300 + x : 300 + x + w]
        )


def test_best_level_and_read_at_mpp(tiny_deflate: Path, tiny_image: npt.NDArray[np.uint8]) -> None:
    with open_slide(tiny_deflate) as slide:
        assert slide.best_level_for_mpp(0.1) == 0
        assert slide.best_level_for_mpp(0.5) == 0
        level1_mpp = slide.level_mpp(1)  # 0.5 * 2.003 (downsample = mean of w and h ratios)
        assert level1_mpp == pytest.approx(0.5 * (333 / 166 + 2) / 2)
        assert slide.best_level_for_mpp(level1_mpp * 0.9995) == 1  # within 0.1 %
        assert slide.best_level_for_mpp(level1_mpp * 0.998) == 0
        assert slide.best_level_for_mpp(1.5) == 1
        assert slide.best_level_for_mpp(100.0) == 2
        # native resolution: exact pixels
        np.testing.assert_array_equal(
            slide.read_at_mpp((16.0, 8.0), (40, 30), 0.5), tiny_image[8:38, 16:56]
        )
        # level 1 exactly
        np.testing.assert_array_equal(
            slide.read_at_mpp((32.0, 64.0), (50, 20), level1_mpp),
            halve(tiny_image)[32:52, 16:66],
        )
        # 1.5 µm/px: area average of level 1 (1.0 µm/px) to exactly (h, w, 3)
        out = slide.read_at_mpp((10.5, 20.25), (37, 23), 1.5)
        assert out.shape == (23, 37, 3) and out.dtype == np.uint8
        mean_ref = tiny_image[20:89, 10:121].reshape(-1, 3).mean(axis=0)
        assert np.abs(out.reshape(-1, 3).mean(axis=0) - mean_ref).max() < 6
        # finer than level 0: upsampled to the requested size
        assert slide.read_at_mpp((0.0, 0.0), (20, 10), 0.25).shape == (10, 20, 3)
        with pytest.raises(ConfigError):
            slide.best_level_for_mpp(0.0)


def test_thumbnail(tiny_deflate: Path) -> None:
    with open_slide(tiny_deflate) as slide:
        thumb = slide.get_thumbnail((100, 100))
        assert thumb.shape == (75, 100, 3)
        full = slide.read_region((0, 0), slide.dimensions)
        assert np.abs(thumb.reshape(-1, 3).mean(0) - full.reshape(-1, 3).mean(0)).max() < 2


def test_resolution_chain(tmp_path: Path, tiny_image: npt.NDArray[np.uint8]) -> None:
    plain = tmp_path / "scan.tif"
    tifffile.imwrite(plain, tiny_image, tile=(64, 64), compression="zlib", metadata=None)
    with pytest.raises(MissingResolutionError, match=r"scan\.tif: slide has no µm/px.*--mpp"):
        open_slide(plain)
    with open_slide(plain, mpp=0.3) as slide:
        assert (slide.mpp_x, slide.mpp_y) == (0.3, 0.3)
        np.testing.assert_array_equal(slide.read_region((0, 0), (333, 250)), tiny_image)
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(
        inch,
        tiny_image,
        tile=(64, 64),
        resolution=(25400 / 0.4, 25400 / 0.4),
        resolutionunit="INCH",
        metadata=None,
    )
    with open_slide(inch) as slide:
        assert slide.mpp == pytest.approx(0.4, rel=1e-6)
    with open_slide(inch, mpp=0.2) as slide:  # explicit wins
        assert slide.mpp == 0.2
    none_unit = tmp_path / "none.tif"
    tifffile.imwrite(
        none_unit,
        tiny_image,
        tile=(64, 64),
        resolution=(2.0, 2.0),
        resolutionunit="NONE",
        metadata=None,
    )
    with pytest.raises(MissingResolutionError):
        open_slide(none_unit)
    with pytest.raises(ConfigError):
        open_slide(inch, mpp=-1.0)


def test_stripped_lzw_rgba_tiff_via_tifffile(tmp_path: Path) -> None:
    rgba = np.zeros((70, 90, 4), np.uint8)
    rgba[..., :3] = make_pattern(90, 70, seed=3)
    rgba[..., 3] = 255
    rgba[:10, :, 3] = 0  # transparent band -> background
    path = tmp_path / "strips.tif"
    tifffile.imwrite(
        path,
        rgba,
        compression="lzw",
        predictor=True,
        rowsperstrip=16,
        extrasamples=[2],
        photometric="rgb",
        metadata=None,
    )
    with open_slide(path, mpp=1.0) as slide:
        patch = slide.read_region((0, 0), (90, 70))
    assert (patch[:10] == 255).all()
    np.testing.assert_array_equal(patch[10:], rgba[10:, :, :3])


def test_image_reader_png(tmp_path: Path) -> None:
    import cv2

    image = make_pattern(40, 30, seed=5)
    path = tmp_path / "crop.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    with pytest.raises(MissingResolutionError):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.vendor == "image" and slide.level_count == 1 and slide.name == "crop"
        np.testing.assert_array_equal(slide.read_region((0, 0), (40, 30)), image)


def test_corrupt_generated_tile_raises(tmp_path: Path, tiny_image: npt.NDArray[np.uint8]) -> None:
    path = write_pyramidal_tiff(
        tmp_path / "bad.tif", tiny_image, mpp=0.5, tile_size=64, compression="jpeg", levels=1
    )
    with tifffile.TiffFile(path) as tif:
        offset = int(tif.pages[0].dataoffsets[5])
    with path.open("r+b") as fh:
        fh.seek(offset + 2)
        fh.write(b"\xff\xff\x00\x00" * 8)
    with open_slide(path) as slide:
        assert slide.reader == "fast-tiff"
        slide.read_region((0, 0), (64, 64))  # an intact tile still reads
        with pytest.raises(SlideReadError, match=r"bad\.tif.*tile col=5 row=0"):
            slide.read_region((300, 0), (30, 30))


def test_lifecycle_and_pickling(tiny_deflate: Path) -> None:
    slide = open_slide(tiny_deflate)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(slide)
    slide.close()
    slide.close()  # idempotent
    assert slide.closed
    with pytest.raises(SlideReadError, match="closed"):
        slide.read_region((0, 0), (4, 4))
    with pytest.raises(ConfigError):
        open_slide(tiny_deflate).read_region((0, 0), (4, 4), level=7)


def test_names_and_extensions() -> None:
    assert slide_name(Path("a/b/OS-1.ome.tif")) == "OS-1"
    assert slide_name(Path("x.SVS")) == "x"
    assert slide_name(Path("folder")) == "folder"
    assert {".svs", ".ndpi", ".ome.tif", ".dcm", ".mrxs", ".png"} <= SLIDE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in SLIDE_EXTENSIONS)


def test_streaming_writer_with_tile_callable(tmp_path: Path) -> None:
    calls: list[tuple[int, int, int, int]] = []

    def source(x: int, y: int, w: int, h: int) -> npt.NDArray[np.uint8]:
        calls.append((x, y, w, h))
        tile = np.empty((h, w, 3), np.uint8)
        tile[...] = ((x // 64) * 40 % 256, (y // 64) * 60 % 256, 128)
        return tile

    path = write_pyramidal_tiff(
        tmp_path / "cb.tif",
        source,
        size=(300, 200),
        mpp=0.25,
        tile_size=64,
        compression="deflate",
    )
    assert len(calls) == 5 * 4 and (256, 192, 44, 8) in calls
    with open_slide(path) as slide:
        assert slide.level_dimensions == ((300, 200), (150, 100), (75, 50), (37, 25))
        assert tuple(slide.read_region((70, 130), (1, 1))[0, 0]) == (40, 120, 128)
    with pytest.raises(ConfigError):
        write_pyramidal_tiff(tmp_path / "x.tif", source, mpp=0.25)
