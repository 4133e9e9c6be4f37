"""The user's annotations of a slide as classed shapely geometries in level-0 px.

:func:`read_annotations` reads a QuPath GeoJSON export, an Aperio ImageScope XML or an ASAP XML
(:mod:`._annotation_formats`) into one :class:`AnnotationSet`: every object's geometry in the
slide's level-0 px frame (QuPath's: origin top-left, x right, y down), its class name and
colour. Checked against the slide's size; objects without a class, and QuPath's *ignored*
classes (names ending in ``*``, e.g. ``Ignore*``, ``Region*``), are counted and left out of the
class regions. :func:`pair_annotations` pairs slides with their files by stem
(``slide.svs`` <-> ``slide.geojson`` / ``slide.svs.geojson`` / ``slide.xml``) or by an explicit
``SLIDE=ANNOTATIONS`` argument.

Annotation geometry is input geometry, like the tissue mask, so it lives in ``tiling``: the
patch sampler here and the training and evaluation code in ``models`` and the app use it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import shapely

from slidestream.errors import AnnotationError

from ._annotation_formats import AnnotationFormat, RawObject, parse_annotation_file

__all__ = [
    "ANNOTATION_SUFFIXES",
    "AnnotatedObject",
    "AnnotationSet",
    "pair_annotations",
    "read_annotations",
]

logger = logging.getLogger(__name__)

ANNOTATION_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz", ".xml")


@dataclass(frozen=True, slots=True, kw_only=True)
class AnnotatedObject:
    """One classified or unclassified object of an annotation file.

    Attributes
    ----------
    geometry : shapely.Geometry
        Valid Polygon / MultiPolygon (an area) or Point / MultiPoint, level-0 px of the slide,
        clipped to the slide.
    class_name : str or None
        Class after the class map; ``None``: the file gives none.
    color : (int, int, int) or None
        RGB display colour the file gives for the class.
    object_type : str
        ``annotation``, ``detection``, ``cell`` or ``tile``.
    where : str
        Place in the file (``feature 3``), for messages.
    nucleus : shapely.Geometry or None
        Nucleus outline of a QuPath cell.
    """

    geometry: shapely.Geometry
    class_name: str | None
    color: tuple[int, int, int] | None
    object_type: str
    where: str
    nucleus: shapely.Geometry | None = None

    @property
    def is_area(self) -> bool:
        """Polygonal (a region or a nucleus outline)."""
        return self.geometry.geom_type in ("Polygon", "MultiPolygon")


@dataclass(frozen=True, slots=True, kw_only=True)
class AnnotatedNuclei:
    """The annotated nuclei of an :class:`AnnotationSet`, level-0 px.

    Attributes
    ----------
    xy : ndarray, float64, shape (N, 2)
        Each nucleus's point, or its outline's centroid.
    classes : tuple of (str or None)
        Class of each nucleus.
    outlines : tuple of ((K, 2) ndarray or None)
        Exterior ``(x, y)`` of each outlined nucleus (its largest part); ``None`` for points.
    regions : int
        Polygons left out as too large to be a nucleus.
    """

    xy: npt.NDArray[np.float64]
    classes: tuple[str | None, ...]
    outlines: tuple[npt.NDArray[np.float64] | None, ...]
    regions: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AnnotationSet:
    """The annotations of one slide.

    Attributes
    ----------
    path : Path
        The annotation file.
    format : str
        ``qupath-geojson``, ``imagescope-xml`` or ``asap-xml``.
    objects : tuple of AnnotatedObject
        Every usable object (areas and points), classified or not, in file order.
    unclassified : int
        Objects without a class (kept in ``objects`` with ``class_name=None``).
    ignored : int
        Objects dropped: QuPath ignored classes (``Name*``) and classes the class map drops.
    skipped : int
        Objects that are neither areas nor points (lines, arrows, rulers) or empty.
    """

    path: Path
    format: AnnotationFormat
    objects: tuple[AnnotatedObject, ...]
    unclassified: int = 0
    ignored: int = 0
    skipped: int = 0

    def classes(self) -> tuple[str, ...]:
        """Sorted class names of the classified objects."""
        return tuple(sorted({o.class_name for o in self.objects if o.class_name is not None}))

    def class_colors(self) -> dict[str, tuple[int, int, int]]:
        """The first colour the file gives each class (classes without one are absent)."""
        out: dict[str, tuple[int, int, int]] = {}
        for o in self.objects:
            if o.class_name is not None and o.color is not None:
                out.setdefault(o.class_name, o.color)
        return out

    def regions(self) -> dict[str, shapely.MultiPolygon]:
        """Area of each class, disjoint across classes, level-0 px.

        Where regions of different classes overlap, the smaller object wins (a necrosis region
        drawn inside a tumour region is necrosis there, as in QuPath's hierarchy).

        Returns
        -------
        dict of str to shapely.MultiPolygon
            Only classes with a non-empty area; unclassified objects are left out.
        """
        areas = [o for o in self.objects if o.is_area and o.class_name is not None]
        areas.sort(key=lambda o: float(o.geometry.area))
        covered: shapely.Geometry = shapely.Polygon()
        parts: dict[str, list[shapely.Geometry]] = {}
        for obj in areas:
            own = (
                shapely.difference(obj.geometry, covered) if not covered.is_empty else obj.geometry
            )
            if not own.is_empty:
                parts.setdefault(str(obj.class_name), []).append(own)
            covered = shapely.union(covered, obj.geometry)
        out: dict[str, shapely.MultiPolygon] = {}
        for name, geoms in parts.items():
            merged = _polygonal(shapely.union_all(geoms))
            if not merged.is_empty:
                out[name] = merged
        return out

    def points(
        self, *, include_unclassified: bool = True
    ) -> tuple[npt.NDArray[np.float64], tuple[str | None, ...]]:
        """One point per annotated nucleus: ``(xy (N, 2) level-0 px, class per point)``.

        Points and multi-points give their positions; polygons (nucleus outlines, cells'
        nuclei) their centroid.
        """
        found = self.nuclei(include_unclassified=include_unclassified)
        return found.xy, found.classes

    def nuclei(
        self, *, max_area_px2: float = math.inf, include_unclassified: bool = False
    ) -> AnnotatedNuclei:
        """The annotated nuclei: points, multi-points' points, and outlines (polygons and
        cells' nuclei) up to ``max_area_px2`` level-0 px² (larger ones are regions, counted).

        Returns
        -------
        AnnotatedNuclei
        """
        xy: list[tuple[float, float]] = []
        names: list[str | None] = []
        outlines: list[npt.NDArray[np.float64] | None] = []
        regions = 0
        for o in self.objects:
            if o.class_name is None and not include_unclassified:
                continue
            geom = o.nucleus if o.nucleus is not None else o.geometry
            if geom.geom_type == "MultiPoint":
                pts = [(p.x, p.y) for p in geom.geoms]
                outlines += [None] * len(pts)
            elif geom.geom_type == "Point":
                pts = [(geom.x, geom.y)]
                outlines.append(None)
            else:
                if float(geom.area) > max_area_px2:
                    regions += 1
                    continue
                c = geom.centroid
                pts = [(c.x, c.y)]
                largest = max(shapely.get_parts(geom), key=lambda g: float(g.area))
                outlines.append(np.asarray(largest.exterior.coords, np.float64)[:, :2])
            xy += pts
            names += [o.class_name] * len(pts)
        return AnnotatedNuclei(
            xy=np.asarray(xy, dtype=np.float64).reshape(-1, 2),
            classes=tuple(names),
            outlines=tuple(outlines),
            regions=regions,
        )

    def summary(self) -> str:
        """One line: objects per class and the counts left out."""
        counts: dict[str, int] = {}
        for o in self.objects:
            if o.class_name is not None:
                counts[o.class_name] = counts.get(o.class_name, 0) + 1
        per = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
        return (
            f"{self.path.name}: {len(self.objects)} objects ({per}); "
            f"{self.unclassified} unclassified, {self.ignored} ignored, {self.skipped} skipped"
        )


def _polygonal(geom: shapely.Geometry) -> shapely.MultiPolygon:
    """The valid polygonal part of ``geom`` as a MultiPolygon."""
    valid = shapely.make_valid(geom)
    polys = [
        p
        for p in shapely.get_parts(valid)
        if p.geom_type == "Polygon" and not p.is_empty and p.area > 0
    ]
    polys += [
        q
        for p in shapely.get_parts(valid)
        if p.geom_type in ("MultiPolygon", "GeometryCollection")
        for q in shapely.get_parts(p)
        if q.geom_type == "Polygon" and q.area > 0
    ]
    return shapely.MultiPolygon(polys)


def _edge_tolerance_px(dimensions: tuple[int, int]) -> float:
    """How far past the slide's edge an object may reach (drawn past it), level-0 px."""
    return max(16.0, 0.01 * max(dimensions))


def read_annotations(
    path: str | Path,
    *,
    dimensions: tuple[int, int] | None = None,
    class_map: Mapping[str, str] | None = None,
) -> AnnotationSet:
    """Read an annotation file of one slide.

    Parameters
    ----------
    path : str or Path
        QuPath GeoJSON (``.geojson``, ``.json``, optionally ``.gz``), ImageScope or ASAP XML.
    dimensions : (int, int), optional
        The slide's level-0 ``(width, height)``: objects reaching more than 1 % of the slide
        (at least 16 px) past its edge raise; the rest is clipped to the slide.
    class_map : mapping of str to str, optional
        Renames classes (``{"Tumor": "tumour"}``); a class mapped to ``""`` or ``"-"`` is
        dropped (counted in ``ignored``).

    Returns
    -------
    AnnotationSet

    Raises
    ------
    AnnotationError
        Unreadable or malformed file, unknown geometry type, coordinates outside the slide;
        the message names the file and the object.
    """
    p = Path(path)
    fmt, raw = parse_annotation_file(p)
    mapping = dict(class_map or {})
    objects: list[AnnotatedObject] = []
    unclassified = ignored = skipped = repaired = 0
    box = None
    tol = 0.0
    if dimensions is not None:
        box = shapely.box(0.0, 0.0, float(dimensions[0]), float(dimensions[1]))
        tol = _edge_tolerance_px(dimensions)
    for obj in raw:
        if obj.geometry is None or obj.geometry.is_empty:
            skipped += 1
            continue
        name = obj.class_name
        if name is not None:
            name = mapping.get(name, name)
            if name in ("", "-") or name.endswith("*"):
                ignored += 1
                continue
        geom = obj.geometry
        if dimensions is not None:
            _check_inside(p, obj, dimensions, tol)
        if geom.geom_type in ("Polygon", "MultiPolygon"):
            if not geom.is_valid:
                geom = _polygonal(geom)
                repaired += 1
            if box is not None:
                geom = _polygonal(shapely.intersection(geom, box))
            if geom.is_empty:
                skipped += 1
                continue
        if name is None:
            unclassified += 1
        objects.append(
            AnnotatedObject(
                geometry=geom,
                class_name=name,
                color=obj.color,
                object_type=obj.object_type,
                where=obj.where,
                nucleus=obj.nucleus,
            )
        )
    if repaired:
        logger.warning("%s: %d self-intersecting polygons repaired", p, repaired)
    out = AnnotationSet(
        path=p,
        format=fmt,
        objects=tuple(objects),
        unclassified=unclassified,
        ignored=ignored,
        skipped=skipped,
    )
    if unclassified or skipped:
        logger.warning(
            "%s: %d objects without a class, %d lines/empty objects skipped",
            p,
            unclassified,
            skipped,
        )
    return out


def _check_inside(path: Path, obj: RawObject, dimensions: tuple[int, int], tol: float) -> None:
    if obj.geometry is None:
        return
    x0, y0, x1, y1 = obj.geometry.bounds
    width, height = dimensions
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise AnnotationError(
            f"{path}: {obj.where}: coordinates ({x0:.0f}, {y0:.0f})-({x1:.0f}, {y1:.0f}) lie "
            f"outside the slide ({width} x {height} px); annotations must be in level-0 px of "
            "this slide (QuPath: File > Export objects as GeoJSON from the same image)"
        )


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suffix in sorted(ANNOTATION_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _slide_keys(slide: Path) -> set[str]:
    name = slide.name
    keys = {name, name.split(".", 1)[0] if "." in name else name}
    keys.add(slide.stem)
    if name.lower().endswith(".ome.tif") or name.lower().endswith(".ome.tiff"):
        keys.add(name.split(".ome.", 1)[0])
    return keys


def pair_annotations(
    slides: Sequence[Path], annotations: Sequence[str | Path]
) -> list[tuple[Path, Path]]:
    """Pair every slide with its annotation file.

    Parameters
    ----------
    slides : sequence of Path
        Slide files (or DICOM folders).
    annotations : sequence of str or Path
        Annotation files, folders holding them, or ``SLIDE=ANNOTATIONS`` pairs (``SLIDE``: the
        slide's path or file name).

    Returns
    -------
    list of (slide, annotation file)
        In the order of ``slides``.

    Raises
    ------
    AnnotationError
        A slide without a file, a slide matching several files, or a missing file.
    """
    explicit: dict[str, Path] = {}
    candidates: list[Path] = []
    for item in annotations:
        text = str(item)
        if "=" in text and not Path(text).exists():
            slide_part, _, ann_part = text.partition("=")
            ann = Path(ann_part)
            if not ann.is_file():
                raise AnnotationError(f"{ann}: annotation file not found (from {text!r})")
            explicit[slide_part] = ann
            explicit[Path(slide_part).name] = ann
            continue
        p = Path(text)
        if p.is_dir():
            candidates += sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.name.lower().endswith(ANNOTATION_SUFFIXES)
            )
        elif p.is_file():
            candidates.append(p)
        else:
            raise AnnotationError(f"{p}: annotation file or folder not found")
    by_key: dict[str, list[Path]] = {}
    for f in candidates:
        by_key.setdefault(_strip_suffix(f.name), []).append(f)
    pairs: list[tuple[Path, Path]] = []
    for slide in slides:
        hit = explicit.get(str(slide)) or explicit.get(slide.name)
        if hit is None:
            found = sorted({f for k in _slide_keys(slide) for f in by_key.get(k, [])})
            if not found:
                raise AnnotationError(
                    f"{slide}: no annotation file named {slide.stem}.geojson / {slide.stem}.xml "
                    f"among --annotations; pass --annotations {slide.name}=FILE"
                )
            if len(found) > 1:
                raise AnnotationError(
                    f"{slide}: several annotation files match ({', '.join(map(str, found))}); "
                    f"pass --annotations {slide.name}=FILE"
                )
            hit = found[0]
        pairs.append((slide, hit))
    return pairs
