"""Annotated test slides: a pyramidal TIFF mosaic of labelled tiles plus its annotation files.

Tests and ``bench/annotated_mosaic.py`` build whole slides from labelled tile sets (e.g.
LC25000 lung tiles): tiles of one class are laid out in square blocks, each block is one class
region, and the annotations are written the way the annotation tools write them:

* :func:`write_qupath_geojson` writes what QuPath's *Export objects as GeoJSON* writes
  (``PathObjectTypeAdapters`` / ``ROITypeAdapters`` of qupath-core, read for this): compact
  Gson JSON, Feature members ``type, id, geometry, properties``, ``properties`` members
  ``objectType, name?, color?, classification {name, color}, isLocked?, measurements?``,
  coordinates as ``[x, y]`` with at most 2 decimals and trailing zeros dropped (``GeneralTools.
  formatNumber``), a FeatureCollection (the export dialog's default) or a bare array;
* :func:`write_imagescope_xml` and :func:`write_asap_xml` write Aperio ImageScope and ASAP XML
  in the shape of real exports (MoNuSeg's ImageScope files, ASAP's Camelyon files).

Each block's annotation is a hand-drawn-like polygon: the block inset by ``inset_px`` with
jittered vertices, so (as with a real annotator) not every pixel of a region is annotated.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import shapely

from slidestream.wsi.synthetic import write_pyramidal_tiff

__all__ = [
    "MosaicSlide",
    "TypedMosaicSlide",
    "TypedTile",
    "qupath_feature",
    "write_annotated_mosaic",
    "write_asap_xml",
    "write_imagescope_xml",
    "write_qupath_geojson",
    "write_typed_nuclei_mosaic",
]

_NS = uuid.UUID("7d3c0a52-8f3e-4f55-9c1e-2b1f0d6c9a11")


def _num(v: float) -> str:
    """QuPath's ``GeneralTools.formatNumber(Locale.US, v, 2)``: <= 2 decimals, no trailing 0s."""
    text = f"{v:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _ring(coords: npt.NDArray[np.float64]) -> str:
    return "[" + ", ".join(f"[{_num(x)}, {_num(y)}]" for x, y in coords) + "]"


def _coords_json(geom: shapely.Geometry) -> str:
    kind = geom.geom_type
    if kind == "Point":
        return f"[{_num(geom.x)}, {_num(geom.y)}]"
    if kind == "MultiPoint":
        return "[" + ", ".join(f"[{_num(p.x)}, {_num(p.y)}]" for p in geom.geoms) + "]"
    if kind == "Polygon":
        rings = [np.asarray(geom.exterior.coords)] + [np.asarray(r.coords) for r in geom.interiors]
        return "[" + ",".join(_ring(r) for r in rings) + "]"
    if kind == "MultiPolygon":
        return "[" + ",".join(_coords_json(p) for p in geom.geoms) + "]"
    raise ValueError(f"cannot write {kind}")


def _geometry_json(geom: shapely.Geometry) -> str:
    return f'{{"type":"{geom.geom_type}","coordinates":{_coords_json(geom)}}}'


def qupath_feature(
    geometry: shapely.Geometry,
    *,
    object_id: str,
    class_name: str | None,
    class_color: tuple[int, int, int] | None = None,
    object_type: str = "annotation",
    name: str | None = None,
    is_locked: bool = False,
    measurements: Mapping[str, float] | None = None,
) -> str:
    """One Feature as QuPath's ``PathObjectTypeAdapter.write`` emits it (compact JSON text)."""
    props = [f'"objectType":"{object_type}"']
    if name is not None:
        props.append(f'"name":{json.dumps(name)}')
    if class_name is not None:
        rgb = class_color or (128, 128, 128)
        props.append(
            f'"classification":{{"name":{json.dumps(class_name)},'
            f'"color":[{rgb[0]}, {rgb[1]}, {rgb[2]}]}}'
        )
    if is_locked:
        props.append('"isLocked":true')
    if measurements:
        props.append(
            '"measurements":{'
            + ",".join(f"{json.dumps(k)}:{float(v)!r}" for k, v in measurements.items())
            + "}"
        )
    return (
        f'{{"type":"Feature","id":"{object_id}","geometry":{_geometry_json(geometry)},'
        f'"properties":{{{",".join(props)}}}}}'
    )


