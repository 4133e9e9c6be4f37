"""Parsers of annotation files: QuPath GeoJSON, Aperio ImageScope XML and ASAP XML.

Each parser turns one file into :class:`RawObject` values (a shapely geometry in the file's own
level-0 px frame, a class name or ``None``, a colour, and where in the file it came from);
:mod:`._annotations` checks them against the slide and builds the class regions. Every error is
one line naming the file, the object and the problem.

What is read, per format:

* **QuPath GeoJSON** (*File > Export objects as GeoJSON*, ``exportObjectsToGeoJson``): a
  FeatureCollection, a bare array of Features (QuPath without the FeatureCollection option), one
  Feature or one bare geometry; ``.gz`` is gunzipped. ``properties.objectType`` (aliases
  ``object_type``, ``type``; missing = annotation), ``properties.classification`` as an object
  ``{"name" | "names", "color"}`` or a string (``"Tumor: Positive"`` is a derived class, kept as
  that name), ``nucleusGeometry`` of cells (used for nucleus points). ``isLocked``,
  ``measurements``, ``metadata``, ``name``, ``plane`` and ``isEllipse`` are ignored. Geometry
  structure is checked with the ``geojson`` package (closed rings of >= 4 positions, 2-3 numbers
  per position). Bare ``NaN`` tokens of QuPath 0.4 measurements are tolerated.
* **Aperio ImageScope XML**: ``Annotations/Annotation/Regions/Region/Vertices/Vertex``. The class
  is the Annotation's ``Name``, else an Annotation ``Attribute`` (its ``Value``, or its ``Name``
  when that is not ImageScope's default ``Description``), else the Region's attribute value or
  ``Text``; the colour is ``LineColor`` (an integer ``R + 256 G + 65536 B``). Region ``Type`` 0
  (freehand / polygon) and 1 (rectangle) are polygons, 2 (ellipse: two bounding-box corners) an
  ellipse, one vertex a point; arrows and rulers (3, 4) are skipped as line markers.
  ``NegativeROA="1"`` regions are holes cut from their Annotation's other regions.
* **ASAP XML**: ``ASAP_Annotations/Annotations/Annotation/Coordinates/Coordinate`` (sorted by
  ``Order``); class = ``PartOfGroup`` (``None`` = unclassified), colour = the group's (else the
  annotation's) ``Color``. ``Polygon``, ``Rectangle`` and ``Spline`` (its control points) are
  polygons, ``Dot`` a point, ``PointSet`` points; ``Measurement`` lines are skipped.
"""

from __future__ import annotations

import gzip
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import geojson
import numpy as np
import shapely
import shapely.geometry

from slidestream.errors import AnnotationError

__all__ = [
    "AnnotationFormat",
    "RawObject",
    "detect_format",
    "parse_annotation_file",
]

AnnotationFormat = Literal["qupath-geojson", "imagescope-xml", "asap-xml"]

#: GeoJSON geometry types read as areas or points; lines are skipped.
_AREA_TYPES = frozenset({"Polygon", "MultiPolygon"})
_POINT_TYPES = frozenset({"Point", "MultiPoint"})
_LINE_TYPES = frozenset({"LineString", "MultiLineString"})
_GEOMETRY_TYPES = _AREA_TYPES | _POINT_TYPES | _LINE_TYPES | {"GeometryCollection"}
#: QuPath object types that are objects on the image (the root object is not).
_QUPATH_OBJECT_TYPES = frozenset({"annotation", "detection", "cell", "tile"})
_QUPATH_LEGACY_TYPES = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
}
#: ImageScope region types.
_IS_POLYGON, _IS_RECTANGLE, _IS_ELLIPSE, _IS_ARROW, _IS_RULER = 0, 1, 2, 3, 4
_IS_KNOWN_TYPES = frozenset({0, 1, 2, 3, 4, 5})
_ELLIPSE_VERTICES = 64
_ASAP_AREA = frozenset({"polygon", "rectangle", "spline"})


