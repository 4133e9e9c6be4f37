"""Stage 4, stitching: tissue-class polygons and areas, and the classified nucleus stream.

Nucleus tables come from the post-processing workers in tile order (each nucleus reported by
exactly one tile, outlines clipped to the slide); here they are concatenated into blocks of at
least :data:`NUCLEI_PER_BLOCK` nuclei, given the tissue class under their centroid and (for a
typing model) the type of highest mean probability (``p_<type>`` measurements), counted into
the slide statistics and passed on to the writers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from slidestream.statistics import StatisticsAccumulator
from slidestream.summary import SlideStatistics

from .inference import TissuePass

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from slidestream.overlays import NucleusTable, TissueRegions
    from slidestream.tiling import TissueMask

__all__ = [
    "NUCLEI_PER_BLOCK",
    "ClassifiedNuclei",
    "class_areas_on_mask",
    "clip_to_tissue",
    "nucleus_type_index",
    "with_nucleus_types",
]

logger = logging.getLogger(__name__)

NUCLEI_PER_BLOCK = 4096
"""Nuclei classified, counted and written per block (tile results are concatenated up to this):
per-tile blocks of ~60 nuclei spent most of the main process's time on fixed per-call costs,
which caps a GPU run (``bench/pipeline_host.py``)."""


def clip_to_tissue(
    class_polygons: dict[str, BaseGeometry], mask: TissueMask
) -> dict[str, BaseGeometry]:
    """Class regions intersected with the tissue mask's outline (polygonal parts only; the mask's
    outline is clipped to the slide, so the regions are too)."""
    import shapely

    tissue = mask.to_polygons()
    out: dict[str, BaseGeometry] = {}
    for name, geom in class_polygons.items():
        parts = shapely.get_parts(shapely.intersection(geom, tissue))
        polys = [p for p in parts if isinstance(p, shapely.Polygon) and not p.is_empty]
        if polys:
            out[name] = polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)
    return out


def class_areas_on_mask(
    regions: TissueRegions,
    mask: TissueMask,
    class_names: tuple[str, ...],
    *,
    chunk_px: int = 1 << 18,
) -> dict[str, float]:
    """Area of each tissue class in mm², counted on the tissue mask so classes sum to tissue.

    Every tissue-mask pixel takes the class of the region under its centre (level-0 lookup in
    the class raster); pixels beyond every classified patch count as ``UNCLASSIFIED``. The mask
    is looked up in bands of about ``chunk_px`` pixels: ``regions.assign`` builds a few arrays
    (class names included) per point, which for a whole large slide (~2.5 M mask pixels for
    150 mm² at 8 µm/px) would add about 0.4 GB to the peak memory.
    """
    from slidestream.overlays import UNCLASSIFIED

    counts = np.zeros(len(class_names) + 1, dtype=np.int64)
    m_height, m_width = mask.mask.shape
    rows = max(1, chunk_px // max(1, m_width))
    for m_y0 in range(0, m_height, rows):
        m_y, m_x = np.nonzero(mask.mask[m_y0 : m_y0 + rows])
        if m_y.size == 0:
            continue
        l0_x = (m_x.astype(np.float64) + 0.5) * mask.l0_per_m_px
        l0_y = (m_y.astype(np.float64) + (m_y0 + 0.5)) * mask.l0_per_m_px
        _, index = regions.assign(l0_x, l0_y)
        counts += np.bincount(index, minlength=len(class_names) + 1)
    mm2_per_px = float(mask.mpp) ** 2 / 1e6
    areas = {name: float(counts[i]) * mm2_per_px for i, name in enumerate(class_names)}
    areas[UNCLASSIFIED] = float(counts[len(class_names)]) * mm2_per_px
    return areas


def nucleus_type_index(table: NucleusTable, type_names: tuple[str, ...]) -> npt.NDArray[np.int8]:
    """(N,) index of each nucleus's type: the argmax of its ``p_<type>`` measurements (-1 where
    they are missing or not finite, i.e. no type-map pixel under the nucleus)."""
    from slidestream.overlays import type_probability_key

    n = len(table)
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    probs = np.stack(
        [table.measurements.get(type_probability_key(t), np.full(n, np.nan)) for t in type_names],
        axis=1,
    )
    ok = np.isfinite(probs).all(axis=1)
    index = np.where(ok, np.argmax(np.where(ok[:, None], probs, 0.0), axis=1), -1)
    return index.astype(np.int8)


def with_nucleus_types(
    table: NucleusTable, type_names: tuple[str, ...]
) -> tuple[NucleusTable, npt.NDArray[np.int8]]:
    """``table`` with :attr:`~slidestream.overlays.NucleusTable.types` set from its ``p_<type>``
    measurements (``""`` for an untyped nucleus), and the type index of each nucleus."""
    index = nucleus_type_index(table, type_names)
    labels = np.array([*type_names, ""], dtype=np.str_)  # index -1 -> ""
    return table.with_types(labels[index]), index


@dataclass(slots=True)
class ClassifiedNuclei:
    """Classifies and counts a slide's nucleus stream while the writers consume it.

    Iterate :meth:`stream` once (the writers do); then :meth:`statistics`, :attr:`centroids`
    and :attr:`truncated` describe every nucleus that went through.
    """

    tissue: TissuePass
    type_names: tuple[str, ...] = ()
    """Nucleus types of the model (empty: no type head)."""
    _stats: StatisticsAccumulator = field(init=False)
    _centroids: list[npt.NDArray[np.float64]] = field(default_factory=list)
    _types: list[npt.NDArray[np.int8]] = field(default_factory=list)
    truncated: int = 0
    """Nuclei that touched a tile border (halo too small)."""

    def __post_init__(self) -> None:
        from slidestream.overlays import UNCLASSIFIED

        self._stats = StatisticsAccumulator(
            (*self.tissue.class_names, UNCLASSIFIED), type_names=self.type_names
        )

    def stream(self, tile_tables: Iterable[NucleusTable]) -> Iterator[NucleusTable]:
        """Blocks of classified (and typed) nuclei, in tile order."""
        from slidestream.overlays import rebatch_tables

        for table in rebatch_tables(tile_tables, NUCLEI_PER_BLOCK):
            names, index = self.tissue.regions.assign(table.centroid_x, table.centroid_y)
            table = table.with_classes(names)
            type_index = None
            if self.type_names:
                table, type_index = with_nucleus_types(table, self.type_names)
                self._types.append(type_index)
            self._stats.add(
                area_um2=table.measurements["area_um2"],
                hematoxylin_od=table.measurements["hematoxylin_od"],
                class_index=index,
                type_index=type_index,
                eccentricity=table.measurements.get("eccentricity"),
            )
            self._centroids.append(np.stack([table.centroid_x, table.centroid_y], axis=1))
            self.truncated += table.truncated
            yield table

    @property
    def type_index(self) -> npt.NDArray[np.int8]:
        """(N,) index into :attr:`type_names` of every nucleus's type (-1: untyped; empty
        without a type head), aligned with :attr:`centroids`."""
        if not self._types:
            return np.zeros(0, dtype=np.int8)
        return np.concatenate(self._types)

    @property
    def count(self) -> int:
        """Nuclei that went through :meth:`stream`."""
        return self._stats.count

    @property
    def centroids(self) -> npt.NDArray[np.float64]:
        """(N, 2) level-0 ``(x, y)`` centroids of every nucleus."""
        if not self._centroids:
            return np.zeros((0, 2), dtype=np.float64)
        return np.concatenate(self._centroids)

    def statistics(self, *, tissue_area_mm2: float, class_area_mm2: dict[str, float]) -> Any:
        """The slide's :class:`~slidestream.summary.SlideStatistics`."""
        from slidestream.overlays import UNCLASSIFIED

        result: SlideStatistics = self._stats.result(
            tissue_area_mm2=tissue_area_mm2,
            class_area_mm2=class_area_mm2,
            drop_empty=(UNCLASSIFIED,),
        )
        return result
