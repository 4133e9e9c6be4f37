# ruff: noqa: E501
"""Annotation readers: QuPath GeoJSON (as QuPath writes it), ImageScope XML, ASAP XML, pairing."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely

from slidestream.annotated_mosaic import (
    qupath_feature,
    write_asap_xml,
    write_imagescope_xml,
    write_qupath_geojson,
)
from slidestream.errors import AnnotationError
from slidestream.tiling import pair_annotations, read_annotations

RED, GREEN, BLUE = (200, 0, 0), (0, 160, 60), (20, 60, 220)
ID = "0b9f8f0e-3a6f-4b7e-9a59-{:012d}"


def _qupath_file(tmp_path: Path, *, collection: bool = True, name: str = "s.geojson") -> Path:
    holed = shapely.Polygon(
        [(100, 100), (400, 100), (400, 400), (100, 400)],
        [[(200, 200), (300, 200), (300, 300), (200, 300)]],
    )
    multi = shapely.MultiPolygon([shapely.box(500, 100, 600, 200), shapely.box(700, 100, 800, 200)])
    feats = [
        qupath_feature(
            holed, object_id=ID.format(1), class_name="Tumor", class_color=RED, is_locked=True
        ),
        qupath_feature(
            multi,
            object_id=ID.format(2),
            class_name="Stroma",
            class_color=GREEN,
            measurements={"Area µm^2": 5000.0},
        ),
        qupath_feature(
            shapely.Point(150.5, 150.25), object_id=ID.format(3), class_name="Immune cells"
        ),
        qupath_feature(
            shapely.MultiPoint([(10, 10), (20, 20)]), object_id=ID.format(4), class_name=None
        ),
        qupath_feature(shapely.box(0, 0, 50, 50), object_id=ID.format(5), class_name="Ignore*"),
        # A necrosis region drawn inside the tumour: the smaller region wins where they overlap.
        qupath_feature(
            shapely.box(120, 120, 180, 180),
            object_id=ID.format(6),
            class_name="Necrosis",
            class_color=BLUE,
        ),
    ]
    return write_qupath_geojson(tmp_path / name, feats, feature_collection=collection)


def test_qupath_feature_collection(tmp_path: Path) -> None:
    ann = read_annotations(_qupath_file(tmp_path), dimensions=(1000, 800))
    assert ann.format == "qupath-geojson"
    assert ann.classes() == ("Immune cells", "Necrosis", "Stroma", "Tumor")
    assert ann.unclassified == 1 and ann.ignored == 1 and ann.skipped == 0
    assert ann.class_colors() == {
        "Tumor": RED,
        "Stroma": GREEN,
        "Necrosis": BLUE,
        "Immune cells": (128, 128, 128),
    }
    regions = ann.regions()
    assert set(regions) == {"Tumor", "Stroma", "Necrosis"}
    # hole kept; the necrosis square carved out of the tumour
    assert regions["Tumor"].area == pytest.approx(300 * 300 - 100 * 100 - 60 * 60)
    assert regions["Necrosis"].area == pytest.approx(3600)
    assert regions["Stroma"].area == pytest.approx(20000)
    xy, names = ann.points(include_unclassified=True)
    assert (150.5, 150.25) in [tuple(p) for p in xy.tolist()]
    assert names.count(None) == 2  # the MultiPoint's two points


def test_qupath_bare_array_and_gzip(tmp_path: Path) -> None:
    plain = _qupath_file(tmp_path, collection=False, name="a.geojson")
    gz = tmp_path / "b.geojson.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    a = read_annotations(plain)
    b = read_annotations(gz)
    assert a.classes() == b.classes() and len(a.objects) == len(b.objects) == 5


def test_qupath_forms_qupath_accepts(tmp_path: Path) -> None:
    """String classification, derived class, legacy objectType, bare geometry, NaN tokens."""
    doc = (
        '{"type":"FeatureCollection","features":['
        '{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[0, 0], [10, 0], [10, 10], [0, 0]]],'
        '"plane":{"c":-1,"z":0,"t":0}},"properties":{"object_type":"detection","classification":"Tumor: Positive",'
        '"measurements":{"x": NaN}}},'
        '{"type":"Feature","geometry":{"type":"Point","coordinates":[5, 5]},'
        '"properties":{"objectType":"cell","classification":{"names":["Tumor","Negative"],"color":[1,2,3]}}},'
        '{"type":"Feature","geometry":{"type":"LineString","coordinates":[[0, 0], [5, 5]]},"properties":{}}'
        "]}"
    )
    p = tmp_path / "forms.geojson"
    p.write_text(doc, encoding="utf-8")
    ann = read_annotations(p)
    assert [o.class_name for o in ann.objects] == ["Tumor: Positive", "Tumor: Negative"]
    assert [o.object_type for o in ann.objects] == ["detection", "cell"]
    assert ann.skipped == 1
    bare = tmp_path / "bare.json"
    bare.write_text(
        '{"type":"Polygon","coordinates":[[[0,0],[4,0],[4,4],[0,0]]]}', encoding="utf-8"
    )
    assert read_annotations(bare).unclassified == 1


def test_written_geojson_passes_the_qupath_checker(tmp_path: Path, shared_tools: Path) -> None:
    path = _qupath_file(tmp_path)
    res = subprocess.run(
        [
            sys.executable,
            str(shared_tools / "check_qupath_geojson.py"),
            str(path),
            "--width",
            "1000",
            "--height",
            "800",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"type":"FeatureCollection","features":[{"type":"Feature","geometry":{"type":"Circle","coordinates":[1,2]},"properties":{}}]}',
            "unknown geometry type 'Circle'",
        ),
        (
            '{"type":"FeatureCollection","features":[{"type":"Feature","geometry":null,"properties":{}}]}',
            "feature 0 has no geometry",
        ),
        (
            '{"type":"FeatureCollection","features":[{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1]]]},"properties":{}}]}',
            "at least 4 positions",
        ),
        (
            '{"type":"FeatureCollection","features":[{"type":"Feature","geometry":{"type":"Point","coordinates":[1]},"properties":{}}]}',
            "feature 0: invalid Point",
        ),
        ('{"type": "FeatureCollection", "features": [', "not valid JSON"),
        ('{"type":"Topology"}', "GeoJSON type 'Topology'"),
        (
            '{"type":"FeatureCollection","features":[{"type":"Feature","geometry":{"type":"Point","coordinates":[5000,5]},"properties":{}}]}',
            "outside the slide",
        ),
    ],
)
def test_malformed_geojson_one_line(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.geojson"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(AnnotationError) as err:
        read_annotations(p, dimensions=(1000, 1000))
    assert message in str(err.value) and str(p) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="cannot read annotation file"):
        read_annotations(tmp_path / "none.geojson")
    other = tmp_path / "a.csv"
    other.write_text("x", encoding="utf-8")
    with pytest.raises(AnnotationError, match="unknown annotation file type"):
        read_annotations(other)
    xml = tmp_path / "a.xml"
    xml.write_text("<Foo/>", encoding="utf-8")
    with pytest.raises(AnnotationError, match="neither <Annotations>"):
        read_annotations(xml)
    xml.write_text("<Annotations><Annotation", encoding="utf-8")
    with pytest.raises(AnnotationError, match="not well-formed XML"):
        read_annotations(xml)


def _layers() -> list[tuple[str, tuple[int, int, int], list[shapely.Geometry]]]:
    return [
        ("tumour", RED, [shapely.box(10, 10, 110, 110), shapely.box(200, 10, 260, 70)]),
        ("stroma", GREEN, [shapely.box(10, 200, 90, 280)]),
        ("lymphocyte", BLUE, [shapely.Point(300.5, 300.5)]),
    ]


@pytest.mark.parametrize("name_in", ["Name", "Attribute"])
def test_imagescope_xml(tmp_path: Path, name_in: str) -> None:
    p = write_imagescope_xml(tmp_path / "s.xml", _layers(), mpp=0.25, name_in=name_in)
    ann = read_annotations(p, dimensions=(400, 400))
    assert ann.format == "imagescope-xml"
    assert ann.classes() == ("lymphocyte", "stroma", "tumour")
    assert ann.class_colors()["tumour"] == RED
    assert ann.regions()["tumour"].area == pytest.approx(100 * 100 + 60 * 60)
    _xy, names = ann.points(include_unclassified=False)
    assert names.count("lymphocyte") == 1


def test_imagescope_negative_region_ellipse_and_monuseg_shape(tmp_path: Path) -> None:
    """MoNuSeg-like file (no Name, default Description attribute: unclassified), plus a hole."""
    xml = """<Annotations MicronsPerPixel="0.252000">