@dataclass(frozen=True, slots=True, kw_only=True)
class RawObject:
    """One object of an annotation file, before checks against the slide.

    Attributes
    ----------
    geometry : shapely.Geometry
        Polygon / MultiPolygon (areas) or Point / MultiPoint, level-0 px of the slide (x right,
        y down), as written in the file; ``None`` marks an object skipped as a line marker.
    class_name : str or None
        Classification name; ``None`` when the file gives none.
    color : (int, int, int) or None
        RGB colour of the class (QuPath classification colour, ImageScope LineColor, ASAP
        group colour).
    object_type : str
        ``annotation``, ``detection``, ``cell`` or ``tile`` (QuPath), ``annotation`` for XML.
    where : str
        The object's place in the file for messages (``feature 3``, ``Annotation 2 Region 5``).
    nucleus : shapely.Geometry or None
        QuPath cells: the ``nucleusGeometry``.
    """

    geometry: shapely.Geometry | None
    class_name: str | None
    color: tuple[int, int, int] | None
    object_type: str
    where: str
    nucleus: shapely.Geometry | None = None


def detect_format(path: Path, head: bytes) -> AnnotationFormat:
    """The format of ``path`` from its name and first bytes.

    Raises
    ------
    AnnotationError
        Neither GeoJSON nor a known XML root.
    """
    name = path.name.lower()
    if name.endswith((".geojson", ".json", ".geojson.gz", ".json.gz")):
        return "qupath-geojson"
    if name.endswith(".xml"):
        text = head.decode("utf-8", errors="replace")
        if "<ASAP_Annotations" in text:
            return "asap-xml"
        if "<Annotations" in text:
            return "imagescope-xml"
        raise AnnotationError(
            f"{path}: XML root is neither <Annotations> (Aperio ImageScope) nor "
            "<ASAP_Annotations> (ASAP); export the annotations from ImageScope or ASAP"
        )
    raise AnnotationError(
        f"{path}: unknown annotation file type; use a QuPath GeoJSON (.geojson, .geojson.gz), "
        "an ImageScope .xml or an ASAP .xml"
    )


def parse_annotation_file(path: Path) -> tuple[AnnotationFormat, list[RawObject]]:
    """Parse one annotation file into raw objects.

    Parameters
    ----------
    path : Path
        ``.geojson`` / ``.json`` (optionally ``.gz``) or ``.xml``.

    Returns
    -------
    (format, objects)

    Raises
    ------
    AnnotationError
        Unreadable file, malformed content or an unknown geometry type (one line naming the
        file and the object).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read annotation file ({exc})") from exc
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise AnnotationError(f"{path}: corrupt gzip data ({exc}); export it again") from exc
    fmt = detect_format(path, data[:4096])
    if fmt == "qupath-geojson":
        return fmt, list(_parse_geojson(path, data))
    root = _parse_xml(path, data)
    if fmt == "asap-xml":
        return fmt, list(_parse_asap(path, root))
    return fmt, list(_parse_imagescope(path, root))


# --------------------------------------------------------------------------- QuPath GeoJSON


def _parse_geojson(path: Path, data: bytes) -> Iterator[RawObject]:
    try:
        # json, not orjson: QuPath 0.4 writes bare NaN tokens in measurements.
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(
            f"{path}: not valid JSON ({exc}); export it again from QuPath"
        ) from exc
    features = list(_features(path, doc, "file"))
    for index, feature in enumerate(features):
        yield _qupath_object(path, feature, f"feature {index}")


def _features(path: Path, doc: Any, where: str) -> Iterator[dict[str, Any]]:
    """The Feature objects of a document, in QuPath's reading order (see the module doc)."""
    if isinstance(doc, list):
        for item in doc:
            if isinstance(item, (dict, list)) and (isinstance(item, list) or "type" in item):
                yield from _features(path, item, where)
        return
    if not isinstance(doc, dict):
        raise AnnotationError(f"{path}: {where} is not a GeoJSON object or array")
    kind = doc.get("type")
    if kind == "FeatureCollection":
        feats = doc.get("features")
        if isinstance(feats, list):
            for item in feats:
                if not isinstance(item, dict):
                    raise AnnotationError(f"{path}: a FeatureCollection member is not an object")
                yield item
        return
    if kind == "Feature":
        yield doc
        return
    if kind in _GEOMETRY_TYPES or "coordinates" in doc:
        yield {"type": "Feature", "geometry": doc, "properties": {}}
        return
    raise AnnotationError(
        f"{path}: {where} has GeoJSON type {kind!r}; expected a FeatureCollection, a Feature "
        "or an array of Features (QuPath: File > Export objects as GeoJSON)"
    )


