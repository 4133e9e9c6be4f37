"""Streaming QuPath GeoJSON writers (nuclei as detections, tissue classes as annotations).

Format: one ``FeatureCollection`` per file, strict UTF-8 JSON, ``.geojson`` or gzip-compressed
``.geojson.gz`` (QuPath decides by the name), level-0 px coordinates rounded to 2 decimals, valid
polygons with closed rings, deterministic ids ``uuid5(NUCLEUS_ID_NAMESPACE, f"{ns}:{index}")``.
See ``shared/spec/qupath-geojson.md``; every file passes ``check_qupath_geojson.py``.

The nucleus writer never holds more than one chunk (``chunk_size`` nuclei) of features: it writes
the collection header, then each chunk serialised with orjson in one call, then the footer.

Measurement names (per detection, same set on every nucleus; a non-finite value is left out, as
QuPath v0.4 cannot read NaN) are :data:`~slidestream.overlays.MEASUREMENT_DISPLAY_NAMES`:
``Area µm^2``, ``Perimeter µm``, ``Equivalent diameter µm``, ``Major axis µm``, ``Minor axis µm``,
``Eccentricity``, ``Solidity``, ``Circularity``, ``Red: Mean``, ``Green: Mean``, ``Blue: Mean``,
``Hematoxylin OD: Mean``, ``Eosin OD: Mean``; unknown measurement keys are written as-is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Final

import numpy as np
import numpy.typing as npt
import orjson
import shapely
from shapely.geometry.base import BaseGeometry

from slidestream.errors import ConfigError

from . import _json_text as jt
from ._atomic import atomic_open, atomic_path
from ._ids import NUCLEUS_ID_NAMESPACE, nucleus_ids, uuid5_text
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

_HEADER: Final = b'{"type":"FeatureCollection","features":[\n'
_FOOTER: Final = b"\n]}\n"
_DEFAULT_COLOR: Final[RGB] = (128, 128, 128)


def _check_name(path: Path) -> bool:
    """Return True for gzip; raise unless QuPath would read the file name."""
    name = path.name.lower()
    if not name.removesuffix(".gz").endswith((".geojson", ".json")):
        raise ConfigError(
            f"{path}: QuPath reads objects only from .geojson / .geojson.gz (or .json) files; "
            "rename the output"
        )
    return name.endswith(".gz")


def _gzip_member(data: bytes, level: int) -> bytes:
    """One complete gzip member (header with mtime 0 and no name, deflate data, trailer)."""
    z = zlib.compressobj(level, zlib.DEFLATED, 31)
    return z.compress(data) + z.flush()


class _Sink:
    """Ordered output of byte blocks; for gzip, blocks are compressed on threads.

    A ``.gz`` file is written as a sequence of gzip members (RFC 1952 allows several; Java's
    ``GZIPInputStream``, used by QuPath, and Python's ``gzip`` read them as one stream). zlib
    releases the GIL, so compression of one chunk overlaps the formatting of the next.
    """

    def __init__(self, raw: IO[bytes], *, gz: bool, level: int, threads: int = 2) -> None:
        self._raw, self._gz, self._level = raw, gz, level
        self._pool = ThreadPoolExecutor(max_workers=threads) if gz else None
        self._pending: deque[Future[bytes]] = deque()
        self._limit = threads + 1

    def write(self, data: bytes) -> None:
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


def _measurement_blocks(table: NucleusTable) -> list[npt.NDArray[np.uint8]]:
    """``"Area µm^2":12.5,...`` blocks; non-finite values are left out (key and all)."""
    n = len(table)
    blocks: list[npt.NDArray[np.uint8]] = []
    keys = table.measurement_names
    if not keys:
        return blocks
    values = np.stack([table.measurements[k] for k in keys], axis=1)
    finite = np.isfinite(values)
    before = np.cumsum(finite, axis=1) - finite  # finite values written before this one
    for j, key in enumerate(keys):
        label = orjson.dumps(measurement_display_name(key)) + b":"
        comma = np.where(finite[:, j] & (before[:, j] > 0), ord(","), 0).astype(np.uint8)
        keep = finite[:, j, None]
        blocks.append(comma[:, None])
        blocks.append(np.where(keep, jt.constant(label, n), 0).astype(np.uint8))
        blocks.append(np.where(keep, jt.format_fixed(values[:, j], 4), 0).astype(np.uint8))
    return blocks


def _nuclei_chunk_bytes(
    table: NucleusTable,
    id_text: npt.NDArray[np.uint8],
    *,
    as_points: bool,
    class_colors: Mapping[str, RGB],
) -> bytes:
    """Serialise the nuclei of ``table`` as features, each followed by ``,\\n``."""
    n = len(table)
    c = jt.constant
    if as_points:
        xy = jt.format_fixed(table.centroids(), 2).reshape(n, -1)
        w = xy.shape[1] // 2
        geometry = [
            c(b'"geometry":{"type":"Point","coordinates":[', n),
            xy[:, :w],
            c(b",", n),
            xy[:, w:],
            c(b"]},", n),
        ]
    else:
        m = len(table.coords)
        xy = jt.format_fixed(table.coords, 2).reshape(m, -1)
        w = xy.shape[1] // 2
        last = np.zeros(m, bool)
        last[table.offsets[1:] - 1] = True
        vertex = np.concatenate(
            [c(b"[", m), xy[:, :w], c(b",", m), xy[:, w:], c(b"]", m),
             np.where(last, 0, ord(",")).astype(np.uint8)[:, None]],
            axis=1,
        )  # fmt: skip
        geometry = [
            c(b'"geometry":{"type":"Polygon","coordinates":[[', n),
            jt.scatter_rows(vertex, table.offsets, n),
            c(b"]]},", n),
        ]
    if table.classes is None:
        classification = np.zeros((n, 0), np.uint8)
    else:
        uniq, inverse = np.unique(table.classes, return_inverse=True)
        texts = [_classification_text(str(u), class_colors) for u in uniq]
        classification = jt.lookup(texts, inverse.ravel())
    blocks = [
        c(b'{"type":"Feature","id":"', n),
        id_text,
        c(b'",', n),
        *geometry,
        c(b'"properties":{"objectType":"detection",', n),
        classification,
        c(b'"measurements":{', n),
        *_measurement_blocks(table),
        c(b"}}},\n", n),
    ]
    return jt.compact(blocks)


def write_nuclei_geojson(
    path: str | os.PathLike[str],
    tables: Iterable[NucleusTable],
    *,
    id_namespace: str,
    as_points: bool = False,
    class_colors: Mapping[str, RGB] | None = None,
    compresslevel: int = 2,
    chunk_size: int = 20_000,
    parquet_path: str | os.PathLike[str] | None = None,
) -> int:
    """Stream nuclei to a QuPath GeoJSON FeatureCollection of detections.

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
        zlib level for ``.gz`` (1-3 keeps writing above 100,000 nuclei/s).
    chunk_size : int
        Nuclei formatted per batch (bounds memory).
    parquet_path : str or PathLike, optional
        Also write ``nuclei.parquet`` (see :func:`write_nuclei_parquet`) in the same pass, so
        ``tables`` may be a one-shot generator; both files are published only if both succeed.

    Returns
    -------
    int
        Number of features written.
    """
    target = Path(path)
    colors = dict(class_colors or {})
    count = 0
    pending = b""
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
                body = _nuclei_chunk_bytes(
                    chunk,
                    uuid5_text(id_namespace, count, len(chunk)),
                    as_points=as_points,
                    class_colors=colors,
                )
                if pending:
                    out.write(pending)
                pending = body
                if parquet is not None:
                    parquet.write(chunk)
                count += len(chunk)
        if pending:
            out.write(pending[:-2])  # no comma after the last feature
        out.write(_FOOTER)
        if parquet is not None:
            parquet.close()
    logger.info("wrote %d nuclei to %s", count, target)
    return count


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
) -> int:
    """Write tissue regions as QuPath annotations, one per class.

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

    Returns
    -------
    int
        Number of annotations written (classes with an empty region are skipped).
    """
    if mpp <= 0:
        raise ConfigError(f"write_tissue_geojson: mpp {mpp} must be > 0 (level-0 µm/px)")
    colors = dict(class_colors or {})
    features = []
    for name, geom in class_polygons.items():
        g = _rounded_polygonal(geom)
        if g.is_empty:
            continue
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
    with _open_output(Path(path), compresslevel=6) as out:
        out.write(orjson.dumps({"type": "FeatureCollection", "features": features}))
        out.write(b"\n")
    return len(features)
