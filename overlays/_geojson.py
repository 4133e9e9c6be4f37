"""Streaming QuPath GeoJSON writers (nuclei as detections, tissue classes as annotations).

Format: one ``FeatureCollection`` per file, strict UTF-8 JSON, ``.geojson`` or gzip-compressed
``.geojson.gz`` (QuPath decides by the name), level-0 px coordinates rounded to 2 decimals, valid
polygons with closed rings, deterministic ids ``uuid5(NUCLEUS_ID_NAMESPACE, f"{ns}:{index}")``.
See ``shared/spec/qupath-geojson.md``; every file passes ``check_qupath_geojson.py``.

The nucleus writer never holds more than one chunk (``chunk_size`` nuclei) of features: it writes
the collection header, then each chunk, then the footer. A chunk is formatted by numpy as
fixed-width text rows (see ``_json_text``: numbers right-aligned in space-padded fields, one row
per feature and one per polygon vertex, spliced without a Python loop per feature) and, for
``.gz``, deflated by ISA-L on worker threads while the next chunk is formatted (one gzip member
per chunk). About 4-5 µs of CPU per polygon nucleus for the text and 2.5 µs for the deflate.

Measurement names (per detection, same set on every nucleus; a non-finite value is left out, as
QuPath v0.4 cannot read NaN) are :data:`~slidestream.overlays.MEASUREMENT_DISPLAY_NAMES`:
``Area µm^2``, ``Perimeter µm``, ``Equivalent diameter µm``, ``Major axis µm``, ``Minor axis µm``,
``Eccentricity``, ``Solidity``, ``Circularity``, ``Red: Mean``, ``Green: Mean``, ``Blue: Mean``,
``Hematoxylin OD: Mean``, ``Eosin OD: Mean``, and for a typing model ``Type probability:
<Type>``; unknown measurement keys are written as-is.

Classification: with ``classify_by="type"`` (the default of ``slidestream run`` for a typing
model) a detection's QuPath classification is its nucleus type (``Epithelial``,
``Inflammatory``, ``Spindle``, ``Other``, fixed colours: :data:`NUCLEUS_TYPE_COLORS`) and the
tissue class of its region goes into the object's metadata (``"metadata":{"tissue_class":
"Tumor"}``: QuPath >= 0.5 keeps string metadata on the object); with ``classify_by="tissue"``
the classification is the tissue class and the type goes into ``metadata.nucleus_type``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Literal, cast

import geojson
import imagecodecs
import numpy as np
import numpy.typing as npt
import orjson
import shapely
from isal import isal_zlib
from shapely.geometry.base import BaseGeometry

from slidestream._atomic import atomic_open, atomic_path
from slidestream.errors import ConfigError, GeometryError

from . import _json_text as jt
from ._ids import NUCLEUS_ID_NAMESPACE, nucleus_ids, uuid5_text
from ._nucleus_types import NUCLEUS_TYPE_COLORS, type_classification
from ._parquet import ParquetStream
from ._table import UNCLASSIFIED, NucleusTable, measurement_display_name

__all__ = [
    "NUCLEUS_ID_NAMESPACE",
    "RGB",
    "nucleus_ids",
    "write_nuclei_geojson",
    "write_tissue_geojson",
]

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]

ClassifyBy = Literal["tissue", "type"]
"""What a nucleus detection's QuPath classification is: its tissue class, or its nucleus type."""

_HEADER: Final = b'{"type":"FeatureCollection","features":[\n'
_FOOTER: Final = b"\n]}\n"
_DEFAULT_COLOR: Final[RGB] = (128, 128, 128)
_COORD_DIGITS: Final = 5  # integer digits of level-0 px coordinates that never widen a field


def _check_name(path: Path) -> bool:
    """Return True for gzip; raise unless QuPath would read the file name."""
    name = path.name.lower()
    if not name.removesuffix(".gz").endswith((".geojson", ".json")):
        raise ConfigError(
            f"{path}: QuPath reads objects only from .geojson / .geojson.gz (or .json) files; "
            "rename the output"
        )
    return name.endswith(".gz")


_GZIP_HEADER: Final = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, mtime 0, OS unknown
_MAX_ISAL_LEVEL: Final = 3
_MAX_COMPRESSLEVEL: Final = 12