def _qupath_object(path: Path, feature: dict[str, Any], where: str) -> RawObject:
    props = feature.get("properties") or {}
    if not isinstance(props, dict):
        raise AnnotationError(f"{path}: {where}: 'properties' is not an object")
    object_type = _qupath_object_type(props)
    name, color = _qupath_classification(path, props.get("classification"), where)
    if "geometry" not in feature or feature["geometry"] is None:
        raise AnnotationError(f"{path}: {where} has no geometry; QuPath cannot import it either")
    geometry = _geometry(path, feature["geometry"], where)
    nucleus = None
    if object_type == "cell" and isinstance(feature.get("nucleusGeometry"), dict):
        nucleus = _geometry(path, feature["nucleusGeometry"], f"{where} nucleusGeometry")
    return RawObject(
        geometry=geometry,
        class_name=name,
        color=color,
        object_type=object_type,
        where=where,
        nucleus=nucleus,
    )


def _qupath_object_type(props: dict[str, Any]) -> str:
    for key in ("objectType", "object_type", "type"):
        if key in props and isinstance(props[key], str):
            value = props[key]
            value = _QUPATH_LEGACY_TYPES.get(value, value)
            # QuPath makes an annotation of any unknown object type (with a warning).
            return value if value in _QUPATH_OBJECT_TYPES else "annotation"
    return "annotation"


def _qupath_classification(
    path: Path, value: Any, where: str
) -> tuple[str | None, tuple[int, int, int] | None]:
    """``(name, colour)`` of a QuPath classification (string, object or null)."""
    if value is None:
        return None, None
    if isinstance(value, str):
        return _class_name(value), None
    if not isinstance(value, dict):
        raise AnnotationError(
            f"{path}: {where}: classification {value!r} is neither a name nor an object "
            'like {"name": "Tumor", "color": [200, 0, 0]}'
        )
    if "names" in value and isinstance(value["names"], list):
        name = _class_name(": ".join(str(n) for n in value["names"]))
    elif "name" in value and value["name"] is not None:
        name = _class_name(str(value["name"]))
    else:
        name = None
    return name, _rgb_from_list(value.get("color"))


def _class_name(text: str) -> str | None:
    """QuPath's name normalisation: parts split at ':' and stripped; blank -> None."""
    parts = [p.strip() for p in text.split(":")]
    name = ": ".join(p for p in parts if p)
    return name or None


def _rgb_from_list(value: Any) -> tuple[int, int, int] | None:
    """QuPath colour ``[r, g, b]``, ``[r, g, b, a]`` or ``[packed ARGB int]``; else None."""
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
        return None
    if len(value) in (3, 4):
        return (int(value[0]) & 255, int(value[1]) & 255, int(value[2]) & 255)
    if len(value) == 1:
        packed = int(value[0])
        return ((packed >> 16) & 255, (packed >> 8) & 255, packed & 255)
    return None