<Annotation Id="1" Name="" ReadOnly="0" NameReadOnly="0" LineColorReadOnly="0" Incremental="0" Type="4" LineColor="65280" Visible="1" Selected="1" MarkupImagePath="" MacroName="">
<Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>
<Regions><RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/></RegionAttributeHeaders>
<Region Id="1" Type="0" Zoom="0.042148" Selected="0" ImageLocation="" ImageFocus="0" Length="44.5" Area="125.2" LengthMicrons="11.2" AreaMicrons="7.9" Text="" NegativeROA="0" InputRegionId="0" Analyze="1" DisplayId="1">
<Attributes/><Vertices><Vertex X="372.5" Y="551" Z="0"/><Vertex X="380" Y="551" Z="0"/><Vertex X="380" Y="560.25" Z="0"/></Vertices></Region>
</Regions><Plots/></Annotation>
<Annotation Id="2" Name="Tumor" LineColor="255" Type="4"><Regions>
<Region Id="1" Type="1" NegativeROA="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="100" Y="0"/><Vertex X="100" Y="100"/><Vertex X="0" Y="100"/></Vertices></Region>
<Region Id="2" Type="0" NegativeROA="1"><Vertices><Vertex X="10" Y="10"/><Vertex X="20" Y="10"/><Vertex X="20" Y="20"/><Vertex X="10" Y="20"/></Vertices></Region>
<Region Id="3" Type="2" NegativeROA="0"><Vertices><Vertex X="200" Y="200"/><Vertex X="240" Y="220"/></Vertices></Region>
<Region Id="4" Type="4" NegativeROA="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="50" Y="50"/></Vertices></Region>
</Regions></Annotation>
</Annotations>"""
    p = tmp_path / "TCGA-XX.xml"
    p.write_text(xml, encoding="utf-8")
    ann = read_annotations(p, dimensions=(1000, 1000))
    assert ann.unclassified == 1 and ann.skipped == 1
    tumour = ann.regions()["Tumor"]
    ellipse = np.pi * 20 * 10
    assert tumour.area == pytest.approx(100 * 100 - 100 + ellipse, rel=0.01)
    assert ann.class_colors()["Tumor"] == (255, 0, 0)
    bad = tmp_path / "bad.xml"
    bad.write_text(xml.replace('Type="4" NegativeROA', 'Type="9" NegativeROA'), encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"Annotation 2 Region 4: unknown region Type='9'"):
        read_annotations(bad)
    bad.write_text(xml.replace('X="380" Y="551"', 'X="abc" Y="551"'), encoding="utf-8")
    with pytest.raises(AnnotationError, match="X='abc' is not a number"):
        read_annotations(bad)


def test_asap_xml(tmp_path: Path) -> None:
    p = write_asap_xml(tmp_path / "s.xml", _layers())
    ann = read_annotations(p, dimensions=(400, 400))
    assert ann.format == "asap-xml"
    assert ann.classes() == ("lymphocyte", "stroma", "tumour")
    assert ann.class_colors()["stroma"] == GREEN
    assert ann.regions()["stroma"].area == pytest.approx(6400)
    text = p.read_text(encoding="utf-8").replace('Type="Dot"', 'Type="Circle"')
    p.write_text(text, encoding="utf-8")
    with pytest.raises(AnnotationError, match="unknown annotation Type='Circle'"):
        read_annotations(p)


def test_class_map_and_self_intersection(tmp_path: Path) -> None:
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    doc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": bowtie, "properties": {"classification": "Tumor"}},
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[20, 20], [30, 20], [30, 30], [20, 20]]],
                },
                "properties": {"classification": "Fat"},
            },
        ],
    }
    p = tmp_path / "m.geojson"
    p.write_text(json.dumps(doc), encoding="utf-8")
    ann = read_annotations(p, class_map={"Tumor": "tumour", "Fat": "-"})
    assert ann.classes() == ("tumour",) and ann.ignored == 1
    assert ann.regions()["tumour"].area == pytest.approx(50.0)


def test_pairing(tmp_path: Path) -> None:
    slides = [tmp_path / "a.svs", tmp_path / "b.tiff", tmp_path / "c.ndpi"]
    for s in slides:
        s.write_bytes(b"")
    folder = tmp_path / "ann"
    folder.mkdir()
    (folder / "a.geojson").write_text("[]", encoding="utf-8")
    (folder / "b.tiff.geojson.gz").write_bytes(b"")
    other = tmp_path / "anything.xml"
    other.write_text("<Annotations/>", encoding="utf-8")
    pairs = pair_annotations(slides, [folder, f"c.ndpi={other}"])
    assert [(s.name, a.name) for s, a in pairs] == [
        ("a.svs", "a.geojson"),
        ("b.tiff", "b.tiff.geojson.gz"),
        ("c.ndpi", "anything.xml"),
    ]
    with pytest.raises(
        AnnotationError, match=r"c.ndpi: no annotation file .*--annotations c.ndpi=FILE"
    ):
        pair_annotations(slides, [folder])
    (folder / "a.xml").write_text("<Annotations/>", encoding="utf-8")
    with pytest.raises(AnnotationError, match="several annotation files match"):
        pair_annotations(slides[:1], [folder])
