"""GeoJSON (QuPath), parquet and overlay PNG writers: validity, determinism, atomicity."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq
import pytest
import shapely
from PIL import Image

from slidestream.errors import ConfigError
from slidestream.overlays import (
    MEASUREMENT_DISPLAY_NAMES,
    NUCLEUS_ID_NAMESPACE,
    MeasureFn,
    NucleusTable,
    class_map_to_polygons,
    extract_tile_nuclei,
    nucleus_ids,
    rebatch_tables,
    render_overlay_png,
    write_nuclei_geojson,
    write_nuclei_parquet,
    write_tissue_geojson,
)

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
    assert area == pytest.approx(tables[0].measurements["area_um2"][1], rel=5e-4)  # 4 digits
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


def check_round_trip(feats: list[dict[str, Any]], table: NucleusTable, *, as_points: bool) -> None:
    """Every feature of ``table``, in order: id, geometry within 0.005 px, measurements, class."""
    assert len(feats) == len(table)
    names = {k: MEASUREMENT_DISPLAY_NAMES.get(k, k) for k in table.measurement_names}
    for i, f in enumerate(feats):
        assert f["type"] == "Feature"
        assert f["id"] == str(uuid.uuid5(NUCLEUS_ID_NAMESPACE, f"fp:{i}"))
        geometry = f["geometry"]
        if as_points:
            assert geometry["type"] == "Point"
            expected = np.array([table.centroid_x[i], table.centroid_y[i]])
            got = np.array(geometry["coordinates"])
        else:
            assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1
            expected = table.coords[table.offsets[i] : table.offsets[i + 1]]
            got = np.array(geometry["coordinates"][0])
            assert got.shape == expected.shape and (got[0] == got[-1]).all()  # closed ring
        np.testing.assert_allclose(got, expected, rtol=0, atol=0.005 + 1e-9)
        props = f["properties"]
        assert props["objectType"] == "detection"
        cls = None if table.classes is None else str(table.classes[i])
        if cls in (None, "Unclassified"):
            assert "classification" not in props
        else:
            assert props["classification"]["name"] == cls
        meas = props["measurements"]
        for key, name in names.items():
            value = float(table.measurements[key][i])
            if not np.isfinite(value):
                assert name not in meas
                continue
            tolerance = max(5e-5, 5e-4 * abs(value)) if abs(value) < 1e4 else 0.5
            assert meas[name] == pytest.approx(value, abs=tolerance), (i, name)


@pytest.mark.parametrize("as_points", [False, True])
def test_geojson_round_trip(tmp_path: Path, tables: list[NucleusTable], as_points: bool) -> None:
    path = tmp_path / "n.geojson.gz"
    write_nuclei_geojson(
        path, tables, id_namespace="fp", class_colors=COLORS, as_points=as_points, chunk_size=64
    )
    feats = json.loads(gzip.decompress(path.read_bytes()))["features"]
    check_round_trip(feats, NucleusTable.concat(tables), as_points=as_points)


@pytest.fixture(scope="module")
def awkward(tables: list[NucleusTable]) -> NucleusTable:
    """Values that widen fields: x >= 100,000 px, x < 0, measurements < 0 or >= 1e6, long class."""
    t = NucleusTable.concat(tables)
    coords, meas = t.coords.copy(), {k: v.copy() for k, v in t.measurements.items()}
    classes = t.classes.copy() if t.classes is not None else np.full(len(t), "Tumor")
    for i, dx in ((3, 150_000.0), (10, -700.0), (20, 2_000_000.0)):
        coords[t.offsets[i] : t.offsets[i + 1], 0] += dx
    near = coords[t.offsets[30] : t.offsets[31]]
    near -= near.min(axis=0) - 0.5  # a nucleus near the origin (a valid outline moved there)
    meas["mean_r"][5] = -3.25
    meas["mean_g"][6] = 123_456.0
    meas["mean_b"][7] = 3.4e9
    meas["solidity"][8] = 9.99996
    for k in meas:  # no measurement at all
        meas[k][9] = np.nan
    meas["area_um2"][11] = np.inf
    classes[12] = "A class name longer than any in the colour table"
    return replace(t, coords=coords, measurements=meas, classes=classes)


@pytest.mark.parametrize("as_points", [False, True])
def test_geojson_same_text_for_any_chunking(
    tmp_path: Path, awkward: NucleusTable, as_points: bool
) -> None:
    texts = []
    for chunk_size in (20_000, 64, 7, 1):
        path = tmp_path / f"{chunk_size}.geojson"
        write_nuclei_geojson(
            path, [awkward], id_namespace="fp", class_colors=COLORS, as_points=as_points,
            chunk_size=chunk_size,
        )  # fmt: skip
        texts.append(path.read_bytes())
    assert all(t == texts[0] for t in texts[1:])
    assert b"\0" not in texts[0]
    feats = json.loads(texts[0])["features"]
    check_round_trip(feats, awkward, as_points=as_points)
    assert feats[9]["properties"]["measurements"] == {}
    assert feats[6]["properties"]["measurements"]["Green: Mean"] == 123456
    assert feats[8]["properties"]["measurements"]["Solidity"] == 10.0


def test_geojson_compresslevel_checked(tmp_path: Path, tables: list[NucleusTable]) -> None:
    for level in (-1, 13):
        with pytest.raises(ConfigError, match="compresslevel"):
            write_nuclei_geojson(tmp_path / "n.geojson.gz", tables, id_namespace="x",
                                 compresslevel=level)  # fmt: skip
    sizes = []
    for level in (0, 1, 6):
        path = tmp_path / f"n{level}.geojson.gz"
        write_nuclei_geojson(path, tables, id_namespace="x", compresslevel=level, chunk_size=100)
        sizes.append(path.stat().st_size)
        assert json.loads(gzip.decompress(path.read_bytes()))["features"]
    assert sizes[0] > sizes[1] >= sizes[2]


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


def test_rebatch_tables_keeps_order_and_outputs(tmp_path: Path, tables: list[NucleusTable]) -> None:
    """Blocks of >= min_nuclei (last may be smaller), empties dropped, same files as per tile."""
    empty = NucleusTable.empty(tables[0].measurement_names)
    tiles = [tables[0].slice(0, 3), empty, tables[0].slice(3, None), tables[1], empty]
    for t in tiles[2:4]:
        assert len(t) > 3
    blocks = list(rebatch_tables(tiles, 4))
    assert [len(b) for b in blocks] == [len(tables[0]), len(tables[1])]
    whole = NucleusTable.concat(tiles)
    np.testing.assert_array_equal(NucleusTable.concat(blocks).coords, whole.coords)
    (one,) = rebatch_tables(tiles, 10**9)
    assert one.offsets.tolist() == whole.offsets.tolist()
    assert list(rebatch_tables([empty], 1)) == []
    with pytest.raises(ConfigError, match="min_nuclei"):
        list(rebatch_tables(tiles, 0))

    def write(parts: list[NucleusTable], name: str) -> tuple[bytes, Any]:
        path = tmp_path / f"{name}.geojson"
        write_nuclei_geojson(
            path, parts, id_namespace="fp", class_colors=COLORS,
            parquet_path=tmp_path / f"{name}.parquet",
        )  # fmt: skip
        return path.read_bytes(), pq.read_table(tmp_path / f"{name}.parquet")

    per_tile, per_tile_pq = write(tiles, "tiles")
    batched, batched_pq = write(blocks, "blocks")
    assert batched == per_tile
    assert batched_pq.column_names == per_tile_pq.column_names
    for name in per_tile_pq.column_names:  # NaN-aware (one measurement is NaN)
        a, b = batched_pq[name].to_numpy(), per_tile_pq[name].to_numpy()
        np.testing.assert_array_equal(a, b)


def _typed(tables: list[NucleusTable]) -> list[NucleusTable]:
    """The classified tables with a type per nucleus (and ``p_*`` measurements)."""
    names = np.array(["epithelial", "inflammatory", "spindle", "other", ""])
    out = []
    for t in tables:
        k = np.arange(len(t)) % 5
        probs = {f"p_{n}": (k == i).astype(np.float64) * 0.7 + 0.1 for i, n in enumerate(names[:4])}
        out.append(replace(t, measurements={**t.measurements, **probs}).with_types(names[k]))
    return out


@pytest.mark.parametrize("classify_by", ["type", "tissue"])
def test_typed_nuclei_are_classified_by_type_with_tissue_class_as_metadata(
    tmp_path: Path, tables: list[NucleusTable], shared_tools: Path, classify_by: str
) -> None:
    from slidestream.overlays import NUCLEUS_TYPE_COLORS

    typed = _typed(tables)
    path = tmp_path / "nuclei.geojson.gz"
    pq_path = tmp_path / "nuclei.parquet"
    n = write_nuclei_geojson(
        path, typed, id_namespace="fp", class_colors=COLORS, chunk_size=37,
        parquet_path=pq_path, classify_by=classify_by,  # type: ignore[arg-type]
    )  # fmt: skip
    validate(shared_tools, path)
    features = json.loads(gzip.decompress(path.read_bytes()))["features"]
    assert len(features) == n == sum(len(t) for t in tables)
    types = np.concatenate([t.types for t in typed])  # type: ignore[misc]
    classes = np.concatenate([t.classes for t in typed])  # type: ignore[misc]
    for f, t, c in zip(features, types, classes, strict=True):
        props = f["properties"]
        qt = t.capitalize() if t else None
        tissue = None if c == "Unclassified" else str(c)
        if classify_by == "type":
            assert props.get("classification", {}).get("name") == qt
            if qt:
                assert props["classification"]["color"] == list(NUCLEUS_TYPE_COLORS[qt])
            assert props.get("metadata", {}).get("tissue_class") == tissue
        else:
            assert props.get("classification", {}).get("name") == tissue
            assert props.get("metadata", {}).get("nucleus_type") == qt
        assert "Type probability: Inflammatory" in props["measurements"]
    table = pq.read_table(pq_path)
    assert table.column("type").to_pylist() == [t or None for t in types.tolist()]
    assert table.column("p_inflammatory").to_numpy()[1] == pytest.approx(0.8)
    # the text does not depend on the chunking
    again = tmp_path / "again.geojson.gz"
    write_nuclei_geojson(
        again, typed, id_namespace="fp", class_colors=COLORS, chunk_size=1000,
        classify_by=classify_by,  # type: ignore[arg-type]
    )  # fmt: skip
    assert gzip.decompress(again.read_bytes()) == gzip.decompress(path.read_bytes())


def test_overlay_png_with_type_legend(tmp_path: Path) -> None:
    thumb = np.full((120, 160, 3), 230, np.uint8)
    poly = shapely.box(100, 100, 1500, 1100)
    pts = np.random.default_rng(0).uniform(200, 1000, (300, 2))
    w, h = render_overlay_png(
        tmp_path / "o.png", thumb, thumb_l0_scale=0.1, class_polygons={"Tumor": poly},
        class_colors=COLORS, nucleus_centroids_l0=pts, slide_mpp=0.5, density_of="Inflammatory",
        type_legend=[("Epithelial", (220, 50, 50), 700), ("Inflammatory", (40, 110, 255), 300)],
    )  # fmt: skip
    with Image.open(tmp_path / "o.png") as im:
        assert im.size == (w, h)
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    # the legend's type swatches are drawn in their fixed colours
    for colour in ((220, 50, 50), (40, 110, 255)):
        assert (pixels == colour).all(axis=1).any()