def _geometry(path: Path, geom: Any, where: str) -> shapely.Geometry | None:
    """A GeoJSON geometry as shapely (None for lines), structure checked with ``geojson``."""
    if not isinstance(geom, dict):
        raise AnnotationError(f"{path}: {where}: geometry is not an object")
    kind = geom.get("type")
    if kind not in _GEOMETRY_TYPES:
        raise AnnotationError(
            f"{path}: {where}: unknown geometry type {kind!r}; expected Polygon, MultiPolygon, "
            "Point or MultiPoint"
        )
    if kind == "GeometryCollection":
        parts = [
            _geometry(path, g, f"{where} part {i}")
            for i, g in enumerate(geom.get("geometries") or [])
        ]
        kept = [p for p in parts if p is not None]
        if not kept:
            return None
        areas = [p for p in kept if p.geom_type in _AREA_TYPES]
        return shapely.union_all(areas) if areas else shapely.union_all(kept)
    if kind in _LINE_TYPES:
        return None
    plain = {"type": kind, "coordinates": geom.get("coordinates")}
    try:
        checked = geojson.GeoJSON.to_instance(plain, strict=True)
        errors = checked.errors() if hasattr(checked, "errors") else None
    except (ValueError, TypeError) as exc:
        raise AnnotationError(f"{path}: {where}: malformed {kind} coordinates ({exc})") from exc
    if errors:
        raise AnnotationError(f"{path}: {where}: invalid {kind}: {errors}")
    try:
        shape = shapely.geometry.shape(plain)
    except (ValueError, TypeError, shapely.errors.GEOSException) as exc:
        raise AnnotationError(f"{path}: {where}: cannot build {kind} ({exc})") from exc
    return shapely.force_2d(shape)


# --------------------------------------------------------------------------- XML formats


def _parse_xml(path: Path, data: bytes) -> ET.Element:
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise AnnotationError(f"{path}: not well-formed XML ({exc}); export it again") from exc


def _float_attr(path: Path, node: ET.Element, key: str, where: str) -> float:
    raw = node.get(key)
    try:
        value = float(raw) if raw is not None else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise AnnotationError(f"{path}: {where}: {key}={raw!r} is not a number")
    return value


def _imagescope_rgb(value: str | None) -> tuple[int, int, int] | None:
    """ImageScope ``LineColor``: the integer ``R + 256 G + 65536 B``."""
    try:
        packed = int(value) if value is not None else -1
    except ValueError:
        return None
    if packed < 0:
        return None
    return (packed & 255, (packed >> 8) & 255, (packed >> 16) & 255)


def _attribute_class(node: ET.Element) -> str | None:
    """A class from ``Attributes/Attribute``: its Value, else a Name other than Description."""
    for attr in node.findall("./Attributes/Attribute"):
        value = (attr.get("Value") or "").strip()
        if value:
            return value
        name = (attr.get("Name") or "").strip()
        if name and name.lower() != "description":
            return name
    return None


def _ellipse(x0: float, y0: float, x1: float, y1: float) -> shapely.Polygon:
    t = np.linspace(0.0, 2.0 * np.pi, _ELLIPSE_VERTICES, endpoint=False)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0) / 2, abs(y1 - y0) / 2
    return shapely.Polygon(np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1))


def _parse_imagescope(path: Path, root: ET.Element) -> Iterator[RawObject]:
    for a_index, ann in enumerate(root.iter("Annotation"), start=1):
        a_where = f"Annotation {ann.get('Id') or a_index}"
        a_class = _class_name(ann.get("Name") or "") or _attribute_class(ann)
        color = _imagescope_rgb(ann.get("LineColor"))
        positive: list[RawObject] = []
        holes: list[shapely.Geometry] = []
        for r_index, region in enumerate(ann.findall("./Regions/Region"), start=1):
            where = f"{a_where} Region {region.get('Id') or r_index}"
            geometry = _imagescope_region(path, region, where)
            if region.get("NegativeROA") == "1" and geometry is not None:
                holes.append(geometry)
                continue
            r_class = a_class or _attribute_class(region) or _class_name(region.get("Text") or "")
            positive.append(
                RawObject(
                    geometry=geometry,
                    class_name=r_class,
                    color=color,
                    object_type="annotation",
                    where=where,
                )
            )
        cut = shapely.union_all(holes) if holes else None
        for obj in positive:
            if (
                cut is not None
                and obj.geometry is not None
                and obj.geometry.geom_type in _AREA_TYPES
            ):
                obj = RawObject(
                    geometry=shapely.difference(shapely.make_valid(obj.geometry), cut),
                    class_name=obj.class_name,
                    color=obj.color,
                    object_type=obj.object_type,
                    where=obj.where,
                )
            yield obj


