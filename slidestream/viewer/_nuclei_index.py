"""A spatial index over ``nuclei.parquet``: nuclei in a box, a density raster, measurements.

Only what drawing needs stays in memory, 18 bytes per nucleus (centroid, radius, class code and
row number, in grid-cell order): a slide with 10^6 nuclei costs ~18 MB plus its density raster.
Nuclei are sorted by a square grid cell of their centroid (row-major), so the nuclei of a box are
a few contiguous runs, one per grid row. Measurements are read from the parquet row groups on demand
(a small cache of decoded row groups).

Colour key: the nucleus ``type`` column when the file has it, else ``tissue_class`` (the tissue
region the nucleus lies in); null values are ``Unclassified``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy import ndimage

from slidestream.errors import ConfigError
from slidestream.overlays import UNCLASSIFIED

__all__ = ["NucleusIndex", "NucleusRows"]

logger = logging.getLogger(__name__)

_NOT_MEASUREMENTS: Final = frozenset(
    {"id", "index", "centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"}
)
_CLASS_COLUMNS: Final = ("type", "tissue_class")
#: Edge of a density-raster bin in µm.
DENSITY_BIN_UM: Final = 16.0
#: Mean nuclei per index cell aimed at.
_NUCLEI_PER_CELL: Final = 48
_ROW_GROUP_CACHE: Final = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class NucleusRows:
    """Some nuclei with everything the parquet file says about them."""

    index: npt.NDArray[np.int64]
    """Row numbers in ``nuclei.parquet`` (= the order of ``nuclei.geojson.gz``)."""
    columns: dict[str, list[Any]]
    """Every column of those rows, as Python values."""


class NucleusIndex:
    """Nuclei of one ``nuclei.parquet``, indexed by position.

    Parameters
    ----------
    path
        The parquet file (columns as written by ``slidestream.overlays.write_nuclei_parquet``).
    mpp
        The slide's level-0 µm/px.
    l0_dimensions
        The slide's level-0 ``(width, height)`` px.

    Raises
    ------
    ConfigError
        The file lacks the centroid columns or cannot be read.
    """

    def __init__(self, path: Path, *, mpp: float, l0_dimensions: tuple[int, int]) -> None:
        self.path = path
        self.mpp = float(mpp)
        self.l0_dimensions = (int(l0_dimensions[0]), int(l0_dimensions[1]))
        try:
            self._file = pq.ParquetFile(path)
            names = set(self._file.schema_arrow.names)
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(
                f"{path}: cannot read nuclei.parquet ({exc}); rerun slidestream run"
            ) from exc
        if not {"centroid_x", "centroid_y"} <= names:
            raise ConfigError(f"{path}: no centroid_x/centroid_y columns; rerun slidestream run")
        self.colour_key = next((c for c in _CLASS_COLUMNS if c in names), None)
        self.measurement_columns = tuple(
            n
            for n in self._file.schema_arrow.names
            if n not in _NOT_MEASUREMENTS
            and n not in _CLASS_COLUMNS
            and pa.types.is_floating(self._file.schema_arrow.field(n).type)
        )
        wanted = ["centroid_x", "centroid_y"]
        wanted += [c for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1") if c in names]
        if "equivalent_diameter_um" in names:
            wanted.append("equivalent_diameter_um")
        if self.colour_key is not None:
            wanted.append(self.colour_key)
        try:
            table = self._file.read(columns=wanted)
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(
                f"{path}: corrupt nuclei.parquet ({exc}); rerun slidestream run"
            ) from exc
        self.count = table.num_rows
        x = table.column("centroid_x").to_numpy().astype(np.float32)
        y = table.column("centroid_y").to_numpy().astype(np.float32)
        radius, self.max_radius_l0 = self._radius_l0(table, x.size)
        self.categories, codes = self._codes(table)
        # grid order
        l0_w, l0_h = self.l0_dimensions
        area = max(1.0, float(l0_w) * float(l0_h))
        cell = math.sqrt(area * _NUCLEI_PER_CELL / max(1, self.count))
        self.cell_l0 = float(min(max(cell, 64.0), 16384.0))
        self._cols = max(1, math.ceil(l0_w / self.cell_l0))
        self._rows = max(1, math.ceil(l0_h / self.cell_l0))
        cx = np.clip((x // self.cell_l0).astype(np.int64), 0, self._cols - 1)
        cy = np.clip((y // self.cell_l0).astype(np.int64), 0, self._rows - 1)
        cell_id = cy * self._cols + cx
        order = np.argsort(cell_id, kind="stable")
        self.x, self.y = x[order], y[order]
        self.radius_l0 = radius[order]
        self.codes = codes[order]
        self.row = order.astype(np.int32)
        self._cell_start = np.searchsorted(
            cell_id[order], np.arange(self._cols * self._rows + 1), side="left"
        )
        self.density_bin_l0 = DENSITY_BIN_UM / self.mpp
        self.density, self.density_scale = self._density()
        meta = self._file.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._group_start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()
        self._lock = threading.Lock()
        logger.info(
            "%s: %d nuclei indexed (cell %.0f px, colour key %s)",
            path,
            self.count,
            self.cell_l0,
            self.colour_key,
        )

    # ------------------------------------------------------------------ building
    def _radius_l0(self, table: pa.Table, n: int) -> tuple[npt.NDArray[np.float32], float]:
        """Dot radius per nucleus (half the equivalent diameter) and the largest half extent."""
        names = set(table.column_names)
        half_extent = 0.0
        if {"bbox_x0", "bbox_x1", "bbox_y0", "bbox_y1"} <= names and n:
            w = table.column("bbox_x1").to_numpy() - table.column("bbox_x0").to_numpy()
            h = table.column("bbox_y1").to_numpy() - table.column("bbox_y0").to_numpy()
            extent = np.maximum(w, h) / 2.0
            half_extent = float(np.nanmax(extent)) if np.isfinite(extent).any() else 0.0
            radius = extent * 0.8
        else:
            radius = np.full(n, 3.0 / self.mpp)
        if "equivalent_diameter_um" in names:
            d = table.column("equivalent_diameter_um").to_numpy(zero_copy_only=False)
            radius = np.where(np.isfinite(d), d / 2.0 / self.mpp, radius)
        half_extent = max(half_extent, float(radius.max()) if n else 0.0)
        return np.asarray(radius, np.float32), half_extent

    def _codes(self, table: pa.Table) -> tuple[tuple[str, ...], npt.NDArray[np.uint16]]:
        n = table.num_rows
        if self.colour_key is None:
            return (UNCLASSIFIED,), np.zeros(n, np.uint16)
        column = pc.fill_null(table.column(self.colour_key).cast(pa.string()), UNCLASSIFIED)
        encoded = pc.dictionary_encode(column).combine_chunks()
        names = tuple(str(v) for v in encoded.dictionary.to_pylist())
        if len(names) > 65535:
            raise ConfigError(f"{self.path}: {len(names)} classes in {self.colour_key}")
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.uint16)
        return names, codes

    def _density(self) -> tuple[npt.NDArray[np.float32], float]:
        """Nuclei per mm² on bins of :data:`DENSITY_BIN_UM`, lightly smoothed; its 99th pct."""
        l0_w, l0_h = self.l0_dimensions
        b = self.density_bin_l0
        cols, rows = max(1, math.ceil(l0_w / b)), max(1, math.ceil(l0_h / b))
        bx = np.clip((self.x / b).astype(np.int64), 0, cols - 1)
        by = np.clip((self.y / b).astype(np.int64), 0, rows - 1)
        counts = np.bincount(by * cols + bx, minlength=rows * cols).reshape(rows, cols)
        per_mm2 = counts.astype(np.float32) / np.float32((DENSITY_BIN_UM / 1000.0) ** 2)
        smooth = ndimage.gaussian_filter(per_mm2, sigma=1.0, mode="constant").astype(np.float32)
        positive = smooth[smooth > 0]
        scale = float(np.percentile(positive, 99.0)) if positive.size else 1.0
        return smooth, max(scale, 1.0)

    # ------------------------------------------------------------------ queries
    def in_box(
        self, l0_x0: float, l0_y0: float, l0_x1: float, l0_y1: float, *, margin_l0: float = 0.0
    ) -> npt.NDArray[np.intp]:
        """Positions (in the sorted arrays) of nuclei whose centroid is in the box.

        The box is level-0 px ``[x0, x1) x [y0, y1)`` grown by ``margin_l0`` on every side.
        """
        x0, y0 = l0_x0 - margin_l0, l0_y0 - margin_l0
        x1, y1 = l0_x1 + margin_l0, l0_y1 + margin_l0
        if x1 <= x0 or y1 <= y0 or self.count == 0:
            return np.zeros(0, np.intp)
        c0 = max(0, int(x0 // self.cell_l0))
        c1 = min(self._cols - 1, int(x1 // self.cell_l0))
        r0 = max(0, int(y0 // self.cell_l0))
        r1 = min(self._rows - 1, int(y1 // self.cell_l0))
        if c1 < c0 or r1 < r0:
            return np.zeros(0, np.intp)
        rows = np.arange(r0, r1 + 1)
        starts = self._cell_start[rows * self._cols + c0]
        stops = self._cell_start[rows * self._cols + c1 + 1]
        lengths = stops - starts
        total = int(lengths.sum())
        if total == 0:
            return np.zeros(0, np.intp)
        # concatenated ranges without a Python loop per row
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        pos = np.arange(total, dtype=np.intp) + offsets
        px, py = self.x[pos], self.y[pos]
        keep = (px >= x0) & (px < x1) & (py >= y0) & (py < y1)
        return np.asarray(pos[keep], np.intp)

    def rows(self, positions: npt.NDArray[np.intp]) -> NucleusRows:
        """Every parquet column of the nuclei at ``positions`` (see :meth:`in_box`)."""
        rows = np.sort(self.row[positions]).astype(np.int64)
        groups = np.searchsorted(self._group_start, rows, side="right") - 1
        parts: list[pa.Table] = []
        for g in np.unique(groups):
            table = self._group(int(g))
            local = rows[groups == g] - self._group_start[g]
            parts.append(table.take(pa.array(local)))
        merged = pa.concat_tables(parts) if parts else self._file.schema_arrow.empty_table()
        return NucleusRows(index=rows, columns=merged.to_pydict())

    def _group(self, g: int) -> pa.Table:
        with self._lock:
            table = self._groups.get(g)
            if table is not None:
                self._groups.move_to_end(g)
                return table
        table = self._file.read_row_group(g)
        with self._lock:
            self._groups[g] = table
            while len(self._groups) > _ROW_GROUP_CACHE:
                self._groups.popitem(last=False)
        return table

    def close(self) -> None:
        """Release the parquet file (idempotent)."""
        with self._lock:
            self._groups.clear()
        self._file.close()

    @property
    def nbytes(self) -> int:
        """Memory held by the index arrays (bytes)."""
        arrays = (self.x, self.y, self.radius_l0, self.codes, self.row, self._cell_start)
        return int(sum(a.nbytes for a in arrays) + self.density.nbytes)