def _gzip_member(data: bytes | memoryview, level: int) -> bytes:
    """One complete gzip member (header with mtime 0 and no name, deflate data, trailer).

    Levels 0-3 deflate with ISA-L (``isal``): level 1 is about 4 times as fast as zlib level 1 and
    compresses as well as zlib level 3. Levels 4-12 use libdeflate (through imagecodecs): smaller
    and slower. Both release the GIL.
    """
    body: bytes | bytearray
    if level <= _MAX_ISAL_LEVEL:
        body = isal_zlib.compress(data, level, wbits=-15)
    else:  # imagecodecs reads any contiguous buffer; its stub names only bytes, bytearray, mmap
        body = imagecodecs.deflate_encode(cast(bytes, data), level=level, raw=True)
    trailer = struct.pack("<II", isal_zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return b"".join((_GZIP_HEADER, body, trailer))


class _Sink:
    """Ordered output of byte blocks; for gzip, blocks are compressed on threads.

    A ``.gz`` file is written as a sequence of gzip members (RFC 1952 allows several; Java's
    ``GZIPInputStream``, used by QuPath, and Python's ``gzip`` read them as one stream). Deflate
    releases the GIL, so compression of one chunk overlaps the formatting of the next.
    """

    def __init__(self, raw: IO[bytes], *, gz: bool, level: int, threads: int = 2) -> None:
        self._raw, self._gz, self._level = raw, gz, level
        self._pool = ThreadPoolExecutor(max_workers=threads) if gz else None
        self._pending: deque[Future[bytes]] = deque()
        self._limit = threads + 1

    def write(self, data: bytes | memoryview) -> None:
        if self._pool is None:
            self._raw.write(data)
            return
        self._pending.append(self._pool.submit(_gzip_member, data, self._level))
        while len(self._pending) > self._limit:
            self._raw.write(self._pending.popleft().result())

    def finish(self) -> None:
        while self._pending:
            self._raw.write(self._pending.popleft().result())

    def close(self) -> None:
        if self._pool is not None:
            for fut in self._pending:
                fut.cancel()
            self._pool.shutdown(wait=True)


@contextlib.contextmanager
def _open_output(path: Path, compresslevel: int) -> Iterator[_Sink]:
    """Atomic output; gzip (deterministic: no name, mtime 0) for ``.gz`` names."""
    gz = _check_name(path)
    with atomic_open(path) as raw:
        sink = _Sink(raw, gz=gz, level=compresslevel)
        try:
            yield sink
            sink.finish()
        finally:
            sink.close()


def _classification_text(name: str, class_colors: Mapping[str, RGB]) -> bytes:
    """``"classification":{...},`` for a class; empty for unclassified nuclei."""
    if name in ("", UNCLASSIFIED):
        return b""
    color = [int(c) & 0xFF for c in class_colors.get(name, _DEFAULT_COLOR)]
    return b'"classification":' + orjson.dumps({"name": name, "color": color}) + b","


class _Rows:
    """Column layout of fixed-width text rows: constant bytes and fields, in order.

    Tracks the width of this chunk's rows and their *minimum* width (every field at its minimum),
    which does not depend on the data; they differ only when a field widened (NUL padding).
    """

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.width = 0
        self.min_width = 0

    def add(self, text: bytes, min_width: int | None = None) -> int:
        """Append ``text`` (a constant, or a field's blank) and return its first column."""
        self.parts.append(text)
        self.width += len(text)
        self.min_width += len(text) if min_width is None else min_width
        return self.width - len(text)

    def add_field(self, field: jt.NumberField) -> int:
        """Append a number field's blank and return its first column."""
        return self.add(field.blank, field.min_width)

    def template(self) -> bytes:
        """The constant bytes of a row (fields blank)."""
        return b"".join(self.parts)


def _metadata_text(key: str, value: str) -> bytes:
    """``"metadata":{"key":"value"},`` (QuPath >= 0.5 object metadata); empty without a value."""
    if value in ("", UNCLASSIFIED):
        return b""
    return b'"metadata":' + orjson.dumps({key: value}) + b","


def _label_field(
    n: int, labels: npt.NDArray[np.str_] | None, render: Callable[[str], bytes], min_width: int
) -> tuple[npt.NDArray[np.uint8], int]:
    """Per-nucleus text of a label (``render(label)``), shape (n, w), left-aligned.

    Shorter texts are padded with spaces up to ``min_width`` (fixed per file, so the output does
    not depend on the chunking) and with NUL beyond, which is removed afterwards.
    """
    if labels is None:
        return np.full((n, min_width), 32, np.uint8), min_width
    names, inverse = np.unique(labels, return_inverse=True)
    texts = [render(str(name)) for name in names]
    width = max([min_width, *map(len, texts)])
    padded = [t.ljust(min_width).ljust(width, b"\0") for t in texts]
    return jt.lookup(padded, inverse.ravel()), width


def _qupath_types(table: NucleusTable) -> npt.NDArray[np.str_] | None:
    """The QuPath classification name of each nucleus's type (``""``: untyped)."""
    if table.types is None:
        return None
    names, inverse = np.unique(table.types, return_inverse=True)
    mapped = np.array([type_classification(str(t)) if t else "" for t in names], dtype=np.str_)
    return mapped[inverse.ravel()]


@dataclass(frozen=True, slots=True)
class _Labelling:
    """How one file labels its detections: classification and metadata, fixed widths."""

    classify_by: ClassifyBy
    class_colors: Mapping[str, RGB]
    """Colour of each classification name of this file (tissue classes or QuPath types)."""
    class_min_width: int
    metadata_key: str
    metadata_min_width: int

    @classmethod
    def make(
        cls,
        classify_by: ClassifyBy,
        tissue_colors: Mapping[str, RGB],
        type_colors: Mapping[str, RGB],
    ) -> _Labelling:
        colors = dict(type_colors if classify_by == "type" else tissue_colors)
        others = tissue_colors if classify_by == "type" else type_colors
        key = "tissue_class" if classify_by == "type" else "nucleus_type"
        return cls(
            classify_by=classify_by,
            class_colors=colors,
            class_min_width=max((len(_classification_text(c, colors)) for c in colors), default=0),
            metadata_key=key,
            metadata_min_width=max((len(_metadata_text(key, c)) for c in others), default=0),
        )

    def labels(
        self, table: NucleusTable
    ) -> tuple[npt.NDArray[np.str_] | None, npt.NDArray[np.str_] | None]:
        """(classification names, metadata values) of the nuclei of ``table``."""
        types = _qupath_types(table)
        if self.classify_by == "type":
            return types, table.classes if types is not None else None
        return table.classes, types


def _leave_out_non_finite(
    finite: npt.NDArray[np.bool_], rows: npt.NDArray[np.uint8], members: list[tuple[int, int]]
) -> None:
    """Blank the members ``(start, stop)`` of non-finite measurements (QuPath v0.4 reads no NaN).

    A left-out member becomes spaces (its NUL padding stays NUL); the comma before the first
    remaining member of a row is blanked too, so the object stays valid JSON.
    """
    bad = np.flatnonzero(~finite.all(axis=1))
    if not len(bad):
        return
    for j, (start, stop) in enumerate(members):
        which = bad[~finite[bad, j]]
        block = rows[which, start:stop]
        rows[which, start:stop] = np.where(block == 0, 0, 32).astype(np.uint8)
    first = np.argmax(finite[bad], axis=1)
    keep = finite[bad, first] & (first > 0)
    comma = np.array([start for start, _ in members])[first[keep]]
    rows[bad[keep], comma] = 32


def _properties(
    table: NucleusTable, labelling: _Labelling
) -> tuple[_Rows, Callable[[npt.NDArray[np.uint8], int], None]]:
    """Layout of ``"properties":{...}}},\\n`` and a function filling it into rows at a column.

    Measurements are written as ``"Area µm^2": 12.35`` (4 significant digits).
    """
    rows = _Rows()
    rows.add(b'"properties":{"objectType":"detection",')
    names, meta = labelling.labels(table)
    colors, key = labelling.class_colors, labelling.metadata_key
    classification, class_width = _label_field(
        len(table), names, lambda c: _classification_text(c, colors), labelling.class_min_width
    )
    class_col = rows.add(b" " * class_width, labelling.class_min_width)
    metadata, meta_width = _label_field(
        len(table), meta, lambda v: _metadata_text(key, v), labelling.metadata_min_width
    )
    meta_col = rows.add(b" " * meta_width, labelling.metadata_min_width)
    rows.add(b'"measurements":{')
    keys = table.measurement_names
    values = np.stack([table.measurements[k] for k in keys], axis=1) if keys else None
    fields = [] if values is None else jt.significant_field(values, 4).split(len(keys))
    members: list[tuple[int, int]] = []  # (start, stop) of ',"name": value'
    cols: list[int] = []
    for j, (key, field) in enumerate(zip(keys, fields, strict=True)):
        start = rows.add((b"," if j else b"") + orjson.dumps(measurement_display_name(key)) + b":")
        cols.append(rows.add_field(field))
        members.append((start, rows.width))
    rows.add(b"}}},\n")

    def fill(out: npt.NDArray[np.uint8], at: int) -> None:
        out[:, at + class_col : at + class_col + class_width] = classification
        out[:, at + meta_col : at + meta_col + meta_width] = metadata
        for col, field in zip(cols, fields, strict=True):
            field.write(out, at + col)
        if values is not None:
            moved = [(at + a, at + b) for a, b in members]
            _leave_out_non_finite(np.isfinite(values), out, moved)

    return rows, fill


def _nuclei_chunk_text(
    table: NucleusTable,
    id_text: npt.NDArray[np.uint8],
    *,
    as_points: bool,
    labelling: _Labelling,
) -> bytes | memoryview:
    """Serialise the nuclei of ``table`` as features, each followed by ``,\\n``.

    Fixed-width rows (one per feature, plus one per polygon vertex) filled by numpy; see
    :mod:`._json_text`. Coordinates have 2 decimals, measurements 4 significant digits.
    """
    n = len(table)
    head = _Rows()
    head.add(b'{"type":"Feature","id":"')
    id_col = head.add(b" " * 36)
    tail, fill_tail = _properties(table, labelling)
    if as_points:
        x, y = jt.fixed_field(table.centroids(), 2, min_int_digits=_COORD_DIGITS).split(2)
        head.add(b'","geometry":{"type":"Point","coordinates":[')
        x_col = head.add_field(x)
        head.add(b",")
        y_col = head.add_field(y)
        head.add(b"]},")
        rows = jt.template(n, head.template() + tail.template())
        rows[:, id_col : id_col + 36] = id_text
        x.write(rows, x_col)
        y.write(rows, y_col)
        fill_tail(rows, head.width)
        widened = head.width + tail.width > head.min_width + tail.min_width
        return jt.drop_nul(rows.tobytes()) if widened else rows.data.cast("B")
    head.add(b'","geometry":{"type":"Polygon","coordinates":[[')
    x, y = jt.fixed_field(table.coords, 2, min_int_digits=_COORD_DIGITS).split(2)
    vertex = _Rows()
    vertex.add(b"[")
    vx_col = vertex.add_field(x)
    vertex.add(b",")
    vy_col = vertex.add_field(y)
    vertex.add(b"],")
    vertices = jt.template(len(table.coords), vertex.template())
    x.write(vertices, vx_col)
    y.write(vertices, vy_col)
    ring_ends = table.offsets[1:][np.diff(table.offsets) > 0] - 1
    vertices[ring_ends, -1] = 32  # "] ": no comma after the last vertex of a ring
    # Row k = the end of feature k - 1, then the start of feature k; vertex rows go between.
    # splice_runs needs the row width to be a multiple of the vertex width: pad the start of
    # the ring with spaces (as many in every chunk: JSON whitespace is part of the output) plus,
    # where a field widened in this chunk, NULs.
    end = b"]]},"
    spaces = -(len(end) + tail.min_width + head.min_width) % vertex.min_width
    nuls = -(len(end) + tail.width + head.width + spaces) % vertex.width
    head.add(b" " * spaces + bytes(nuls), spaces)
    rows = jt.template(n + 1, end + tail.template() + head.template())
    fill_tail(rows[1:], len(end))
    t_width = len(end) + tail.width
    rows[:-1, t_width + id_col : t_width + id_col + 36] = id_text
    flat = jt.splice_runs(rows, vertices, table.offsets)
    text = flat.data[t_width : len(flat) - head.width]  # no row 0 end, no row n start
    widened = (tail.width, head.width, vertex.width) != (
        tail.min_width,
        head.min_width,
        vertex.min_width,
    )
    return jt.drop_nul(bytes(text)) if widened else text


def write_nuclei_geojson(
    path: str | os.PathLike[str],
    tables: Iterable[NucleusTable],
    *,
    id_namespace: str,
    as_points: bool = False,
    class_colors: Mapping[str, RGB] | None = None,
    compresslevel: int = 1,
    chunk_size: int = 20_000,
    parquet_path: str | os.PathLike[str] | None = None,
    l0_bounds: tuple[float, float] | None = None,
    classify_by: ClassifyBy = "tissue",
    type_colors: Mapping[str, RGB] | None = None,
) -> int:
    """Stream nuclei to a QuPath GeoJSON FeatureCollection of detections.

    Every geometry is checked before it is formatted (:func:`check_nuclei_geometry`): finite,
    inside ``l0_bounds`` when given, and for polygons a closed ring of at least 4 positions that
    is valid (OGC) with a positive area once rounded to 0.01 px. One bad geometry raises
    :class:`~slidestream.errors.GeometryError` and nothing is published (QuPath rejects a whole
    file for one bad geometry).

    Polygon vertices and Point coordinates are level-0 px with 2 decimals (``12345.60``),
    measurements have 4 significant digits (at most 4 decimals). Numbers are right-aligned in
    fixed-width fields padded with spaces (JSON whitespace, e.g. ``"Area µm^2": 12.35``), which is
    what lets a chunk be formatted as one numpy matrix; the text depends only on the nuclei, not on
    ``chunk_size``.

    Parameters
    ----------
    path : str or PathLike
        ``*.geojson`` (plain) or ``*.geojson.gz`` (gzip, level ``compresslevel``).
    tables : iterable of NucleusTable
        Consumed once, in order; nucleus ``index`` runs over all tables from 0.
    id_namespace : str
        Per-slide id namespace (the slide fingerprint): ids are
        ``uuid5(NUCLEUS_ID_NAMESPACE, f"{id_namespace}:{index}")``, the same as in parquet.
    as_points : bool
        Write centroids as Points instead of polygons (for slides too big for QuPath's memory).
    class_colors : mapping, optional
        Tissue class -> ``(r, g, b)``; unknown classes are grey. Nuclei without a class (or
        :data:`UNCLASSIFIED`) get no classification.
    compresslevel : int
        Deflate level for ``.gz``, 0 to 12: 0-3 by ISA-L (1, the default, compresses like zlib
        level 3 at 4 times zlib level 1's speed, so writing stays well above 100,000 nuclei/s),
        4-12 by libdeflate (smaller files, slower).
    chunk_size : int
        Nuclei formatted per batch (bounds memory).
    parquet_path : str or PathLike, optional
        Also write ``nuclei.parquet`` (see :func:`write_nuclei_parquet`) in the same pass, so
        ``tables`` may be a one-shot generator; both files are published only if both succeed.
    l0_bounds : (width, height), optional
        The slide's level-0 size in px; a coordinate outside ``[0, width] x [0, height]`` is an
        error (the stitcher clips outlines to the slide, :func:`clip_to_bounds`).
    classify_by : {"tissue", "type"}
        The QuPath classification of a nucleus: its tissue class (``NucleusTable.classes``,
        the default) or its nucleus type (``NucleusTable.types``, as
        :func:`type_classification` names it); the other one is written as object metadata
        (``tissue_class`` / ``nucleus_type``). Tables without types are classified by tissue
        class either way.
    type_colors : mapping, optional
        QuPath type classification -> ``(r, g, b)`` (default :data:`NUCLEUS_TYPE_COLORS`).

    Returns
    -------
    int
        Number of features written.
    """
    if not 0 <= compresslevel <= _MAX_COMPRESSLEVEL:
        raise ConfigError(
            f"write_nuclei_geojson: compresslevel {compresslevel} is out of range; "
            f"use 0 to {_MAX_COMPRESSLEVEL} (1 is fast and compact)"
        )
    if classify_by not in ("tissue", "type"):
        raise ConfigError(f"classify_by={classify_by!r} is unknown; use 'tissue' or 'type'")
    target = Path(path)
    labelling = _Labelling.make(
        classify_by,
        dict(class_colors or {}),
        dict(NUCLEUS_TYPE_COLORS if type_colors is None else type_colors),
    )
    untyped = _Labelling.make("tissue", dict(class_colors or {}), {})
    count = 0
    pending: bytes | memoryview = b""
    with contextlib.ExitStack() as stack:
        parquet: ParquetStream | None = None
        if parquet_path is not None:
            tmp = stack.enter_context(atomic_path(parquet_path))
            parquet = ParquetStream(tmp, id_namespace=id_namespace)
            stack.callback(parquet.abort)
        out = stack.enter_context(_open_output(target, compresslevel))
        out.write(_HEADER)
        for table in tables:
            for start in range(0, len(table), chunk_size):
                chunk = table.slice(start, start + chunk_size)
                check_nuclei_geometry(
                    chunk, as_points=as_points, l0_bounds=l0_bounds, first_index=count, path=target
                )
                id_text = uuid5_text(id_namespace, count, len(chunk))
                body = _nuclei_chunk_text(
                    chunk,
                    id_text,
                    as_points=as_points,
                    labelling=labelling if chunk.types is not None else untyped,
                )
                if pending:
                    out.write(pending)
                pending = body
                if parquet is not None:
                    parquet.write(chunk, id_text)
                count += len(chunk)
        if pending:
            out.write(pending[:-2])  # no comma after the last feature
        out.write(_FOOTER)
        if parquet is not None:
            parquet.close()
    logger.info("wrote %d nuclei to %s", count, target)
    return count


def check_nuclei_geometry(
    table: NucleusTable,
    *,
    as_points: bool = False,
    l0_bounds: tuple[float, float] | None = None,
    first_index: int = 0,
    path: str | os.PathLike[str] = "nuclei.geojson",
) -> None:
    """Raise :class:`GeometryError` if a nucleus of ``table`` would be written invalid.

    Checks what QuPath's reader needs, on the coordinates as written (rounded to 0.01 px):
    finite numbers, inside ``[0, width] x [0, height]`` when ``l0_bounds`` is given, and for
    polygons a closed ring of at least 4 positions that is OGC-valid (no self-intersection)
    with a positive area. Vectorised: the validity part (about 3-4 µs per nucleus) is skipped for
    tables whose outlines the stitcher checked (``NucleusTable.outlines_valid``, in the
    post-processing workers); the rest costs well under 1 µs per nucleus.
    """
    n = len(table)
    if n == 0:
        return
    reason = np.full(n, "", dtype=object)
    pts = table.centroids() if as_points else np.round(table.coords, 2)
    owner = np.arange(n) if as_points else np.repeat(np.arange(n), np.diff(table.offsets))
    bad_pt = ~np.isfinite(pts).all(axis=1)
    if l0_bounds is not None:
        width, height = l0_bounds
        bad_pt |= (pts[:, 0] < 0) | (pts[:, 0] > width) | (pts[:, 1] < 0) | (pts[:, 1] > height)
    if bad_pt.any():
        where = "outside the slide" if l0_bounds is not None else "not finite"
        reason[np.unique(owner[bad_pt])] = f"a coordinate is {where} or not finite"
    if not as_points:
        counts = np.diff(table.offsets)
        short = counts < 4
        reason[short & (reason == "")] = "a ring with fewer than 4 positions"
        ok = np.flatnonzero(~short)
        if ok.size:
            first, last = table.offsets[:-1][ok], table.offsets[1:][ok] - 1
            open_ring = (pts[first] != pts[last]).any(axis=1)
            reason[ok[open_ring & (reason[ok] == "")]] = "a ring that is not closed"
            good = np.flatnonzero(reason == "")
            if good.size and not table.outlines_valid:  # the stitcher checked them already
                sub = np.concatenate(
                    [np.arange(table.offsets[i], table.offsets[i + 1]) for i in good]
                )
                index = np.repeat(np.arange(good.size), counts[good])
                geoms = shapely.polygons(shapely.linearrings(pts[sub], indices=index))
                invalid = ~shapely.is_valid(geoms) | ~(shapely.area(geoms) > 0)
                reason[good[invalid]] = "an invalid (self-intersecting or empty) outline"
    bad = np.flatnonzero(reason != "")
    if bad.size:
        i = int(bad[0])
        raise GeometryError(
            f"{path}: nucleus {first_index + i} has {reason[i]} "
            f"({bad.size} of {n} nuclei in this block); nothing was written. This is a bug in "
            "the stitching; please report it with the slide"
        )


def _check_structure(collection: Mapping[str, object], path: str | os.PathLike[str]) -> None:
    """Check a FeatureCollection's GeoJSON structure with the ``geojson`` library (RFC 7946:
    types, closed rings of >= 4 positions, numeric coordinates); raise :class:`GeometryError`."""
    parsed = geojson.GeoJSON.to_instance(collection, strict=True)
    if not parsed.is_valid:
        raise GeometryError(
            f"{path}: the GeoJSON is malformed ({parsed.errors()}); nothing was written. "
            "Please report this"
        )


def _rounded_polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Round to 0.01 px (QuPath's precision), repairing anything rounding made invalid."""
    g = shapely.set_precision(geom, 0.01)
    if not g.is_valid:
        g = shapely.make_valid(g)
    parts = shapely.get_parts(g)
    parts = parts[(shapely.get_type_id(parts) == 3) & (shapely.area(parts) > 0)]
    if parts.size == 1:
        return parts[0]  # type: ignore[no-any-return]
    return shapely.MultiPolygon(list(parts))


def write_tissue_geojson(
    path: str | os.PathLike[str],
    class_polygons: Mapping[str, BaseGeometry],
    *,
    class_colors: Mapping[str, RGB] | None = None,
    mpp: float,
    id_namespace: str,
    l0_bounds: tuple[float, float] | None = None,
) -> int:
    """Write tissue regions as QuPath annotations, one per class.

    Geometries are clipped to ``l0_bounds``, rounded to 0.01 px, repaired if rounding made them
    invalid, and checked: a geometry that is still invalid raises
    :class:`~slidestream.errors.GeometryError` (nothing is written).

    Parameters
    ----------
    path : str or PathLike
        ``*.geojson`` or ``*.geojson.gz``.
    class_polygons : mapping
        Class name -> Polygon / MultiPolygon in level-0 px (from ``class_map_to_polygons``).
    class_colors : mapping, optional
        Class -> ``(r, g, b)``.
    mpp : float
        Level-0 µm/px, for the ``Area µm^2`` / ``Area mm^2`` measurements.
    id_namespace : str
        Slide fingerprint; ids are ``uuid5(NUCLEUS_ID_NAMESPACE, f"{ns}:tissue:{class}")``.
    l0_bounds : (width, height), optional
        The slide's level-0 size in px: regions are clipped to ``[0, width] x [0, height]``.

    Returns
    -------
    int
        Number of annotations written (classes with an empty region are skipped).
    """
    if mpp <= 0:
        raise ConfigError(f"write_tissue_geojson: mpp {mpp} must be > 0 (level-0 µm/px)")
    colors = dict(class_colors or {})
    features = []
    box = None if l0_bounds is None else shapely.box(0.0, 0.0, *l0_bounds)
    for name, geom in class_polygons.items():
        g = _rounded_polygonal(geom if box is None else shapely.intersection(geom, box))
        if g.is_empty:
            continue
        if not g.is_valid or (box is not None and not box.covers(g)):
            raise GeometryError(
                f"{path}: tissue region {name!r} is invalid after rounding "
                f"({shapely.is_valid_reason(g)}); nothing was written. Please report this"
            )
        area_um2 = float(geom.area) * mpp * mpp
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(NUCLEUS_ID_NAMESPACE, f"{id_namespace}:tissue:{name}")),
                "geometry": shapely.geometry.mapping(g),
                "properties": {
                    "objectType": "annotation",
                    "name": name,
                    "classification": {
                        "name": name,
                        "color": [int(c) & 0xFF for c in colors.get(name, _DEFAULT_COLOR)],
                    },
                    "measurements": {
                        "Area µm^2": round(area_um2, 2),
                        "Area mm^2": round(area_um2 / 1e6, 6),
                    },
                },
            }
        )
    collection = {"type": "FeatureCollection", "features": features}
    _check_structure(collection, path)
    with _open_output(Path(path), compresslevel=6) as out:
        out.write(orjson.dumps(collection))
        out.write(b"\n")
    return len(features)