def write_qupath_geojson(
    path: str | Path, features: Sequence[str], *, feature_collection: bool = True
) -> Path:
    """Write Features (from :func:`qupath_feature`) as QuPath's GeoJSON export does."""
    body = ",".join(features)
    text = (
        f'{{"type":"FeatureCollection","features":[{body}]}}' if feature_collection else f"[{body}]"
    )
    out = Path(path)
    out.write_text(text, encoding="utf-8")
    return out


def _imagescope_color(rgb: tuple[int, int, int]) -> int:
    return rgb[0] + 256 * rgb[1] + 65536 * rgb[2]


def write_imagescope_xml(
    path: str | Path,
    layers: Sequence[tuple[str, tuple[int, int, int], Sequence[shapely.Geometry]]],
    *,
    mpp: float,
    name_in: str = "Name",
) -> Path:
    """Aperio ImageScope XML: one ``Annotation`` per ``(class, colour, polygons)`` layer.

    ``name_in="Name"`` puts the class in the Annotation's ``Name`` (ImageScope's layer name),
    ``"Attribute"`` in an ``Attributes/Attribute Value`` (Name stays empty, as MoNuSeg's).
    """
    lines = [f'<Annotations MicronsPerPixel="{mpp:.6f}">']
    for a_id, (cls, rgb, geoms) in enumerate(layers, start=1):
        layer_name = cls if name_in == "Name" else ""
        value = cls if name_in == "Attribute" else ""
        lines.append(
            f'<Annotation Id="{a_id}" Name="{layer_name}" ReadOnly="0" NameReadOnly="0" '
            f'LineColorReadOnly="0" Incremental="0" Type="4" LineColor="{_imagescope_color(rgb)}" '
            'Visible="1" Selected="0" MarkupImagePath="" MacroName="">'
        )
        lines.append(
            f'<Attributes><Attribute Name="Description" Id="0" Value="{value}"/></Attributes>'
        )
        lines.append("<Regions>")
        lines.append(
            '<RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>'
            '<AttributeHeader Id="9997" Name="Length" ColumnWidth="-1"/>'
            '<AttributeHeader Id="9996" Name="Area" ColumnWidth="-1"/>'
            '<AttributeHeader Id="9998" Name="Text" ColumnWidth="-1"/>'
            '<AttributeHeader Id="1" Name="Description" ColumnWidth="-1"/></RegionAttributeHeaders>'
        )
        for r_id, geom in enumerate(geoms, start=1):
            pts = (
                [(geom.x, geom.y)]
                if geom.geom_type == "Point"
                else list(np.asarray(geom.exterior.coords)[:-1])
            )
            area = 0.0 if geom.geom_type == "Point" else float(geom.area)
            length = 0.0 if geom.geom_type == "Point" else float(geom.length)
            lines.append(
                f'<Region Id="{r_id}" Type="0" Zoom="0.5" Selected="0" ImageLocation="" '
                f'ImageFocus="-1" Length="{length:.1f}" Area="{area:.1f}" '
                f'LengthMicrons="{length * mpp:.1f}" AreaMicrons="{area * mpp * mpp:.1f}" Text="" '
                f'NegativeROA="0" InputRegionId="0" Analyze="1" DisplayId="{r_id}">'
            )
            lines.append("<Attributes/><Vertices>")
            lines += [f'<Vertex X="{x:.3f}" Y="{y:.3f}" Z="0"/>' for x, y in pts]
            lines.append("</Vertices></Region>")
        lines.append("</Regions><Plots/></Annotation>")
    lines.append("</Annotations>")
    out = Path(path)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def write_asap_xml(
    path: str | Path,
    layers: Sequence[tuple[str, tuple[int, int, int], Sequence[shapely.Geometry]]],
) -> Path:
    """ASAP XML: ``Annotation`` elements (Polygon / Dot) with ``PartOfGroup`` = class."""
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    n = 0
    for cls, rgb, geoms in layers:
        hexcol = "#{:02X}{:02X}{:02X}".format(*rgb)
        for geom in geoms:
            kind = "Dot" if geom.geom_type == "Point" else "Polygon"
            pts = (
                [(geom.x, geom.y)] if kind == "Dot" else list(np.asarray(geom.exterior.coords)[:-1])
            )
            lines.append(
                f'\t\t<Annotation Name="Annotation {n}" Type="{kind}" PartOfGroup="{cls}" '
                f'Color="{hexcol}">'
            )
            lines.append("\t\t\t<Coordinates>")
            lines += [
                f'\t\t\t\t<Coordinate Order="{i}" X="{x:.4f}" Y="{y:.4f}" />'
                for i, (x, y) in enumerate(pts)
            ]
            lines.append("\t\t\t</Coordinates>")
            lines.append("\t\t</Annotation>")
            n += 1
    lines.append("\t</Annotations>")
    lines.append("\t<AnnotationGroups>")
    for cls, rgb, _ in layers:
        hexcol = "#{:02X}{:02X}{:02X}".format(*rgb)
        lines.append(f'\t\t<Group Name="{cls}" PartOfGroup="None" Color="{hexcol}">')
        lines.append("\t\t\t<Attributes />")
        lines.append("\t\t</Group>")
    lines.append("\t</AnnotationGroups>")
    lines.append("</ASAP_Annotations>")
    out = Path(path)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class MosaicSlide:
    """A written mosaic slide.

    Attributes
    ----------
    slide : Path
        The pyramidal TIFF.
    geojson : Path
        Its QuPath GeoJSON annotations (one annotation per block).
    mpp : float
        Level-0 µm/px.
    dimensions : (int, int)
        Level-0 ``(width, height)``.
    blocks : tuple of (str, (x0, y0, x1, y1))
        Class and level-0 box of every block (the ground truth of every pixel).
    annotations : tuple of (str, shapely.Polygon)
        Class and polygon of every written annotation.
    """

    slide: Path
    geojson: Path
    mpp: float
    dimensions: tuple[int, int]
    blocks: tuple[tuple[str, tuple[int, int, int, int]], ...]
    annotations: tuple[tuple[str, shapely.Polygon], ...]


