"""Slide-level statistics from per-nucleus measurements and tissue-class areas.

Accumulates nucleus measurements chunk by chunk (one chunk per tile batch) so the whole-slide
pass never holds more than a few float columns per nucleus, then reduces them to the numbers
stored in ``summary.json`` and the statistics database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from slidestream.summary import ClassStatistics, SlideStatistics, ValueSummary

__all__ = ["StatisticsAccumulator"]


def _summary(values: npt.NDArray[np.float64]) -> ValueSummary:
    if values.size == 0:
        return ValueSummary()
    q1, median, q3 = np.percentile(values, [25.0, 50.0, 75.0])
    return ValueSummary(mean=float(values.mean()), median=float(median), q1=float(q1), q3=float(q3))


def _per_mm2(count: int, area_mm2: float) -> float | None:
    return float(count / area_mm2) if area_mm2 > 0 else None


@dataclass(slots=True)
class StatisticsAccumulator:
    """Collects nucleus measurements per tissue class during the streaming pass.

    Parameters
    ----------
    class_names
        Tissue classes of the slide, in model order.
    """

    class_names: Sequence[str]
    _area: list[npt.NDArray[np.float32]] = field(default_factory=list)
    _hema: list[npt.NDArray[np.float32]] = field(default_factory=list)
    _cls: list[npt.NDArray[np.int16]] = field(default_factory=list)

    def add(
        self,
        *,
        area_um2: npt.ArrayLike,
        hematoxylin_od: npt.ArrayLike,
        class_index: npt.ArrayLike,
    ) -> None:
        """Add one chunk of nuclei (aligned 1-D arrays; class -1 = outside every class)."""
        self._area.append(np.asarray(area_um2, dtype=np.float32).ravel())
        self._hema.append(np.asarray(hematoxylin_od, dtype=np.float32).ravel())
        self._cls.append(np.asarray(class_index, dtype=np.int16).ravel())

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
            whole tissue and per class (with the class's area and fraction of the tissue).
        """
        area = np.concatenate(self._area).astype(np.float64) if self._area else np.zeros(0)
        hema = np.concatenate(self._hema).astype(np.float64) if self._hema else np.zeros(0)
        cls = np.concatenate(self._cls) if self._cls else np.zeros(0, dtype=np.int16)
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
            )
        n_all = int(area.size)
        return SlideStatistics(
            tissue_area_mm2=float(tissue_area_mm2),
            nucleus_count=n_all,
            nuclei_per_mm2=_per_mm2(n_all, tissue_area_mm2),
            nucleus_area_um2=_summary(area),
            mean_hematoxylin_od=float(hema.mean()) if n_all else None,
            classes=classes,
        )
