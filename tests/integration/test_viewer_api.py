"""``slidestream view``: every endpoint and every bad input, on a real run (ASGI test client).

The output folder of one ``slidestream run`` is copied and salted with the cases a viewer must
survive: a slide whose file disappeared, a corrupt slide file, a slide folder and a result file
that are symbolic links out of OUT, a failure recorded in failures.csv, an interrupted slide
and a staging folder.
"""

from __future__ import annotations

import csv
import gzip
import http.client
import io
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import text
from starlette.testclient import TestClient

from slidestream.cli import cli
from slidestream.db import connect_read_only
from slidestream.viewer import TYPE_COLOURS, ViewerConfig, create_app, is_loopback
from slidestream.wsi import open_slide

GOOD = "demo slide é"  # the slide of the viewer_run fixture (tests/integration/conftest.py)
GOOD_URL = quote(GOOD, safe="")
SECRET = "TOP-SECRET-CONTENT-OUTSIDE-OUT"


@pytest.fixture(scope="module")
def salted_out(viewer_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("viewer-salted")
    out = root / "out"
    shutil.copytree(viewer_run, out, symlinks=True)
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    summary = json.loads((out / GOOD / "summary.json").read_text())

    def clone(name: str, slide_path: str) -> Path:
        folder = out / name
        shutil.copytree(out / GOOD, folder)
        data = json.loads(json.dumps(summary))
        data["slide"]["path"] = slide_path
        (folder / "summary.json").write_text(json.dumps(data))
        return folder

    clone("missing-slide", str(root / "gone" / "slide.svs"))
    corrupt = root / "corrupt.svs"
    corrupt.write_bytes(b"II*\x00" + b"\x00" * 256)
    clone("corrupt-slide", str(corrupt))
    linked = clone("linked-file", summary["slide"]["path"])
    (linked / "tissue.geojson").unlink()
    (linked / "tissue.geojson").symlink_to(outside / "secret.txt")
    escape = outside / "escape"
    shutil.copytree(out / GOOD, escape)
    (out / "escape").symlink_to(escape, target_is_directory=True)
    (out / "interrupted").mkdir()
    (out / "interrupted" / "tissue_mask.png").write_bytes(b"")
    (out / ".staged.partial").mkdir()
    with (out / "failures.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "error", "time"])
        writer.writerow(["/data/broken-input.svs", "broken-input.svs: not a slide", "2026-01-01"])
    return out


@pytest.fixture(scope="module")
def client(salted_out: Path) -> Iterator[TestClient]:
    engine = connect_read_only(f"sqlite:///{salted_out / 'slidestream.db'}")
    app = create_app(ViewerConfig(out_dir=salted_out), engine=engine)
    with TestClient(app) as test_client:
        yield test_client


def _summary(out: Path, name: str = GOOD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / name / "summary.json").read_text())
    return data


# ----------------------------------------------------------------------------- listing and pages


def test_slide_list_api_statuses_and_headline_statistics(
    client: TestClient, salted_out: Path
) -> None:
    rows = {r["name"]: r for r in client.get("/api/slides").json()}
    assert "escape" not in rows and ".staged.partial" not in rows
    good = rows[GOOD]
    stats = _summary(salted_out)["statistics"]
    assert good["status"] == "done" and good["viewable"]
    assert good["nucleus_count"] == stats["nucleus_count"] > 50
    assert good["tissue_area_mm2"] == pytest.approx(stats["tissue_area_mm2"])
    assert good["nuclei_per_mm2"] == pytest.approx(stats["nuclei_per_mm2"])
    assert good["nucleus_area_median_um2"] == stats["nucleus_area_um2"]["median"]
    assert set(good["class_fractions"]) == set(stats["classes"])
    assert rows["broken-input"]["status"] == "failed"
    assert "not a slide" in rows["broken-input"]["reason"]
    assert rows["interrupted"]["status"] == "incomplete" and not rows["interrupted"]["viewable"]


def test_slide_list_page_links_each_slide_by_name(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert f'<a class="slide-link" href="/slides/{GOOD_URL}">{GOOD}</a>' in page.text
    assert "broken-input" in page.text and "not a slide" in page.text
    assert "content-security-policy" in page.headers
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_slide_page_and_static_assets(client: TestClient) -> None:
    page = client.get(f"/slides/{GOOD_URL}")
    assert page.status_code == 200
    assert f'data-slide="{GOOD}"' in page.text
    for asset in (
        "/static/openseadragon/openseadragon.min.js",
        "/static/slide.js",
        "/static/plots.js",
        "/static/viewer.css",
        "/static/openseadragon/images/zoomin_rest.png",
    ):
        assert client.get(asset).status_code == 200, asset
    assert "6.1.1" in client.get("/static/openseadragon/openseadragon.min.js").text[:200]
    assert "http://" not in page.text and "https://" not in page.text  # no CDN


def test_slide_info_summary_and_tissue(client: TestClient, salted_out: Path) -> None:
    info = client.get(f"/api/slides/{GOOD_URL}").json()
    summary = _summary(salted_out)
    assert info["dimensions"] == [summary["slide"]["width"], summary["slide"]["height"]]
    assert info["mpp"] == pytest.approx(summary["slide"]["mpp_x"])
    assert info["layers"] == {"tissue": True, "nuclei": True, "outlines": True, "overlay_png": True}
    assert info["nuclei"]["count"] == summary["statistics"]["nucleus_count"]
    assert info["nuclei"]["colour_key"] == "type"  # the default model types nuclei
    assert client.get(f"/api/slides/{GOOD_URL}/summary").json() == summary
    tissue = json.loads((salted_out / GOOD / "tissue.geojson").read_text())
    assert client.get(f"/api/slides/{GOOD_URL}/tissue").json() == tissue
    for f in tissue["features"]:
        cls = f["properties"]["classification"]
        assert info["tissue_colours"][cls["name"]] == cls["color"]
        assert info["nuclei"]["colours"].get(cls["name"], cls["color"]) == cls["color"]
    overlay = client.get(f"/api/slides/{GOOD_URL}/overlay.png")
    assert overlay.status_code == 200
    assert overlay.content == (salted_out / GOOD / "overlay.png").read_bytes()
    thumb = Image.open(io.BytesIO(client.get(f"/api/slides/{GOOD_URL}/thumbnail.jpeg").content))
    assert max(thumb.size) == 320


def test_json_is_gzipped_when_asked(client: TestClient) -> None:
    r = client.get(
        f"/api/slides/{GOOD_URL}/nuclei?bbox=0,0,100000,100000", headers={"accept-encoding": "gzip"}
    )
    assert r.headers["content-encoding"] == "gzip"
    assert r.json()["count"] > 50


# ----------------------------------------------------------------------------- DeepZoom tiles


def _dzi(client: TestClient, layer: str) -> tuple[int, int, int, int]:
    xml = client.get(f"/api/slides/{GOOD_URL}/{layer}.dzi").text
    assert 'xmlns="http://schemas.microsoft.com/deepzoom/2008"' in xml
    tile = int(xml.split('TileSize="')[1].split('"')[0])
    overlap = int(xml.split('Overlap="')[1].split('"')[0])
    width = int(xml.split('Width="')[1].split('"')[0])
    height = int(xml.split('Height="')[1].split('"')[0])
    return width, height, tile, overlap


def test_slide_tiles_match_the_slide_pixels(client: TestClient, salted_out: Path) -> None:
    width, height, tile, overlap = _dzi(client, "slide")
    summary = _summary(salted_out)
    assert (width, height) == (summary["slide"]["width"], summary["slide"]["height"])
    top = int(np.ceil(np.log2(max(width, height))))
    r = client.get(f"/api/slides/{GOOD_URL}/slide_files/{top}/1_1.jpeg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), np.float64)
    x0 = y0 = tile - overlap
    size = tile + 2 * overlap
    assert got.shape == (size, size, 3)
    with open_slide(summary["slide"]["path"]) as slide:
        want = slide.read_region((x0, y0), (size, size)).astype(np.float64)
    assert np.abs(got - want).mean() < 4.0  # JPEG re-encoding only
    # one level up is the area-average of four level-0 pixels
    r2 = client.get(f"/api/slides/{GOOD_URL}/slide_files/{top - 1}/0_0.jpeg")
    small = np.asarray(Image.open(io.BytesIO(r2.content)).convert("RGB"), np.float64)
    assert small.shape == (tile + overlap, tile + overlap, 3)
    # the single pixel of level 0 is the slide's mean colour
    one = np.asarray(
        Image.open(
            io.BytesIO(client.get(f"/api/slides/{GOOD_URL}/slide_files/0/0_0.jpeg").content)
        ).convert("RGB")
    )
    assert one.shape == (1, 1, 3)


def test_tiles_are_cached(client: TestClient) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    url = f"/api/slides/{GOOD_URL}/slide_files/9/0_0.jpeg"
    first = client.get(url).content
    hits = service.tiles.hits
    assert client.get(url).content == first
    assert service.tiles.hits == hits + 1


def test_nucleus_tiles_draw_nuclei_where_they_are(client: TestClient, salted_out: Path) -> None:
    width, height, tile, overlap = _dzi(client, "nuclei")
    top = int(np.ceil(np.log2(max(width, height))))
    table = pq.read_table(salted_out / GOOD / "nuclei.parquet").to_pydict()
    info = client.get(f"/api/slides/{GOOD_URL}").json()
    colours = {tuple(c) for c in info["nuclei"]["colours"].values()}
    # a finest-level tile around the first nucleus has its colour at its centroid
    x, y = table["centroid_x"][0], table["centroid_y"][0]
    col, row = int(x // tile), int(y // tile)
    r = client.get(f"/api/slides/{GOOD_URL}/nuclei_files/{top}/{col}_{row}.png")
    rgba = np.asarray(Image.open(io.BytesIO(r.content)))
    assert rgba.shape[2] == 4
    u = int(x - (col * tile - (overlap if col else 0)))
    v = int(y - (row * tile - (overlap if row else 0)))
    assert rgba[v, u, 3] > 100 and tuple(int(c) for c in rgba[v, u, :3]) in colours
    # far away from every nucleus: transparent
    xs, ys = np.asarray(table["centroid_x"]), np.asarray(table["centroid_y"])
    empty = None
    cols, rows = -(-width // tile), -(-height // tile)
    for c in range(cols):
        for rr in range(rows):
            near = (xs > c * tile - 40) & (xs < (c + 1) * tile + 40) & (ys > rr * tile - 40)
            if not (near & (ys < (rr + 1) * tile + 40)).any():
                empty = (c, rr)
                break
        if empty:
            break
    assert empty is not None
    blank = np.asarray(
        Image.open(
            io.BytesIO(
                client.get(
                    f"/api/slides/{GOOD_URL}/nuclei_files/{top}/{empty[0]}_{empty[1]}.png"
                ).content
            )
        )
    )
    assert blank[..., 3].max() == 0
    # zoomed out: the density map covers the tissue
    low = np.asarray(
        Image.open(
            io.BytesIO(client.get(f"/api/slides/{GOOD_URL}/nuclei_files/{top - 4}/0_0.png").content)
        )
    )
    assert (low[..., 3] > 0).mean() > 0.1


def test_bad_tile_coordinates_and_levels_are_404(client: TestClient) -> None:
    width, height, tile, _ = _dzi(client, "slide")
    top = int(np.ceil(np.log2(max(width, height))))
    cols = -(-width // tile)
    for layer, ext in (("slide", "jpeg"), ("nuclei", "png")):
        base = f"/api/slides/{GOOD_URL}/{layer}_files"
        for path in (
            f"{top + 1}/0_0.{ext}",
            f"{top}/{cols}_0.{ext}",
            f"{top}/0_99999999999999999999.{ext}",
            f"-1/0_0.{ext}",
            f"{top}/-1_0.{ext}",
            f"{top}/a_0.{ext}",
            f"{top}/0_0.gif",
            f"{top}/0.{ext}",
            f"{top}/0_0_0.{ext}",
        ):
            r = client.get(f"{base}/{path}")
            assert r.status_code == 404, (path, r.status_code)
            assert "Traceback" not in r.text


def test_unknown_slides_and_files_are_404(client: TestClient) -> None:
    for url in (
        "/slides/nope",
        "/api/slides/nope",
        "/api/slides/nope/summary",
        "/api/slides/nope/slide.dzi",
        "/api/slides/nope/slide_files/0/0_0.jpeg",
        f"/api/slides/{GOOD_URL}/secrets.txt",
        "/api/slides/interrupted/summary",
        "/slides/interrupted",
        "/api/slides/broken-input",
        "/no/such/page",
    ):
        r = client.get(url)
        assert r.status_code == 404, url
        assert "Traceback" not in r.text


# ----------------------------------------------------------------------------- nuclei in a box


def test_nuclei_in_a_box_match_the_parquet_and_geojson(
    client: TestClient, salted_out: Path
) -> None:
    table = pq.read_table(salted_out / GOOD / "nuclei.parquet").to_pydict()
    xs, ys = np.asarray(table["centroid_x"]), np.asarray(table["centroid_y"])
    box = (300.0, 200.0, 1100.0, 900.0)
    inside = np.flatnonzero((xs >= box[0]) & (xs < box[2]) & (ys >= box[1]) & (ys < box[3]))
    assert inside.size > 10
    fc = client.get(f"/api/slides/{GOOD_URL}/nuclei?bbox={','.join(map(str, box))}").json()
    assert fc["type"] == "FeatureCollection" and fc["outlines"] and not fc["truncated"]
    assert fc["count"] == inside.size == len(fc["features"])
    assert sorted(f["properties"]["index"] for f in fc["features"]) == inside.tolist()
    with gzip.open(salted_out / GOOD / "nuclei.geojson.gz", "rt", encoding="utf-8") as fh:
        reference = json.load(fh)["features"]
    for f in fc["features"]:
        i = f["properties"]["index"]
        assert f["id"] == table["id"][i] == reference[i]["id"]
        assert f["geometry"] == reference[i]["geometry"]
        assert f["properties"]["measurements"]["Area µm^2"] == pytest.approx(table["area_um2"][i])
        # the default model types nuclei: the class is the type, the tissue class is kept
        assert f["properties"]["class"] == table["type"][i]
        assert f["properties"]["tissue_class"] == (table["tissue_class"][i] or "Unclassified")


def test_nuclei_limit_keeps_those_nearest_the_centre(client: TestClient) -> None:
    fc = client.get(f"/api/slides/{GOOD_URL}/nuclei?bbox=0,0,100000,100000&limit=5").json()
    assert fc["truncated"] and fc["count"] > 5 and len(fc["features"]) == 5


@pytest.mark.parametrize(
    "query",
    ["", "bbox=1,2,3", "bbox=a,b,c,d", "bbox=5,5,1,1", "bbox=0,0,nan,10", "bbox=0,0,1,1&limit=x"],
)
def test_nuclei_bad_box_is_400(client: TestClient, query: str) -> None:
    r = client.get(f"/api/slides/{GOOD_URL}/nuclei?{query}")
    assert r.status_code == 400 and "error" in r.json()


# ----------------------------------------------------------------------------- safety


def test_symlinks_out_of_out_are_not_served(client: TestClient) -> None:
    assert client.get("/api/slides/escape").status_code == 404
    assert client.get("/slides/escape").status_code == 404
    r = client.get("/api/slides/linked-file/tissue")
    assert r.status_code == 404 and SECRET not in r.text
    assert client.get("/api/slides/linked-file").json()["layers"]["tissue"] is False


@pytest.fixture(scope="module")
def live_url(
    salted_out: Path, live_server: Callable[[object], AbstractContextManager[str]]
) -> Iterator[str]:
    with live_server(create_app(ViewerConfig(out_dir=salted_out))) as url:
        yield url


@pytest.mark.parametrize(
    "raw",
    [
        "/api/slides/../summary",
        "/api/slides/%2e%2e/summary",
        "/api/slides/%2E%2E%2Foutside%2Fsecret.txt/summary",
        "/api/slides/..%2F..%2Foutside/summary",
        "/api/slides/%2Fetc%2Fpasswd/summary",
        "/api/slides//etc/passwd/summary",
        "/slides/%2e%2e%2f%2e%2e%2foutside",
        "/static/../failures.csv",
        "/static/%2e%2e/%2e%2e/failures.csv",
        "/static/..%2f..%2ffailures.csv",
        "/static/%252e%252e/failures.csv",
        "/api/slides/escape/tissue",
        "/api/slides/linked-file/tissue",
    ],
)
def test_paths_from_urls_never_reach_the_file_system(live_url: str, raw: str) -> None:
    parts = urlsplit(live_url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    conn.request("GET", raw)  # sent as written: no client-side normalisation
    response = conn.getresponse()
    body = response.read().decode("utf-8", "replace")
    conn.close()
    assert response.status in (400, 404), (raw, response.status)
    assert SECRET not in body and "broken-input" not in body and "root:" not in body


def test_missing_and_corrupt_slides_get_clear_errors_others_keep_working(
    client: TestClient,
) -> None:
    page = client.get("/slides/missing-slide")
    assert page.status_code == 404
    assert "slide file missing" in page.text and "Traceback" not in page.text
    tile = client.get("/api/slides/missing-slide/slide_files/11/0_0.jpeg")
    assert tile.status_code == 404 and "slide file missing" in tile.text
    bad = client.get("/slides/corrupt-slide")
    assert bad.status_code in (404, 500) and "corrupt.svs" in bad.text
    assert "Traceback" not in bad.text
    assert client.get("/api/slides/corrupt-slide/slide.dzi").status_code in (404, 500)
    # the statistics and overlays of those slides are still there, and the good slide works
    assert client.get("/api/slides/missing-slide/summary").status_code == 200
    assert client.get("/api/slides/missing-slide/nuclei_files/11/0_0.png").status_code == 200
    assert client.get(f"/slides/{GOOD_URL}").status_code == 200
    assert client.get(f"/api/slides/{GOOD_URL}/slide_files/11/0_0.jpeg").status_code == 200


def test_a_slide_removed_while_serving(client: TestClient, salted_out: Path) -> None:
    folder = salted_out / "removed-later"
    shutil.copytree(salted_out / GOOD, folder)
    assert client.get("/api/slides/removed-later/summary").status_code == 200
    shutil.rmtree(folder)
    assert client.get("/api/slides/removed-later/summary").status_code == 404
    assert client.get(f"/api/slides/{GOOD_URL}/summary").status_code == 200


def test_untrusted_host_header_is_refused(salted_out: Path) -> None:
    app = create_app(ViewerConfig(out_dir=salted_out), allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1") as local:
        assert local.get("/api/slides").status_code == 200
    with TestClient(app, base_url="http://evil.example") as remote:
        assert remote.get("/api/slides").status_code == 400


def test_binds_loopback_by_default_and_warns_otherwise() -> None:
    view = cli.commands["view"]
    host = next(p for p in view.params if p.name == "host")
    assert host.default == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    result = CliRunner().invoke(cli, ["view", "/no/such/folder"])
    assert result.exit_code == 2


# ----------------------------------------------------------------------------- database


def test_database_is_opened_read_only(client: TestClient) -> None:
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="readonly"), engine.begin() as conn:
        conn.execute(text("DELETE FROM slides"))


def test_cohort_api_and_csv(client: TestClient, salted_out: Path) -> None:
    options = client.get("/api/cohort/options").json()
    assert "vendor" in options["by"] and "nuclei_per_mm2" in options["slide_metrics"]
    assert set(options["classes"]) == set(_summary(salted_out)["statistics"]["classes"])
    result = client.get("/api/cohort?by=vendor&metric=nuclei_per_mm2,tissue_area_mm2").json()
    assert result["metrics"] == ["nuclei_per_mm2", "tissue_area_mm2"]
    first = result["summary"][0]
    assert first["vendor"] == "aperio" and first["n"] == 1
    stats = _summary(salted_out)["statistics"]
    assert first["median"] == pytest.approx(stats["nuclei_per_mm2"])
    (one,) = result["slides"]
    assert one["name"] == GOOD and one["group"] == ["aperio"]
    assert one["values"]["tissue_area_mm2"] == pytest.approx(stats["tissue_area_mm2"])
    cls = options["classes"][0]
    per_class = client.get(f"/api/cohort?class={cls}&metric=area_mm2").json()
    assert per_class["slides"][0]["values"]["area_mm2"] == pytest.approx(
        stats["classes"][cls]["area_mm2"]
    )
    table = client.get("/api/cohort.csv?by=vendor&metric=nuclei_per_mm2")
    assert table.headers["content-type"].startswith("text/csv")
    assert "attachment" in table.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert rows[0]["vendor"] == "aperio" and float(rows[0]["median"]) == pytest.approx(
        stats["nuclei_per_mm2"]
    )
    per_slide = list(csv.DictReader(io.StringIO(client.get("/api/cohort.csv?per=slide").text)))
    assert per_slide[0]["slide"] == GOOD
    assert client.get("/api/cohort?metric=no_such_metric").status_code == 400
    assert client.get("/api/cohort?where=broken").status_code == 400
    assert client.get("/cohort").status_code == 200


def test_without_a_database_there_is_no_cohort_page(salted_out: Path) -> None:
    with TestClient(create_app(ViewerConfig(out_dir=salted_out))) as plain:
        assert plain.get("/cohort").status_code == 404
        assert plain.get("/api/cohort").status_code == 404
        assert plain.get("/api/slides").status_code == 200


def test_nuclei_are_coloured_by_type_when_the_column_exists(
    salted_out: Path, tmp_path: Path
) -> None:
    import pyarrow as pa

    out = tmp_path / "out"
    shutil.copytree(salted_out / GOOD, out / GOOD)
    path = out / GOOD / "nuclei.parquet"
    table = pq.read_table(path)
    typed_columns = ("type", "p_other", "p_inflammatory", "p_epithelial", "p_spindle")
    table = table.drop_columns([c for c in typed_columns if c in table.column_names])
    types = np.array(["epithelial", "inflammatory", "spindle", "other"])[
        np.arange(table.num_rows) % 4
    ]
    table = table.append_column("type", pa.array(types.tolist()))
    for name in ("p_other", "p_inflammatory", "p_epithelial", "p_spindle"):
        table = table.append_column(name, pa.array(np.full(table.num_rows, 0.25)))
    pq.write_table(table, path)
    with TestClient(create_app(ViewerConfig(out_dir=out))) as typed:
        info = typed.get(f"/api/slides/{GOOD_URL}").json()
        assert info["nuclei"]["colour_key"] == "type"
        assert info["nuclei"]["colours"]["spindle"] == list(TYPE_COLOURS["spindle"])
        fc = typed.get(f"/api/slides/{GOOD_URL}/nuclei?bbox=0,0,100000,100000&limit=20000").json()
        by_index = {f["properties"]["index"]: f["properties"] for f in fc["features"]}
        assert by_index[2]["class"] == "spindle" and by_index[2]["colour"] == list(
            TYPE_COLOURS["spindle"]
        )
        assert by_index[2]["tissue_class"] == (
            table.column("tissue_class")[2].as_py() or "Unclassified"
        )
        assert by_index[2]["measurements"]["Type probability: Spindle"] == 0.25