def _drawn_outline(
    box: tuple[int, int, int, int], inset_px: float, rng: np.random.Generator
) -> shapely.Polygon:
    """A freehand-like outline inside ``box``: an inset rectangle with jittered vertices."""
    x0, y0, x1, y1 = box
    n_side = 12
    t = np.linspace(0.0, 1.0, n_side, endpoint=False)
    w, h = x1 - x0 - 2 * inset_px, y1 - y0 - 2 * inset_px
    top = np.stack([x0 + inset_px + t * w, np.full(n_side, y0 + inset_px)], 1)
    right = np.stack([np.full(n_side, x1 - inset_px), y0 + inset_px + t * h], 1)
    bottom = np.stack([x1 - inset_px - t * w, np.full(n_side, y1 - inset_px)], 1)
    left = np.stack([np.full(n_side, x0 + inset_px), y1 - inset_px - t * h], 1)
    pts = np.concatenate([top, right, bottom, left])
    pts += rng.uniform(-0.5, 0.5, pts.shape) * inset_px
    poly = shapely.make_valid(shapely.Polygon(pts))
    if poly.geom_type != "Polygon":
        poly = max(shapely.get_parts(poly), key=lambda g: g.area)
    return shapely.Polygon(np.round(np.asarray(poly.exterior.coords), 2))