def _imagescope_region(path: Path, region: ET.Element, where: str) -> shapely.Geometry | None:
    raw_type = region.get("Type", "0")
    try:
        r_type = int(raw_type)
    except ValueError:
        r_type = -1
    if r_type not in _IS_KNOWN_TYPES:
        raise AnnotationError(
            f"{path}: {where}: unknown region Type={raw_type!r}; expected 0 (polygon), "
            "1 (rectangle), 2 (ellipse) or a point"
        )
    verts = [
        (_float_attr(path, v, "X", where), _float_attr(path, v, "Y", where))
        for v in region.findall("./Vertices/Vertex")
    ]
    if r_type in (_IS_ARROW, _IS_RULER):
        return None
    if not verts:
        raise AnnotationError(f"{path}: {where} has no vertices")
    if len(verts) == 1:
        return shapely.Point(verts[0])
    xy = np.asarray(verts, dtype=np.float64)
    if r_type == _IS_ELLIPSE:
        return _ellipse(xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max())
    if r_type == _IS_RECTANGLE and len(verts) == 2:
        return shapely.box(xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max())
    if len(verts) < 3:
        return None  # a two-vertex freehand stroke is a line
    return shapely.Polygon(xy)


def _asap_rgb(value: str | None) -> tuple[int, int, int] | None:
    text = (value or "").strip().lstrip("#")
    if len(text) != 6:
        return None
    try:
        return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
    except ValueError:
        return None


def _parse_asap(path: Path, root: ET.Element) -> Iterator[RawObject]:
    group_colors = {
        (g.get("Name") or "").strip(): _asap_rgb(g.get("Color")) for g in root.iter("Group")
    }
    for index, ann in enumerate(root.iter("Annotation")):
        where = f"Annotation {ann.get('Name') or index!r}"
        group = (ann.get("PartOfGroup") or "").strip()
        name = None if group in ("", "None") else _class_name(group)
        color = group_colors.get(group) or _asap_rgb(ann.get("Color"))
        kind = (ann.get("Type") or "").strip().lower()
        coords = sorted(
            ann.findall("./Coordinates/Coordinate"),
            key=lambda c: float(c.get("Order") or 0),
        )
        xy = np.asarray(
            [(_float_attr(path, c, "X", where), _float_attr(path, c, "Y", where)) for c in coords],
            dtype=np.float64,
        ).reshape(-1, 2)
        geometry: shapely.Geometry | None
        if kind in _ASAP_AREA:
            if len(xy) < 3:
                raise AnnotationError(f"{path}: {where}: a {kind} needs >= 3 coordinates")
            geometry = shapely.Polygon(xy)
        elif kind == "dot":
            if len(xy) != 1:
                raise AnnotationError(f"{path}: {where}: a Dot needs one coordinate")
            geometry = shapely.Point(xy[0])
        elif kind == "pointset":
            if not len(xy):
                raise AnnotationError(f"{path}: {where}: a PointSet without coordinates")
            geometry = shapely.MultiPoint(xy)
        elif kind == "measurement":
            geometry = None
        else:
            raise AnnotationError(
                f"{path}: {where}: unknown annotation Type={ann.get('Type')!r}; expected "
                "Polygon, Rectangle, Spline, Dot or PointSet"
            )
        yield RawObject(
            geometry=geometry, class_name=name, color=color, object_type="annotation", where=where
        )
