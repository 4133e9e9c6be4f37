"""Unit tests of the viewer's parts: DeepZoom geometry, nucleus index, outline store, catalogue."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from slidestream.errors import ConfigError
from slidestream.overlays import NucleusTable, write_nuclei_geojson
from slidestream.viewer import (
    DeepZoomGrid,
    NucleusIndex,
    ResultCatalog,
    TileNotFoundError,
    ViewerConfig,
)
from slidestream.viewer._cache import ByteLRU
from slidestream.viewer._outlines import OutlineStore, member_cache


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 200_000),
    height=st.integers(1, 200_000),
    tile=st.sampled_from([64, 254, 256, 510]),
    overlap=st.integers(0, 2),
)
def test_deepzoom_tiles_cover_each_level_exactly(
    width: int, height: int, tile: int, overlap: int
) -> None:
    grid = DeepZoomGrid(l0_dimensions=(width, height), tile_size_px=tile, overlap_px=overlap)
    dims = grid.level_dimensions
    assert dims[-1] == (width, height) and dims[0] == (1, 1)
    assert grid.n_levels == math.ceil(math.log2(max(width, height))) + 1
    for z in (0, grid.n_levels // 2, grid.n_levels - 1):
        cols, rows = grid.tile_counts(z)
        w, h = dims[z]
        last = grid.region(z, cols - 1, rows - 1)
        first = grid.region(z, 0, 0)
        assert first.l0_origin == (0.0, 0.0)
        # tiles reach the level's edge, never beyond the slide
        assert last.l0_origin[0] + last.l0_size[0] <= width + 1e-9
        assert last.l0_origin[1] + last.l0_size[1] <= height + 1e-9
        assert (cols - 1) * tile - (overlap if cols > 1 else 0) + last.z_size[0] == w
        assert (rows - 1) * tile - (overlap if rows > 1 else 0) + last.z_size[1] == h
        assert 1 <= first.z_size[0] <= tile + overlap and 1 <= first.z_size[1] <= tile + overlap
        for bad in ((cols, 0), (0, rows), (-1, 0)):
            with pytest.raises(TileNotFoundError):
                grid.region(z, *bad)
    with pytest.raises(TileNotFoundError):
        grid.region(grid.n_levels, 0, 0)
    with pytest.raises(TileNotFoundError):
        grid.region(-1, 0, 0)


def test_viewer_config_validates() -> None:
    with pytest.raises(ConfigError, match="tile_size_px"):
        ViewerConfig(out_dir=Path(), tile_size_px=10)
    with pytest.raises(ConfigError, match="jpeg_quality"):
        ViewerConfig(out_dir=Path(), jpeg_quality=0)


def test_byte_lru_keeps_recent_values_under_the_limit() -> None:
    cache: ByteLRU[bytes] = ByteLRU(10, len)
    cache.put("a", b"12345")
    cache.put("b", b"12345")
    assert cache.get("a") == b"12345"  # a is now the most recent
    cache.put("c", b"123")
    assert cache.get("b") is None and cache.get("a") and cache.get("c")
    assert cache.nbytes <= 10
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None


def _table(rng: np.random.Generator, n: int, extent: float) -> NucleusTable:
    x = rng.uniform(0, extent, n)
    y = rng.uniform(0, extent * 0.75, n)
    ring = np.array([[-3, -3], [3, -3], [3, 3], [-3, 3], [-3, -3]], np.float64)
    coords = (ring[None] + np.stack([x, y], axis=1)[:, None]).reshape(-1, 2)
    return NucleusTable(
        centroid_x=x,
        centroid_y=y,
        bbox_x0=x - 3,
        bbox_y0=y - 3,
        bbox_x1=x + 3,
        bbox_y1=y + 3,
        coords=coords,
        offsets=np.arange(n + 1, dtype=np.int64) * 5,
        measurements={
            "area_um2": rng.uniform(10, 80, n),
            "equivalent_diameter_um": np.full(n, 6.0),
        },
        classes=np.where(x < extent / 2, "tumour", "Unclassified"),
    )


@pytest.fixture(scope="module")
def nuclei_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Any]]:
    folder = tmp_path_factory.mktemp("nuclei")
    rng = np.random.default_rng(4)
    tables = [_table(rng, 3000, 8000.0) for _ in range(3)]
    geojson = folder / "nuclei.geojson.gz"
    parquet = folder / "nuclei.parquet"
    write_nuclei_geojson(geojson, tables, id_namespace="t", chunk_size=1000, parquet_path=parquet)
    with gzip.open(geojson, "rt", encoding="utf-8") as fh:
        features = json.load(fh)["features"]
    return parquet, geojson, features


def test_nucleus_index_finds_exactly_the_nuclei_in_a_box(
    nuclei_files: tuple[Path, Path, list[Any]],
) -> None:
    parquet, _, features = nuclei_files
    index = NucleusIndex(parquet, mpp=0.5, l0_dimensions=(8000, 6000))
    assert index.count == len(features) == 9000
    assert set(index.categories) == {"tumour", "Unclassified"}
    xs = np.array([f["properties"]["measurements"]["Area µm^2"] for f in features])
    assert xs.size == 9000
    cx = np.array([np.mean(np.array(f["geometry"]["coordinates"][0])[:-1, 0]) for f in features])
    cy = np.array([np.mean(np.array(f["geometry"]["coordinates"][0])[:-1, 1]) for f in features])
    rng = np.random.default_rng(0)
    for _ in range(25):
        x0, y0 = rng.uniform(-500, 7500), rng.uniform(-500, 5500)
        x1, y1 = x0 + rng.uniform(1, 3000), y0 + rng.uniform(1, 3000)
        got = np.sort(index.row[index.in_box(x0, y0, x1, y1)])
        want = np.flatnonzero((cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1))
        assert got.tolist() == want.tolist()
    rows = index.rows(index.in_box(0, 0, 1000, 1000))
    assert rows.columns["id"] == [features[i]["id"] for i in rows.index]
    assert index.density.sum() > 0 and index.density_scale > 0
    index.close()


def test_outline_store_reads_single_rows(nuclei_files: tuple[Path, Path, list[Any]]) -> None:
    _, geojson, features = nuclei_files
    store = OutlineStore(geojson, cache=member_cache(1_000_000))
    rows = np.array([8999, 0, 1000, 999, 4567, 4567])
    got = store.geometries(rows)
    assert got == [features[i]["geometry"] for i in rows]
    with pytest.raises(ConfigError):
        store.geometries(np.array([9000]))


def test_outline_store_refuses_a_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "nuclei.geojson.gz"
    bad.write_bytes(gzip.compress(b'{"type":"FeatureCollection","features":[')[:-6] + b"garbage")
    with pytest.raises(ConfigError, match="corrupt"):
        OutlineStore(bad).geometries(np.array([0]))


def test_catalogue_ignores_staging_and_symlinks_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "summary.json").write_text(json.dumps({"slide": {"path": "x.svs"}}))
    (out / ".a.partial").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "summary.json").write_text("{}")
    (out / "b").symlink_to(outside, target_is_directory=True)
    (out / "c").mkdir()
    (out / "c" / "summary.json").write_text("not json")
    catalog = ResultCatalog(out)
    names = {e.name: e for e in catalog.refresh()}
    assert set(names) == {"a", "c"}
    assert names["a"].status == "done" and names["c"].status == "incomplete"
    assert catalog.get("b") is None and catalog.get("..") is None
    assert catalog.result_file(names["a"], "summary") == (out / "a" / "summary.json").resolve()
    assert catalog.result_file(names["a"], "no-such-kind") is None
    (out / "a" / "tissue.geojson").symlink_to(outside / "summary.json")
    assert catalog.result_file(names["a"], "tissue") is None


def test_view_command_help_and_demo_prints_the_view_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slidestream.commands
    from slidestream.cli import cli

    result = CliRunner().invoke(cli, ["view", "--help"])
    assert result.exit_code == 0 and "--host" in result.output and "127.0.0.1" in result.output

    def fake_demo(out_dir: Path, **_: Any) -> Any:
        return slidestream.commands.DemoReport(
            outcome=None,  # type: ignore[arg-type]
            lines=[f"outputs:     {out_dir}/"],
            exit_code=0,
        )

    monkeypatch.setattr(slidestream.commands, "run_demo", fake_demo)
    out = tmp_path / "demo out"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"slidestream view '{out}'" in result.output


def test_low_zoom_tiles_of_a_slide_without_pyramid_come_from_one_read(tmp_path: Path) -> None:
    """A single-level slide: coarse tiles are cut from one low-resolution read, same pixels."""
    from slidestream.viewer import ViewerService
    from slidestream.viewer._dzi import read_tile_rgb
    from slidestream.wsi import open_slide
    from slidestream.wsi.synthetic import write_pyramidal_tiff

    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:2000, 0:3000]
    image = np.stack([(xx // 7) % 256, (yy // 5) % 256, ((xx + yy) // 11) % 256], axis=2).astype(
        np.uint8
    )
    image = np.clip(image + rng.integers(0, 8, image.shape), 0, 255).astype(np.uint8)
    slide_path = write_pyramidal_tiff(
        tmp_path / "flat.tif", image, mpp=0.5, levels=1, compression="deflate"
    )
    out = tmp_path / "out"
    (out / "flat").mkdir(parents=True)
    summary = {
        "slide": {
            "path": str(slide_path),
            "width": 3000,
            "height": 2000,
            "mpp_x": 0.5,
            "mpp_y": 0.5,
        }
    }
    (out / "flat" / "summary.json").write_text(json.dumps(summary))
    service = ViewerService(ViewerConfig(out_dir=out, jpeg_quality=95))
    entry = service.entry("flat")
    grid = service.grid(entry)
    readers = service.readers(entry)
    for z in (grid.n_levels - 4, grid.n_levels - 6):  # 8x and 32x coarser than the slide
        import io

        from PIL import Image

        got = np.asarray(Image.open(io.BytesIO(service.slide_tile("flat", z, 0, 0))), np.float64)
        with open_slide(slide_path) as slide:
            want = read_tile_rgb(slide, grid.region(z, 0, 0)).astype(np.float64)
        assert got.shape == want.shape
        assert np.abs(got - want).mean() < 6.0
    assert readers._low_res is not None and max(readers._low_res.shape) <= 2048
    service.close()
