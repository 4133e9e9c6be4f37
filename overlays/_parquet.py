"""``nuclei.parquet``: one row per nucleus, streamed one row group per table chunk.

Columns: ``id`` (the same uuid5 as the GeoJSON feature), ``index`` (running nucleus index),
``centroid_x``, ``centroid_y``, ``bbox_x0``, ``bbox_y0``, ``bbox_x1``, ``bbox_y1`` (level-0 px,
float64), every measurement under its ``measure_nuclei`` key (``area_um2``, ..., float64) and
``tissue_class`` (string; null for unclassified nuclei).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._atomic import atomic_path
from ._geojson import nucleus_ids
from ._table import UNCLASSIFIED, NucleusTable

__all__ = ["write_nuclei_parquet"]

logger = logging.getLogger(__name__)

_GEOMETRY_COLUMNS = ("centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")


def _arrow_chunk(table: NucleusTable, start: int, id_namespace: str) -> pa.Table:
    n = len(table)
    cols: dict[str, pa.Array] = {
        "id": pa.array(nucleus_ids(id_namespace, start, n), pa.string()),
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
    return pa.table(cols)


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
    count = 0
    writer: pq.ParquetWriter | None = None
    with atomic_path(target) as tmp:
        try:
            for table in tables:
                for start in range(0, len(table), chunk_size):
                    chunk = _arrow_chunk(
                        table.slice(start, start + chunk_size), count, id_namespace
                    )
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, chunk.schema, compression=compression)
                    writer.write_table(chunk, row_group_size=len(chunk))
                    count += len(chunk)
            if writer is None:  # no nuclei: still a valid, empty file with the base columns
                empty = _arrow_chunk(NucleusTable.empty(), 0, id_namespace)
                pq.write_table(empty, tmp, compression=compression)
        finally:
            if writer is not None:
                writer.close()
    logger.info("wrote %d nuclei to %s", count, target)
    return count
