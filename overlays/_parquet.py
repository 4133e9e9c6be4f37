"""``nuclei.parquet``: one row per nucleus, streamed one row group per table chunk.

Columns: ``id`` (the same uuid5 as the GeoJSON feature), ``index`` (running nucleus index),
``centroid_x``, ``centroid_y``, ``bbox_x0``, ``bbox_y0``, ``bbox_x1``, ``bbox_y1`` (level-0 px,
float64), every measurement under its ``measure_nuclei`` key (``area_um2``, ..., float64; for a
typing model also ``p_<type>``, the nucleus's mean type probabilities), ``tissue_class`` (string;
null for unclassified nuclei) and, for a typing model, ``type`` (the type with the highest
probability, e.g. ``inflammatory``; the column is absent for a model without a type head).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from slidestream._atomic import atomic_path

from ._ids import uuid5_text
from ._table import UNCLASSIFIED, NucleusTable

__all__ = ["ParquetStream", "write_nuclei_parquet"]

logger = logging.getLogger(__name__)

_GEOMETRY_COLUMNS = ("centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")


def _id_array(id_text: npt.NDArray[np.uint8]) -> pa.Array:
    """Arrow strings from a ``(n, 36)`` ASCII matrix of ids (built on its buffer, no Python str)."""
    n = len(id_text)
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    data = np.ascontiguousarray(id_text, dtype=np.uint8)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def _arrow_chunk(
    table: NucleusTable,
    start: int,
    id_namespace: str,
    id_text: npt.NDArray[np.uint8] | None = None,
) -> pa.Table:
    n = len(table)
    if id_text is None:
        id_text = uuid5_text(id_namespace, start, n)
    cols: dict[str, pa.Array] = {
        "id": _id_array(id_text),
        "index": pa.array(np.arange(start, start + n, dtype=np.int64)),
    }
    for name in _GEOMETRY_COLUMNS:
        cols[name] = pa.array(getattr(table, name), pa.float64())
    for name, values in table.measurements.items():
        cols[name] = pa.array(values, pa.float64())
    if table.classes is None:
        cols["tissue_class"] = pa.nulls(n, pa.string())
    else:
        mask = table.classes == UNCLASSIFIED
        cols["tissue_class"] = pa.array(table.classes.tolist(), pa.string(), mask=mask)
    if table.types is not None:
        cols["type"] = pa.array(table.types.tolist(), pa.string(), mask=table.types == "")
    return pa.table(cols)


class ParquetStream:
    """Incremental parquet writer of nucleus chunks (the schema comes from the first chunk)."""

    def __init__(self, path: Path, *, id_namespace: str, compression: str = "zstd") -> None:
        self._path, self._ns, self._compression = path, id_namespace, compression
        self._writer: pq.ParquetWriter | None = None
        self.count = 0

    def write(self, table: NucleusTable, id_text: npt.NDArray[np.uint8] | None = None) -> None:
        """Append ``table`` as one row group; its first nucleus gets index ``self.count``.

        ``id_text`` are the nuclei's ids as ``uuid5_text`` returns them, when the caller has
        computed them already (the GeoJSON writer); otherwise they are computed here.
        """
        if not len(table):
            return
        chunk = _arrow_chunk(table, self.count, self._ns, id_text)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._path, chunk.schema, compression=self._compression)
        self._writer.write_table(chunk, row_group_size=len(chunk))
        self.count += len(table)

    def close(self) -> None:
        """Finish the file (an empty file with the base columns when nothing was written)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        elif self.count == 0:
            empty = _arrow_chunk(NucleusTable.empty(), 0, self._ns)
            pq.write_table(empty, self._path, compression=self._compression)
            self.count = -1  # closed

    def abort(self) -> None:
        """Close without finishing (the caller discards the file)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_nuclei_parquet(
    path: str | os.PathLike[str],
    tables: Iterable[NucleusTable],
    *,
    id_namespace: str,
    chunk_size: int = 100_000,
    compression: str = "zstd",
) -> int:
    """Stream nuclei to a parquet file (one row group per chunk of at most ``chunk_size`` rows).

    Parameters
    ----------
    path : str or PathLike
        Output ``.parquet``; written atomically.
    tables : iterable of NucleusTable
        Consumed once, in order (the same order as for the GeoJSON, so ids and indices match).
    id_namespace : str
        Slide fingerprint, as for :func:`write_nuclei_geojson`.
    chunk_size : int
        Largest row group.
    compression : str
        Parquet codec.

    Returns
    -------
    int
        Number of rows written.
    """
    target = Path(path)
    with atomic_path(target) as tmp:
        stream = ParquetStream(tmp, id_namespace=id_namespace, compression=compression)
        try:
            for table in tables:
                for start in range(0, len(table), chunk_size):
                    stream.write(table.slice(start, start + chunk_size))
            count = stream.count
            stream.close()
        except BaseException:
            stream.abort()
            raise
    logger.info("wrote %d nuclei to %s", count, target)
    return count
