"""Slide-level statistics from per-nucleus measurements and tissue-class areas.

Accumulates nucleus measurements chunk by chunk (one chunk per tile batch) so the whole-slide
pass never holds more than a few float columns per nucleus, then reduces them to the numbers
stored in ``summary.json`` and the statistics database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from slidestream.summary import ClassStatistics, SlideStatistics, TypeStatistics, ValueSummary

__all__ = ["StatisticsAccumulator"]


def _summary(values: npt.NDArray[np.float64]) -> ValueSummary:
    if values.size == 0:
        return ValueSummary()
    q1, median, q3 = np.percentile(values, [25.0, 50.0, 75.0])
    return ValueSummary(mean=float(values.mean()), median=float(median), q1=float(q1), q3=float(q3))


def _per_mm2(count: int, area_mm2: float) -> float | None:
    return float(count / area_mm2) if area_mm2 > 0 else None


def _ratio(numerator: int, denominator: int) -> float | None:
    return float(numerator / denominator) if denominator > 0 else None


def _type_block(
    type_names: Sequence[str],
    types: npt.NDArray[np.int16],
    area: npt.NDArray[np.float64],
    ecc: npt.NDArray[np.float64],
    hema: npt.NDArray[np.float64],
    region_area_mm2: float,
) -> tuple[dict[str, TypeStatistics], float | None]:
    """Per-type statistics of the nuclei of one region, and its inflammatory/epithelial ratio."""
    out: dict[str, TypeStatistics] = {}
    total = int(types.size)
    for t, name in enumerate(type_names):
        sel = types == t
        n = int(sel.sum())
        out[name] = TypeStatistics(
            nucleus_count=n,
            fraction=_ratio(n, total),
            nuclei_per_mm2=_per_mm2(n, region_area_mm2),
            nucleus_area_um2=_summary(area[sel]),
            eccentricity=_summary(ecc[sel]),
            mean_hematoxylin_od=float(hema[sel].mean()) if n else None,
        )
    ratio = None
    if "inflammatory" in out and "epithelial" in out:
        ratio = _ratio(out["inflammatory"].nucleus_count, out["epithelial"].nucleus_count)
    return out, ratio


@dataclass(slots=True)
class StatisticsAccumulator:
    """Collects nucleus measurements per tissue class (and nucleus type) during the stream.

    Parameters
    ----------
    class_names
        Tissue classes of the slide, in model order.
    type_names
        Nucleus types of the nucleus model (empty: no type head, no per-type statistics).
    """

    class_names: Sequence[str]
    type_names: Sequence[str] = ()
    _area: list[npt.NDArray[np.float32]] = field(default_factory=list)
    _hema: list[npt.NDArray[np.float32]] = field(default_factory=list)
    _ecc: list[npt.NDArray[np.float32]] = field(default_factory=list)
    _cls: list[npt.NDArray[np.int16]] = field(default_factory=list)
    _type: list[npt.NDArray[np.int16]] = field(default_factory=list)

    def add(
        self,
        *,
        area_um2: npt.ArrayLike,
        hematoxylin_od: npt.ArrayLike,
        class_index: npt.ArrayLike,
        type_index: npt.ArrayLike | None = None,
        eccentricity: npt.ArrayLike | None = None,
    ) -> None:
        """Add one chunk of nuclei (aligned 1-D arrays; class -1 = outside every class).

        ``type_index`` (index into ``type_names``, -1 = untyped) and ``eccentricity`` are
        needed when the accumulator has ``type_names``.
        """
        area = np.asarray(area_um2, dtype=np.float32).ravel()
        self._area.append(area)
        self._hema.append(np.asarray(hematoxylin_od, dtype=np.float32).ravel())
        self._cls.append(np.asarray(class_index, dtype=np.int16).ravel())
        if self.type_names:
            if type_index is None or eccentricity is None:
                raise ValueError(
                    "StatisticsAccumulator with type_names needs type_index and eccentricity"
                )
            self._type.append(np.asarray(type_index, dtype=np.int16).ravel())
            self._ecc.append(np.asarray(eccentricity, dtype=np.float32).ravel())

    @property
    def count(self) -> int:
        """Nuclei added so far."""
        return int(sum(a.size for a in self._area))

    def result(
        self,
        *,
        tissue_area_mm2: float,
        class_area_mm2: Mapping[str, float],
        drop_empty: Sequence[str] = (),
    ) -> SlideStatistics:
        """Reduce to the ``statistics`` block of ``summary.json``.

        Parameters
        ----------
        tissue_area_mm2
            Area of detected tissue in mm².
        class_area_mm2
            Area of each tissue class region in mm² (classes absent from the slide may be omitted).
        drop_empty
            Classes left out when they hold no area and no nuclei (e.g. ``Unclassified``).

        Returns
        -------
        SlideStatistics
            Tissue area, nucleus count, density, area quartiles and mean haematoxylin OD, for the
            whole tissue and per class (with the class's area and fraction of the tissue); with
            ``type_names``, the same per nucleus type, overall and per class x type.
        """

        def cat(chunks: list[npt.NDArray[Any]], dtype: Any) -> npt.NDArray[Any]:
            return np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype)

        area = cat(self._area, np.float64)
        hema = cat(self._hema, np.float64)
        cls = cat(self._cls, np.int16)
        typ = cat(self._type, np.int16)
        ecc = cat(self._ecc, np.float64)
        typed = bool(self.type_names)

        def by_type(sel: npt.NDArray[np.bool_] | slice, region_mm2: float) -> dict[str, Any]:
            if not typed:
                return {}
            types, ratio = _type_block(
                self.type_names, typ[sel], area[sel], ecc[sel], hema[sel], region_mm2
            )
            return {"types": types, "inflammatory_epithelial_ratio": ratio}

        classes: dict[str, ClassStatistics] = {}
        for index, name in enumerate(self.class_names):
            sel = cls == index
            c_area = float(class_area_mm2.get(name, 0.0))
            n = int(sel.sum())
            if name in drop_empty and n == 0 and c_area == 0.0:
                continue
            classes[name] = ClassStatistics(
                area_mm2=c_area,
                fraction=float(c_area / tissue_area_mm2) if tissue_area_mm2 > 0 else None,
                nucleus_count=n,
                nuclei_per_mm2=_per_mm2(n, c_area),
                nucleus_area_um2=_summary(area[sel]),
                mean_hematoxylin_od=float(hema[sel].mean()) if n else None,
                **by_type(sel, c_area),
            )
        n_all = int(area.size)
        return SlideStatistics(
            tissue_area_mm2=float(tissue_area_mm2),
            nucleus_count=n_all,
            nuclei_per_mm2=_per_mm2(n_all, tissue_area_mm2),
            nucleus_area_um2=_summary(area),
            mean_hematoxylin_od=float(hema.mean()) if n_all else None,
            classes=classes,
            **by_type(slice(None), float(tissue_area_mm2)),
        )
