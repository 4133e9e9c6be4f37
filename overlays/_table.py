"""`NucleusTable`: the columnar, picklable result of stitching one tile (or a whole slide).

Layout follows geoarrow's "separated offsets" idea: every nucleus polygon is one closed exterior
ring, all rings are concatenated into one ``(M, 2)`` float64 coordinate array and
``offsets[i]:offsets[i + 1]`` selects nucleus ``i``. Everything is in level-0 pixels (QuPath's
frame: origin at the slide's top-left corner, x right, y down, pixel edges at integers).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import shapely

from slidestream.errors import ConfigError

__all__ = [
    "GEOMETRY_KEYS",
    "MEASUREMENT_DISPLAY_NAMES",
    "UNCLASSIFIED",
    "NucleusTable",
    "measurement_display_name",
    "rebatch_tables",
]

UNCLASSIFIED: Final = "Unclassified"
"""Class name of nuclei outside every tissue region; written without a QuPath classification."""

GEOMETRY_KEYS: Final = frozenset(
    {"label", "centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"}
)
"""Keys of ``measure_nuclei`` output that are geometry (converted to level 0), not measurements."""

MEASUREMENT_DISPLAY_NAMES: Final[Mapping[str, str]] = {
    "area_um2": "Area µm^2",
    "perimeter_um": "Perimeter µm",
    "equivalent_diameter_um": "Equivalent diameter µm",
    "major_axis_um": "Major axis µm",
    "minor_axis_um": "Minor axis µm",
    "eccentricity": "Eccentricity",
    "solidity": "Solidity",
    "circularity": "Circularity",
    "mean_r": "Red: Mean",
    "mean_g": "Green: Mean",
    "mean_b": "Blue: Mean",
    "hematoxylin_od": "Hematoxylin OD: Mean",
    "eosin_od": "Eosin OD: Mean",
    "p_other": "Type probability: Other",
    "p_inflammatory": "Type probability: Inflammatory",
    "p_epithelial": "Type probability: Epithelial",
    "p_spindle": "Type probability: Spindle",
}
"""QuPath-style measurement names (unit after the quantity, ``µm^2`` as QuPath writes it)."""


def measurement_display_name(key: str) -> str:
    """Return the QuPath measurement name for a ``measure_nuclei`` key (the key itself if unknown).

    Examples
    --------
    >>> measurement_display_name("area_um2")
    'Area µm^2'
    >>> measurement_display_name("texture_x")
    'texture_x'
    """
    return MEASUREMENT_DISPLAY_NAMES.get(key, key)


FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class NucleusTable:
    """Nuclei as columns: level-0 geometry, measurements and (optionally) a tissue class.

    Every array has one entry per nucleus (length ``N``) except ``coords`` and ``offsets``.
    """

    centroid_x: FloatArray
    """(N,) float64 centroid x, level-0 px (continuous; pixel edges at integers)."""
    centroid_y: FloatArray
    """(N,) float64 centroid y, level-0 px."""
    bbox_x0: FloatArray
    """(N,) float64 left edge of the bounding box, level-0 px."""
    bbox_y0: FloatArray
    """(N,) float64 top edge of the bounding box, level-0 px."""
    bbox_x1: FloatArray
    """(N,) float64 right edge (exclusive), level-0 px."""
    bbox_y1: FloatArray
    """(N,) float64 bottom edge (exclusive), level-0 px."""
    coords: FloatArray
    """(M, 2) float64 polygon vertices ``(x, y)`` in level-0 px; every ring is closed."""
    offsets: npt.NDArray[np.int64]
    """(N + 1,) int64; ring ``i`` is ``coords[offsets[i]:offsets[i + 1]]``; ``offsets[0] == 0``."""
    measurements: Mapping[str, FloatArray] = field(default_factory=dict)
    """``measure_nuclei`` key (``area_um2``, ...) -> (N,) float64, in the units the key names."""
    classes: npt.NDArray[np.str_] | None = None
    """(N,) tissue class name per nucleus, or None before classification."""
    types: npt.NDArray[np.str_] | None = None
    """(N,) nucleus type name per nucleus (the nucleus model's names, e.g. ``inflammatory``), or
    None (a model without a type head, or before typing)."""
    truncated: int = 0
    """Nuclei owned by a tile but touching its outer border (the halo was too small)."""
    outlines_valid: bool = False
    """Every outline was checked OGC-valid with a positive area as written (rounded to 0.01 px)
    by :func:`~slidestream.overlays.extract_tile_nuclei`; the GeoJSON writer then skips that
    (costly) part of its geometry check."""

    def __post_init__(self) -> None:
        n = self.centroid_x.shape[0]
        columns: dict[str, npt.NDArray[Any]] = {
            "centroid_y": self.centroid_y,
            "bbox_x0": self.bbox_x0,
            "bbox_y0": self.bbox_y0,
            "bbox_x1": self.bbox_x1,
            "bbox_y1": self.bbox_y1,
            **self.measurements,
        }
        if self.classes is not None:
            columns["classes"] = self.classes
        if self.types is not None:
            columns["types"] = self.types
        for name, col in columns.items():
            if col.shape != (n,):
                raise ConfigError(
                    f"NucleusTable: column {name!r} has shape {col.shape}, expected ({n},) like "
                    "centroid_x; build every column with one entry per nucleus"
                )
        if self.offsets.shape != (n + 1,) or (n + 1 and int(self.offsets[-1]) != len(self.coords)):
            raise ConfigError(
                f"NucleusTable: offsets shape {self.offsets.shape} / last offset do not match "
                f"{n} nuclei and {len(self.coords)} vertices; offsets must be (N + 1,) ending at M"
            )
        if self.coords.ndim != 2 or self.coords.shape[1] != 2:
            raise ConfigError(
                f"NucleusTable: coords has shape {self.coords.shape}, expected (M, 2) x/y pairs"
            )

    def __len__(self) -> int:
        return int(self.centroid_x.shape[0])

    @property
    def measurement_names(self) -> tuple[str, ...]:
        """Measurement keys in column order."""
        return tuple(self.measurements)

    @classmethod
    def empty(cls, measurement_names: Sequence[str] = ()) -> NucleusTable:
        """Return a table with no nuclei and the given (empty) measurement columns."""
        z = np.zeros(0, np.float64)
        return cls(
            centroid_x=z,
            centroid_y=z,
            bbox_x0=z,
            bbox_y0=z,
            bbox_x1=z,
            bbox_y1=z,
            coords=np.zeros((0, 2), np.float64),
            offsets=np.zeros(1, np.int64),
            measurements={k: z for k in measurement_names},
        )

    @classmethod
    def concat(cls, tables: Sequence[NucleusTable]) -> NucleusTable:
        """Concatenate tables (tile results) in order; ``truncated`` counters are summed.

        All tables must have the same measurement keys. If only some tables are classified, the
        others' nuclei become :data:`UNCLASSIFIED`; if none is, the result has ``classes=None``.
        """
        truncated = sum(t.truncated for t in tables)
        nonempty = [t for t in tables if len(t)]
        if not nonempty:
            first = tables[0] if tables else cls.empty()
            return replace(first, truncated=truncated)
        tables = nonempty
        names = tables[0].measurement_names
        for t in tables[1:]:
            if t.measurement_names != names:
                raise ConfigError(
                    f"NucleusTable.concat: measurement keys differ ({t.measurement_names} vs "
                    f"{names}); measure every tile with the same function"
                )
        lengths = np.array([len(t.coords) for t in tables], np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        offsets = np.concatenate(
            [np.zeros(1, np.int64)]
            + [t.offsets[1:] + s for t, s in zip(tables, starts, strict=True)]
        )
        classes: npt.NDArray[np.str_] | None = None
        if any(t.classes is not None for t in tables):
            classes = np.concatenate(
                [
                    t.classes if t.classes is not None else np.full(len(t), UNCLASSIFIED)
                    for t in tables
                ]
            )

        types: npt.NDArray[np.str_] | None = None
        if any(t.types is not None for t in tables):
            types = np.concatenate(
                [t.types if t.types is not None else np.full(len(t), "") for t in tables]
            )

        def cat(name: str) -> FloatArray:
            return np.concatenate([getattr(t, name) for t in tables])

        return cls(
            centroid_x=cat("centroid_x"),
            centroid_y=cat("centroid_y"),
            bbox_x0=cat("bbox_x0"),
            bbox_y0=cat("bbox_y0"),
            bbox_x1=cat("bbox_x1"),
            bbox_y1=cat("bbox_y1"),
            coords=np.concatenate([t.coords for t in tables]),
            offsets=offsets,
            measurements={k: np.concatenate([t.measurements[k] for t in tables]) for k in names},
            classes=classes,
            types=types,
            truncated=truncated,
            outlines_valid=all(t.outlines_valid for t in tables),
        )

    def with_classes(self, class_names: npt.ArrayLike) -> NucleusTable:
        """Return a copy with one tissue class name per nucleus.

        Parameters
        ----------
        class_names : array_like of str, shape (N,)
            Class per nucleus, e.g. from :func:`slidestream.overlays.assign_classes`.
        """
        classes = np.asarray(class_names, dtype=np.str_)
        if classes.shape != (len(self),):
            raise ConfigError(
                f"NucleusTable.with_classes: got {classes.shape} class names for {len(self)} "
                "nuclei; pass exactly one name per nucleus"
            )
        return replace(self, classes=classes)

    def with_types(self, type_names: npt.ArrayLike) -> NucleusTable:
        """Return a copy with one nucleus type name per nucleus (``""``: untyped)."""
        types = np.asarray(type_names, dtype=np.str_)
        if types.shape != (len(self),):
            raise ConfigError(
                f"NucleusTable.with_types: got {types.shape} type names for {len(self)} "
                "nuclei; pass exactly one name per nucleus"
            )
        return replace(self, types=types)

    def slice(self, start: int, stop: int) -> NucleusTable:
        """Return nuclei ``start:stop`` as a new table (views, offsets re-based to 0)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        c0, c1 = int(self.offsets[start]), int(self.offsets[stop])
        return NucleusTable(
            centroid_x=self.centroid_x[start:stop],
            centroid_y=self.centroid_y[start:stop],
            bbox_x0=self.bbox_x0[start:stop],
            bbox_y0=self.bbox_y0[start:stop],
            bbox_x1=self.bbox_x1[start:stop],
            bbox_y1=self.bbox_y1[start:stop],
            coords=self.coords[c0:c1],
            offsets=self.offsets[start : stop + 1] - c0,
            measurements={k: v[start:stop] for k, v in self.measurements.items()},
            classes=None if self.classes is None else self.classes[start:stop],
            types=None if self.types is None else self.types[start:stop],
            truncated=self.truncated if start == 0 else 0,
            outlines_valid=self.outlines_valid,
        )

    def centroids(self) -> FloatArray:
        """Return the (N, 2) float64 ``(x, y)`` centroids in level-0 px."""
        return np.stack([self.centroid_x, self.centroid_y], axis=1)

    def polygons(self) -> npt.NDArray[np.object_]:
        """Return the nuclei as an (N,) array of shapely Polygons in level-0 px."""
        if not len(self):
            return np.empty(0, dtype=object)
        index = np.repeat(np.arange(len(self)), np.diff(self.offsets))
        rings = shapely.linearrings(self.coords, indices=index)
        return np.asarray(shapely.polygons(rings), dtype=object)


def invalid_outlines(coords: FloatArray, offsets: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """(N,) True where ring ``i`` of ``coords`` (closed, >= 4 positions) is not an OGC-valid
    polygon with a positive area once rounded to 0.01 px (as the GeoJSON writer writes it)."""
    n = len(offsets) - 1
    if n == 0:
        return np.zeros(0, dtype=bool)
    index = np.repeat(np.arange(n), np.diff(offsets))
    geoms = shapely.polygons(shapely.linearrings(np.round(coords, 2), indices=index))
    return np.asarray(~shapely.is_valid(geoms) | ~(shapely.area(geoms) > 0), dtype=bool)


def rebatch_tables(tables: Iterable[NucleusTable], min_nuclei: int) -> Iterator[NucleusTable]:
    """Concatenate consecutive tables (in order) into tables of at least ``min_nuclei`` nuclei.

    Tile results hold tens of nuclei each; classifying, formatting and writing them in slide-sized
    blocks instead of tile by tile spreads each step's fixed cost (class lookup, id hashing set-up,
    GeoJSON layout, one parquet row group) over thousands of nuclei. Empty tables are dropped;
    the last table may be smaller. Nuclei keep their order, so the outputs are unchanged.

    Parameters
    ----------
    tables : iterable of NucleusTable
        Consumed lazily, once.
    min_nuclei : int
        Smallest size of every yielded table but the last (>= 1).

    Yields
    ------
    NucleusTable
    """
    if min_nuclei < 1:
        raise ConfigError(f"rebatch_tables: min_nuclei must be >= 1, got {min_nuclei}")
    buffer: list[NucleusTable] = []
    count = 0
    for table in tables:
        if not len(table):
            continue
        buffer.append(table)
        count += len(table)
        if count >= min_nuclei:
            yield buffer[0] if len(buffer) == 1 else NucleusTable.concat(buffer)
            buffer, count = [], 0
    if buffer:
        yield buffer[0] if len(buffer) == 1 else NucleusTable.concat(buffer)
