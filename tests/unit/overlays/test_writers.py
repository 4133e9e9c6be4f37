"""GeoJSON (QuPath), parquet and overlay PNG writers: validity, determinism, atomicity."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq
import pytest
import shapely
from PIL import Image

from slidestream.errors import ConfigError
from slidestream.overlays import (
    NUCLEUS_ID_NAMESPACE,
    MeasureFn,
    NucleusTable,
    class_map_to_polygons,
    extract_tile_nuclei,
    nucleus_ids,
    render_overlay_png,
    write_nuclei_geojson,
    write_nuclei_parquet,
    write_tissue_geojson,
)
from slidestream.overlays._json_text import format_fixed

COLORS = {"Tumor": (200, 0, 0), "Stroma": (0, 150, 0)}


@pytest.fixture(scope="module")
def tables(slide_labels: npt.NDArray[np.int32], measure: MeasureFn) -> list[NucleusTable]:
    """Two classified tables (a left and a right tile) with a NaN measurement."""
    h, w = slide_labels.shape
    rgb = np.zeros((h, w, 3), np.uint8)
    out = []
    for x0, x1 in ((0, 240), (240, w)):
        t = extract_tile_nuclei(
            slide_labels, rgb, core=(x0, 0, x1, h), l0_origin=(512.0, 256.0), l0_per_px=1.5,
            mpp=0.5, measure=measure,
        )  # fmt: skip
        out.append(t)
    out[0].measurements["eosin_od"][0] = np.nan
    classes = np.array(["Tumor", "Stroma", "Unclassified", "Other"])
    return [t.with_classes(classes[np.arange(len(t)) % 4]) for t in out]


def validate(shared_tools: Path, path: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(shared_tools / "check_qupath_geojson.py"), str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("as_points", [False, True])
def test_geojson_passes_validator(
    tmp_path: Path, tables: list[NucleusTable], shared_tools: Path, as_points: bool
) -> None:
    path = tmp_path / "nuclei.geojson.gz"
    n = write_nuclei_geojson(
        path, tables, id_namespace="slide-fp", as_points=as_points, class_colors=COLORS,
        chunk_size=50,
    )  # fmt: skip
    assert n == sum(len(t) for t in tables)
    report = validate(shared_tools, path)
    assert f"objects: {n} [detection {n}]" in report
    assert ("Point" if as_points else "Polygon") in report


def test_geojson_content(tmp_path: Path, tables: list[NucleusTable]) -> None:
    path = tmp_path / "nuclei.geojson"
    n = write_nuclei_geojson(path, tables, id_namespace="fp", class_colors=COLORS)
    doc = json.loads(path.read_text("utf-8"))
    feats = doc["features"]
    assert doc["type"] == "FeatureCollection" and len(feats) == n
    f0 = feats[0]
    assert f0["id"] == str(uuid.uuid5(NUCLEUS_ID_NAMESPACE, "fp:0"))
    assert feats[-1]["id"] == str(uuid.uuid5(NUCLEUS_ID_NAMESPACE, f"fp:{n - 1}"))
    props = f0["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert "Eosin OD: Mean" not in props["measurements"]  # NaN left out
    assert feats[1]["properties"]["measurements"]["Eosin OD: Mean"] > 0
    assert "classification" not in feats[2]["properties"]  # Unclassified
    assert feats[3]["properties"]["classification"]["color"] == [128, 128, 128]
    area = feats[1]["properties"]["measurements"]["Area µm^2"]
    assert area == pytest.approx(tables[0].measurements["area_um2"][1], abs=1e-4)
    ring = np.array(f0["geometry"]["coordinates"][0])
    np.testing.assert_allclose(ring, tables[0].coords[: len(ring)], atol=0.005)
    assert shapely.Polygon(ring).is_valid


def test_geojson_deterministic(tmp_path: Path, tables: list[NucleusTable]) -> None:
    a, b = tmp_path / "a.geojson.gz", tmp_path / "b.geojson.gz"
    write_nuclei_geojson(a, tables, id_namespace="fp", class_colors=COLORS)
    write_nuclei_geojson(b, tables, id_namespace="fp", class_colors=COLORS, chunk_size=7)
    assert gzip.decompress(a.read_bytes()) == gzip.decompress(b.read_bytes())
    assert a.read_bytes()[:10] == b.read_bytes()[:10]  # gzip header: no name, mtime 0


def test_nucleus_ids_match_uuid5() -> None:
    ids = nucleus_ids("abc", 95, 10)
    assert ids == [str(uuid.uuid5(NUCLEUS_ID_NAMESPACE, f"abc:{i}")) for i in range(95, 105)]


def test_parquet_matches_geojson(tmp_path: Path, tables: list[NucleusTable]) -> None:
    n_json = write_nuclei_geojson(tmp_path / "n.geojson", tables, id_namespace="fp")
    n_pq = write_nuclei_parquet(tmp_path / "n.parquet", tables, id_namespace="fp", chunk_size=100)
    table = pq.read_table(tmp_path / "n.parquet")
    assert n_pq == n_json == table.num_rows
    assert pq.ParquetFile(tmp_path / "n.parquet").num_row_groups >= 4
    feats = json.loads((tmp_path / "n.geojson").read_text("utf-8"))["features"]
    assert table["id"].to_pylist() == [f["id"] for f in feats]
    assert table["index"].to_pylist() == list(range(n_pq))
    cls = table["tissue_class"].to_pylist()
    assert cls[:4] == ["Tumor", "Stroma", None, "Other"]
    assert {"centroid_x", "bbox_x1", "area_um2", "hematoxylin_od"} <= set(table.column_names)


def test_empty_outputs(tmp_path: Path) -> None:
    assert write_nuclei_geojson(tmp_path / "e.geojson.gz", [], id_namespace="x") == 0
    doc = json.loads(gzip.decompress((tmp_path / "e.geojson.gz").read_bytes()))
    assert doc == {"type": "FeatureCollection", "features": []}
    assert write_nuclei_parquet(tmp_path / "e.parquet", [], id_namespace="x") == 0
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 0


def test_atomic_write_leaves_nothing_on_error(tmp_path: Path, tables: list[NucleusTable]) -> None:
    def failing() -> Iterator[NucleusTable]:
        yield tables[0]
        raise RuntimeError("worker died")

    for path, writer in (
        (tmp_path / "n.geojson.gz", write_nuclei_geojson),
        (tmp_path / "n.parquet", write_nuclei_parquet),
    ):
        with pytest.raises(RuntimeError, match="worker died"):
            writer(path, failing(), id_namespace="fp")
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    # an existing output survives a failed rewrite untouched
    good = tmp_path / "keep.geojson"
    write_nuclei_geojson(good, tables, id_namespace="fp")
    before = good.read_bytes()
    with pytest.raises(RuntimeError):
        write_nuclei_geojson(good, failing(), id_namespace="fp")
    assert good.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.geojson"]


def test_geojson_name_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        write_nuclei_geojson(tmp_path / "nuclei.gz", [], id_namespace="x")


def test_format_fixed() -> None:
    v = np.array([1008.5857, 152.0, -0.5, 0.0, -0.004, 12.30, 99.999, 1e6 + 0.01])
    text = [bytes(r[r != 0]).decode() for r in format_fixed(v, 2)]
    assert text == ["1008.59", "152", "-0.5", "0", "0", "12.3", "100", "1000000.01"]
    rng = np.random.default_rng(0)
    r = rng.uniform(-1e5, 1e5, 1000)
    got = [float(bytes(x[x != 0])) for x in format_fixed(r, 4)]
    np.testing.assert_array_equal(got, np.round(r, 4))


@pytest.fixture(scope="module")
def tissue() -> dict[str, shapely.Geometry]:
    p = np.full((20, 30, 2), np.nan, np.float32)
    p[2:18, 2:28] = (0.9, 0.1)
    p[6:14, 16:26] = (0.1, 0.9)
    p[8:11, 5:9] = np.nan  # hole
    return class_map_to_polygons(
        p, l0_cell_size=(256, 256), class_names=["Tumor", "Stroma"], mpp=0.25,
        min_island_area_um2=1000,
    )  # fmt: skip


def test_tissue_geojson(
    tmp_path: Path, tissue: dict[str, shapely.Geometry], shared_tools: Path
) -> None:
    path = tmp_path / "tissue.geojson"
    n = write_tissue_geojson(path, tissue, class_colors=COLORS, mpp=0.25, id_namespace="fp")
    assert n == 2
    report = validate(shared_tools, path)
    assert "annotation 2" in report
    feats = json.loads(path.read_text("utf-8"))["features"]
    tumor = next(f for f in feats if f["properties"]["classification"]["name"] == "Tumor")
    meas = tumor["properties"]["measurements"]
    assert meas["Area µm^2"] == pytest.approx(tissue["Tumor"].area * 0.0625, rel=1e-6)
    assert meas["Area mm^2"] == pytest.approx(meas["Area µm^2"] / 1e6, rel=1e-4)
    assert len(tumor["geometry"]["coordinates"][0]) >= 2  # shell + holes kept


def test_overlay_png(tmp_path: Path, tissue: dict[str, shapely.Geometry]) -> None:
    rng = np.random.default_rng(0)
    thumb = rng.integers(180, 255, (80, 120, 3), dtype=np.uint8)  # 1/64 of 7680 x 5120 px
    pts = rng.uniform((600, 600), (7000, 4500), (5000, 2))
    path = tmp_path / "overlay.png"
    size = render_overlay_png(
        path, thumb, thumb_l0_scale=1 / 64, class_polygons=tissue, class_colors=COLORS,
        nucleus_centroids_l0=pts, slide_mpp=0.25, title="test slide",
    )  # fmt: skip
    with Image.open(path) as im:
        assert im.size == size and im.mode == "RGB"
        assert size[0] == max(2 * 120 + 48, 560) and size[1] > 80 + 100
        arr = np.asarray(im)
    assert arr.std() > 10  # something was drawn
    assert not list(tmp_path.glob("*.tmp"))


def test_one_pass_geojson_and_parquet(tmp_path: Path, tables: list[NucleusTable]) -> None:
    gen = (t for t in tables)  # one-shot generator
    n = write_nuclei_geojson(
        tmp_path / "n.geojson.gz", gen, id_namespace="fp", parquet_path=tmp_path / "n.parquet",
        chunk_size=60,
    )  # fmt: skip
    table = pq.read_table(tmp_path / "n.parquet")
    feats = json.loads(gzip.decompress((tmp_path / "n.geojson.gz").read_bytes()))["features"]
    assert table.num_rows == n == len(feats)
    assert table["id"].to_pylist() == [f["id"] for f in feats]

    def failing() -> Iterator[NucleusTable]:
        yield tables[0]
        raise RuntimeError("boom")

    out = tmp_path / "fail"
    out.mkdir()
    with pytest.raises(RuntimeError):
        write_nuclei_geojson(
            out / "n.geojson.gz", failing(), id_namespace="fp", parquet_path=out / "n.parquet"
        )
    assert list(out.iterdir()) == []