def write_annotated_mosaic(
    out_dir: str | Path,
    name: str,
    tiles: Sequence[tuple[npt.NDArray[np.uint8], str]],
    *,
    tile_mpp: float,
    slide_mpp: float,
    class_colors: Mapping[str, tuple[int, int, int]],
    block_tiles: int = 3,
    blocks_per_row: int = 6,
    margin_px: int = 256,
    inset_px: float = 24.0,
    seed: int = 0,
    compression: Any = "jpeg",
) -> MosaicSlide:
    """Lay labelled tiles out as class blocks on a white slide and write it with its GeoJSON.

    Parameters
    ----------
    out_dir : str or Path
        Folder for ``<name>.tiff`` and ``<name>.geojson``.
    name : str
    tiles : sequence of (RGB uint8 (h, w, 3), class)
        The tiles; each class's tiles fill ``block_tiles x block_tiles`` blocks in order
        (leftover tiles of a class that do not fill a block are not used).
    tile_mpp : float
        µm/px of the tiles.
    slide_mpp : float
        Level-0 µm/px of the written slide (tiles are resized by ``tile_mpp / slide_mpp``).
    class_colors : mapping
        RGB colour of each class, written in the classification.
    block_tiles, blocks_per_row : int
        Block side in tiles and blocks per row; the blocks' class order is shuffled (seeded).
    margin_px : int
        White border around the mosaic, level-0 px.
    inset_px : float
        How far inside its block an annotation is drawn (level-0 px), jittered by half of it.
    seed : int
    compression : str
        Tile compression of the TIFF.

    Returns
    -------
    MosaicSlide
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = tile_mpp / slide_mpp
    th, tw = tiles[0][0].shape[:2]
    t_w, t_h = round(tw * scale), round(th * scale)
    by_class: dict[str, list[npt.NDArray[np.uint8]]] = {}
    for img, cls in tiles:
        by_class.setdefault(cls, []).append(img)
    per_block = block_tiles * block_tiles
    block_list: list[tuple[str, list[npt.NDArray[np.uint8]]]] = []
    for cls in sorted(by_class):
        imgs = by_class[cls]
        for b in range(len(imgs) // per_block):
            block_list.append((cls, imgs[b * per_block : (b + 1) * per_block]))
    order = rng.permutation(len(block_list))
    n_rows = math.ceil(len(block_list) / blocks_per_row)
    b_w, b_h = t_w * block_tiles, t_h * block_tiles
    width = 2 * margin_px + blocks_per_row * b_w
    height = 2 * margin_px + n_rows * b_h
    canvas = np.full((height, width, 3), 242, dtype=np.uint8)
    blocks: list[tuple[str, tuple[int, int, int, int]]] = []
    for pos, bi in enumerate(order.tolist()):
        cls, imgs = block_list[bi]
        bx = margin_px + (pos % blocks_per_row) * b_w
        by = margin_px + (pos // blocks_per_row) * b_h
        for k, img in enumerate(imgs):
            tile = (
                img
                if (t_w, t_h) == (tw, th)
                else cv2.resize(img, (t_w, t_h), interpolation=cv2.INTER_CUBIC)
            )
            ty, tx = divmod(k, block_tiles)
            canvas[by + ty * t_h : by + (ty + 1) * t_h, bx + tx * t_w : bx + (tx + 1) * t_w] = tile
        blocks.append((cls, (bx, by, bx + b_w, by + b_h)))
    slide = write_pyramidal_tiff(
        out / f"{name}.tiff", canvas, mpp=slide_mpp, tile_size=256, compression=compression
    )
    annotations = tuple((cls, _drawn_outline(box, inset_px, rng)) for cls, box in blocks)
    features = [
        qupath_feature(
            poly,
            object_id=str(uuid.uuid5(_NS, f"{name}:{i}")),
            class_name=cls,
            class_color=class_colors.get(cls),
            is_locked=i % 5 == 0,
        )
        for i, (cls, poly) in enumerate(annotations)
    ]
    geojson_path = write_qupath_geojson(out / f"{name}.geojson", features)
    return MosaicSlide(
        slide=slide,
        geojson=geojson_path,
        mpp=slide_mpp,
        dimensions=(width, height),
        blocks=tuple(blocks),
        annotations=annotations,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TypedTile:
    """A tile with classified nuclei, for :func:`write_typed_nuclei_mosaic`.

    Attributes
    ----------
    rgb : ndarray, uint8, shape (H, W, 3)
    xy : ndarray, float, shape (N, 2)
        Nucleus centres ``(x, y)``, tile px.
    classes : tuple of str
        Class of each nucleus.
    outlines : tuple of ((K, 2) ndarray or None), optional
        Outline ``(x, y)`` of each nucleus, tile px (for ``as_outlines``).
    """

    rgb: npt.NDArray[np.uint8]
    xy: npt.NDArray[np.float64]
    classes: tuple[str, ...]
    outlines: tuple[npt.NDArray[np.float64] | None, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TypedMosaicSlide:
    """A written mosaic of typed-nucleus tiles.

    Attributes
    ----------
    slide, geojson : Path
    mpp : float
    dimensions : (int, int)
        Level-0 ``(width, height)``.
    origins : tuple of (int, int)
        Level-0 ``(x, y)`` of each tile's top-left pixel.
    xy : ndarray, float, shape (N, 2)
        Every nucleus centre, level-0 px.
    classes : tuple of str
        Class of every nucleus.
    """

    slide: Path
    geojson: Path
    mpp: float
    dimensions: tuple[int, int]
    origins: tuple[tuple[int, int], ...]
    xy: npt.NDArray[np.float64]
    classes: tuple[str, ...]


def _flat_parts(geom: shapely.Geometry) -> list[shapely.Geometry]:
    """Single-part geometries of a (nested) collection."""
    out: list[shapely.Geometry] = []
    for part in shapely.get_parts(geom):
        if part.geom_type.startswith("Multi") or part.geom_type == "GeometryCollection":
            out += _flat_parts(part)
        else:
            out.append(part)
    return out


def write_typed_nuclei_mosaic(
    out_dir: str | Path,
    name: str,
    tiles: Sequence[TypedTile],
    *,
    mpp: float,
    class_colors: Mapping[str, tuple[int, int, int]],
    columns: int = 4,
    gap_px: int = 384,
    as_outlines: bool = False,
    compression: Any = "jpeg",
) -> TypedMosaicSlide:
    """Lay typed-nucleus tiles out on a white slide and write the nuclei as QuPath does.

    Points are written as the QuPath *Points* tool stores them: one ``MultiPoint`` annotation
    per class and tile, classified. Outlines (``as_outlines``) are written as classified
    ``detection`` Polygons (as QuPath's cell detection followed by an object classifier).

    Parameters
    ----------
    out_dir : str or Path
        Folder for ``<name>.tiff`` and ``<name>.geojson``.
    name : str
    tiles : sequence of TypedTile
    mpp : float
        µm/px of the tiles (the slide's level 0).
    class_colors : mapping
        Class -> RGB of the classifications.
    columns : int
        Tiles per row.
    gap_px : int
        White gutter around every tile (level-0 px).
    as_outlines : bool
        Write outlines (each tile needs them) instead of points.
    compression : str
        TIFF tile compression.

    Returns
    -------
    TypedMosaicSlide
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = math.ceil(len(tiles) / columns)
    tw = max(t.rgb.shape[1] for t in tiles)
    th = max(t.rgb.shape[0] for t in tiles)
    width = gap_px + min(columns, len(tiles)) * (tw + gap_px)
    height = gap_px + rows * (th + gap_px)
    width, height = -(-width // 16) * 16, -(-height // 16) * 16
    canvas = np.full((height, width, 3), 255, np.uint8)
    features: list[str] = []
    origins: list[tuple[int, int]] = []
    all_xy: list[npt.NDArray[np.float64]] = []
    all_classes: list[str] = []
    for k, tile in enumerate(tiles):
        x0 = gap_px + (k % columns) * (tw + gap_px)
        y0 = gap_px + (k // columns) * (th + gap_px)
        h, w = tile.rgb.shape[:2]
        canvas[y0 : y0 + h, x0 : x0 + w] = tile.rgb
        origins.append((x0, y0))
        offset = np.array([x0, y0], np.float64)
        xy = np.asarray(tile.xy, np.float64).reshape(-1, 2) + offset
        all_xy.append(xy)
        all_classes += list(tile.classes)
        if as_outlines:
            if tile.outlines is None:
                raise ValueError(f"tile {k}: as_outlines needs outlines")
            for j, (outline, cls) in enumerate(zip(tile.outlines, tile.classes, strict=True)):
                if outline is None or len(outline) < 3:
                    continue
                fixed = shapely.make_valid(shapely.Polygon(np.asarray(outline) + offset))
                parts = [g for g in _flat_parts(fixed) if g.geom_type == "Polygon" and g.area > 0]
                if not parts:
                    continue
                poly = max(parts, key=lambda g: g.area)
                features.append(
                    qupath_feature(
                        shapely.Polygon(np.round(np.asarray(poly.exterior.coords), 2)),
                        object_id=str(uuid.uuid5(_NS, f"{name}/{k}/{j}")),
                        class_name=cls,
                        class_color=class_colors.get(cls),
                        object_type="detection",
                    )
                )
        else:
            for cls in sorted(set(tile.classes)):
                sel = np.array([c == cls for c in tile.classes])
                pts = shapely.MultiPoint(np.round(xy[sel], 2))
                features.append(
                    qupath_feature(
                        pts,
                        object_id=str(uuid.uuid5(_NS, f"{name}/{k}/{cls}")),
                        class_name=cls,
                        class_color=class_colors.get(cls),
                    )
                )
    slide = write_pyramidal_tiff(out / f"{name}.tiff", canvas, mpp=mpp, compression=compression)
    geojson = write_qupath_geojson(out / f"{name}.geojson", features)
    return TypedMosaicSlide(
        slide=slide,
        geojson=geojson,
        mpp=mpp,
        dimensions=(width, height),
        origins=tuple(origins),
        xy=np.concatenate(all_xy) if all_xy else np.zeros((0, 2)),
        classes=tuple(all_classes),
    )
