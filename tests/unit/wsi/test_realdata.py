"""Every slide in shared/data/slides opens with the MANIFEST's geometry, or fails correctly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from click.testing import CliRunner

from slidestream.errors import MissingResolutionError, SlideOpenError, SlideReadError
from slidestream.wsi import open_slide

pytestmark = pytest.mark.realdata

# (relative path, vendor, level-0 size, mpp (None: not checked), level count, expected reader)
EXPECTED = [
    ("CMU-1-Small-Region.svs", "aperio", (2220, 2967), 0.499, 1, "fast-tiff"),
    ("test3-DAPI-2-387.ndpi", "hamamatsu", (3968, 4864), 0.22818, 7, "openslide"),
    ("synthetic/boxes.tiff", "generic-tiff", (300, 250), None, 4, "fast-tiff"),
    ("synthetic/small.svs", "aperio", (16, 16), 0.499, 1, "fast-tiff"),
    ("synthetic/dicom_boxes", "dicom", (16, 16), 0.499, 1, "openslide"),
    ("synthetic/dicom_boxes/boxes_0.dcm", "dicom", (16, 16), 0.499, 1, "openslide"),
    ("synthetic/dicom_boxes/boxes_1.dcm", "dicom", (16, 16), 0.499, 1, "openslide"),
    ("synthetic/highdicom_numbers", "dicom", (50, 50), 0.499, 1, "openslide"),
    ("synthetic/highdicom_numbers/sm_image_numbers.dcm", "dicom", (50, 50), 0.499, 1, "openslide"),
    ("ome_tiff/OS-1-detail.ome.tif", "ome-tiff", (1101, 1101), 0.2271, 1, "tifffile"),
    ("ome_tiff/OS-2-ndpi.ome.tif", "ome-tiff", (2202, 2202), 0.2271, 1, "tifffile"),
    ("ome_tiff/OS-2-vsi.ome.tif", "ome-tiff", (1445, 1445), 0.3461, 1, "tifffile"),
]


@pytest.fixture(scope="module")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"


#: Files that must fail cleanly: (relative path, the error on open, or None if it opens and the
#: error comes on reading pixels).
BROKEN = {
    "synthetic/unopenable.tiff": SlideOpenError,
    "synthetic/unreadable.svs": None,
}
_SLIDES_DIR = Path(__file__).resolve().parents[4] / "shared" / "data" / "slides"


def _entries() -> list[str]:
    """Every slide of shared/data/slides: files, and DICOM folders as one slide each."""
    if not _SLIDES_DIR.is_dir():
        return []
    out = []
    for p in sorted(_SLIDES_DIR.rglob("*")):
        dicom_folder = p.is_dir() and any(c.suffix == ".dcm" for c in p.iterdir())
        if (p.is_file() and not p.name.startswith(".")) or dicom_folder:
            out.append(p.relative_to(_SLIDES_DIR).as_posix())
    return out


_EXPECTED = {row[0]: row[1:] for row in EXPECTED}


@pytest.mark.parametrize("rel", _entries())
class TestEverySlideFormat:
    """One reader contract run over every slide in shared/data/slides (OpenSlide formats,
    OME-TIFF, DICOM files and folders, generic TIFF, broken files); skips without the data."""

    def test_is_known(self, slides_dir: Path, rel: str) -> None:
        # a new file in the data folder needs its expected geometry (or error) listed here
        assert rel in _EXPECTED or rel in BROKEN, rel

    def test_opens_with_its_geometry_or_fails_cleanly(self, slides_dir: Path, rel: str) -> None:
        path = slides_dir / rel
        if rel in BROKEN:
            error = BROKEN[rel]
            if error is not None:
                with pytest.raises(error, match=path.name.replace(".", r"\.")):
                    open_slide(path)
                return
            with open_slide(path) as slide, pytest.raises(SlideReadError):
                slide.read_region((0, 0), (16, 16))
            return
        vendor, size, mpp, levels, reader = _EXPECTED[rel]
        with open_slide(path, require_mpp=False) as slide:
            assert slide.vendor == vendor
            assert slide.reader == reader
            assert slide.dimensions == size
            assert slide.level_count == levels
            assert slide.level_downsamples[0] == 1.0
            if mpp is not None:
                assert slide.mpp_x == pytest.approx(mpp, rel=2e-4)
                assert slide.mpp_y == pytest.approx(mpp, rel=2e-4)
            elif not slide.has_mpp:
                with pytest.raises(MissingResolutionError, match="--mpp"):
                    _ = slide.mpp
            assert len(slide.fingerprint) == 64
            assert slide.background_rgb == (255, 255, 255)
            w, h = slide.level_dimensions[-1]
            patch = slide.read_region((0, 0), (w, h), level=levels - 1)
            assert patch.shape == (h, w, 3) and patch.dtype == np.uint8
            thumb = slide.get_thumbnail((64, 64))
            assert max(thumb.shape[:2]) == 64 and thumb.shape[2] == 3

    def test_info_describes_it(self, slides_dir: Path, rel: str) -> None:
        from slidestream.commands import describe_slide

        if rel in BROKEN and BROKEN[rel] is not None:
            pytest.skip("does not open")
        info = describe_slide(slides_dir / rel)
        assert info.width > 0 and len(info.fingerprint) == 64
        assert info.level_count == len(info.levels)


def test_metadata_details(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as slide:
        assert slide.objective_power == 20.0
        assert slide.associated_images == ("label", "macro", "thumbnail")
        assert slide.name == "CMU-1-Small-Region"
        assert slide.fingerprint == slide.properties["openslide.quickhash-1"]
    with open_slide(slides_dir / "test3-DAPI-2-387.ndpi") as slide:
        assert slide.level_dimensions[-1] == (62, 76)
        assert slide.level_downsamples[-1] == pytest.approx(64.0)
    with open_slide(slides_dir / "ome_tiff" / "OS-2-vsi.ome.tif") as slide:
        assert slide.name == "OS-2-vsi"
        assert slide.objective_power is None
        first = slide.fingerprint
    with open_slide(slides_dir / "ome_tiff" / "OS-2-vsi.ome.tif") as slide:
        assert slide.fingerprint == first  # sha256 of the bytes: stable


def test_unopenable_raises_slide_open_error(slides_dir: Path) -> None:
    with pytest.raises(SlideOpenError, match=r"unopenable\.tiff.*52479"):
        open_slide(slides_dir / "synthetic" / "unopenable.tiff")


@pytest.mark.parametrize("reader", ["auto", "openslide"])
def test_corrupt_tile_raises_slide_read_error(slides_dir: Path, reader: str) -> None:
    with open_slide(slides_dir / "synthetic" / "unreadable.svs", reader=reader) as slide:  # type: ignore[arg-type]
        assert slide.vendor == "aperio"
        with pytest.raises(SlideReadError, match=r"unreadable\.svs.*(x=0|region)"):
            slide.read_region((0, 0), (16, 16))


def test_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "nope.svs")


def _fast_slides(slides_dir: Path) -> list[Path]:
    return [
        p
        for p in sorted(slides_dir.rglob("*"))
        if p.is_file() and p.name not in ("unopenable.tiff", "unreadable.svs")
    ]


def test_fast_path_matches_openslide_on_every_accepted_real_slide(slides_dir: Path) -> None:
    checked = 0
    for path in _fast_slides(slides_dir):
        try:
            slide = open_slide(path)
        except SlideOpenError:
            continue
        with slide:
            if slide.reader != "fast-tiff":
                continue
            reference = openslide.OpenSlide(str(path))
            try:
                for level, (w, h) in enumerate(slide.level_dimensions):
                    ds = slide.level_downsamples[level]
                    # whole level, plus a window crossing tile borders and the edge; OpenSlide
                    # interpolates positions that fall between level px, so stay on level px
                    windows = [((0, 0), (w, h))]
                    if ds == int(ds):
                        windows.append(((int(37 * ds), int(11 * ds)), (w // 2 + 7, h)))
                    for loc, size in windows:
                        ours = slide.read_region(loc, size, level=level).astype(np.int16)
                        rgba = np.asarray(reference.read_region(loc, level, size))
                        theirs = rgba[..., :3].astype(np.int16)
                        theirs[rgba[..., 3] == 0] = 255  # OpenSlide pads with transparent
                        diff = np.abs(ours - theirs)
                        assert diff.max() <= 2, (path.name, level, loc)
                        assert diff.mean() < 0.1, (path.name, level, loc)
            finally:
                reference.close()
            checked += 1
    assert checked >= 3  # CMU-1-Small-Region, boxes.tiff, small.svs


def test_ome_pixels_match_tifffile(slides_dir: Path) -> None:
    import tifffile

    path = slides_dir / "ome_tiff" / "OS-1-detail.ome.tif"
    reference = tifffile.imread(path)
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_region((0, 0), slide.dimensions), reference)
        np.testing.assert_array_equal(
            slide.read_region((500, 480), (300, 90)), reference[480:570, 500:800]
        )


def test_png_needs_mpp(shared_data: Path) -> None:
    png = next((shared_data / "nuclei").rglob("*.png"))
    with pytest.raises(MissingResolutionError, match=r"pass --mpp"):
        open_slide(png)
    with open_slide(png, mpp=0.25) as slide:
        assert slide.vendor == "image" and slide.mpp == 0.25
        assert slide.read_region((0, 0), (10, 10)).shape == (10, 10, 3)


def test_cli_info_json(slides_dir: Path) -> None:
    from slidestream.cli import cli

    result = CliRunner().invoke(cli, ["info", "--json", str(slides_dir / "test3-DAPI-2-387.ndpi")])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["vendor"] == "hamamatsu"
    assert (record["width"], record["height"]) == (3968, 4864)
    assert len(record["levels"]) == 7
    assert record["levels"][6]["downsample"] == pytest.approx(64.0)
    assert record["mpp_x"] == pytest.approx(0.22818, rel=1e-4)
    assert record["objective_power"] == 40.0
    assert record["associated_images"] == ["macro"]
    assert record["background"] == "#ffffff"
    assert len(record["fingerprint"]) == 64


def test_cli_info_errors_are_one_line(slides_dir: Path) -> None:
    from slidestream.cli import cli

    result = CliRunner().invoke(cli, ["info", str(slides_dir / "synthetic" / "unopenable.tiff")])
    assert result.exit_code == 1
    assert "unopenable.tiff" in result.output and "Traceback" not in result.output
    human = CliRunner().invoke(cli, ["info", str(slides_dir / "CMU-1-Small-Region.svs")])
    assert human.exit_code == 0 and "2220 x 2967" in human.output
