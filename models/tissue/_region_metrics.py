"""Area-weighted agreement of a tissue map with annotated regions (whole-slide evaluation).

Both sides are polygons in the slide's level-0 px: the model's class regions (``tissue.geojson``
of ``slidestream run``, or the same map computed for evaluation) and the user's annotated class
regions. Everything is measured in µm² and **only where annotated**:

* ``confusion_um2[a, p]``: area annotated as class ``a`` that the map calls ``p``; the last
  column is annotated area the map leaves out (no tissue detected there);
* per-class accuracy (recall) ``= confusion[a, a] / sum_p confusion[a, p]`` over the mapped
  part, balanced accuracy = their mean over the annotated classes, accuracy = the diagonal's
  share of all mapped annotated area; ``coverage`` = mapped share of the annotated area;
* Dice of class ``c`` between its annotated area and the map's ``c`` area, both inside the
  annotated area: ``2 |A ∩ P| / (|A| + |P|)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely

from slidestream.errors import ConfigError

__all__ = ["RegionReport", "region_confusion", "region_report"]

NOT_MAPPED = "(not mapped)"


def region_confusion(
    annotated: Mapping[str, shapely.Geometry],
    predicted: Mapping[str, shapely.Geometry],
    *,
    class_names: Sequence[str],
    mpp: float,
) -> npt.NDArray[np.float64]:
    """Annotated-vs-mapped areas of one slide in µm², ``(K, K + 1)`` (see the module doc).

    Parameters
    ----------
    annotated : mapping of str to geometry
        Disjoint annotated region per class, level-0 px.
    predicted : mapping of str to geometry
        The map's region per class, level-0 px (disjoint).
    class_names : sequence of str
        Row / column order (the model's classes).
    mpp : float
        Level-0 µm/px of the slide.

    Raises
    ------
    ConfigError
        An annotated or mapped class outside ``class_names``.
    """
    names = list(class_names)
    for label, mapping in (("annotated", annotated), ("mapped", predicted)):
        extra = sorted(set(mapping) - set(names))
        if extra:
            raise ConfigError(
                f"{label} classes {extra} are not model classes {names}; "
                "map them with --class-map RAW=CLASS"
            )
    k = len(names)
    out = np.zeros((k, k + 1), dtype=np.float64)
    um2 = mpp * mpp
    mapped_all = shapely.union_all([g for g in predicted.values() if g is not None])
    for i, a_name in enumerate(names):
        a = annotated.get(a_name)
        if a is None or a.is_empty:
            continue
        shapely.prepare(a)
        for j, p_name in enumerate(names):
            p = predicted.get(p_name)
            if p is not None and not p.is_empty:
                out[i, j] = shapely.area(shapely.intersection(a, p)) * um2
        out[i, k] = max(0.0, a.area - shapely.area(shapely.intersection(a, mapped_all))) * um2
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class RegionReport:
    """Area-weighted tissue-map metrics against annotations (see the module doc).

    Attributes
    ----------
    class_names : tuple of str
    confusion_um2 : ndarray, float64, (K, K + 1)
        Rows annotated class, columns mapped class, last column not mapped.
    """

    class_names: tuple[str, ...]
    confusion_um2: npt.NDArray[np.float64]

    @property
    def annotated_classes(self) -> tuple[str, ...]:
        """Classes with annotated, mapped area."""
        k = len(self.class_names)
        rows = self.confusion_um2[:, :k].sum(axis=1)
        return tuple(c for c, r in zip(self.class_names, rows, strict=True) if r > 0)

    @property
    def per_class_accuracy(self) -> dict[str, float]:
        """Recall of every annotated class over its mapped area."""
        k = len(self.class_names)
        cm = self.confusion_um2[:, :k]
        rows = cm.sum(axis=1)
        return {c: float(cm[i, i] / rows[i]) for i, c in enumerate(self.class_names) if rows[i] > 0}

    @property
    def balanced_accuracy(self) -> float:
        """Mean per-class accuracy over the annotated classes."""
        vals = list(self.per_class_accuracy.values())
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def accuracy(self) -> float:
        """Share of the mapped annotated area whose class agrees."""
        k = len(self.class_names)
        cm = self.confusion_um2[:, :k]
        total = cm.sum()
        return float(np.trace(cm) / total) if total > 0 else float("nan")

    @property
    def coverage(self) -> float:
        """Share of the annotated area the map covers (the rest: no tissue detected)."""
        total = self.confusion_um2.sum()
        k = len(self.class_names)
        return float(self.confusion_um2[:, :k].sum() / total) if total > 0 else float("nan")

    @property
    def dice(self) -> dict[str, float]:
        """Dice of every class inside the annotated area."""
        k = len(self.class_names)
        cm = self.confusion_um2[:, :k]
        out = {}
        for i, c in enumerate(self.class_names):
            denom = cm[i, :].sum() + cm[:, i].sum()
            if denom > 0:
                out[c] = float(2 * cm[i, i] / denom)
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping of every figure (areas in mm²)."""
        return {
            "class_names": list(self.class_names),
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "coverage": self.coverage,
            "per_class_accuracy": self.per_class_accuracy,
            "dice": self.dice,
            "confusion_mm2": {
                "rows": "annotated",
                "columns": [*self.class_names, NOT_MAPPED],
                "values": (self.confusion_um2 / 1e6).round(6).tolist(),
            },
            "annotated_mm2": float(self.confusion_um2.sum() / 1e6),
        }

    def to_text(self) -> str:
        """A small table: per-class accuracy and Dice, then the confusion matrix in mm²."""
        acc, dice = self.per_class_accuracy, self.dice
        lines = [
            f"balanced accuracy {self.balanced_accuracy:.4f}  accuracy {self.accuracy:.4f}  "
            f"coverage {self.coverage:.4f}  annotated {self.confusion_um2.sum() / 1e6:.3f} mm²",
            f"{'class':<24}{'accuracy':>10}{'dice':>10}",
        ]
        for c in self.class_names:
            a = f"{acc[c]:.4f}" if c in acc else "-"
            d = f"{dice[c]:.4f}" if c in dice else "-"
            lines.append(f"{c:<24}{a:>10}{d:>10}")
        cols = [*self.class_names, NOT_MAPPED]
        lines.append("confusion (mm², rows annotated, columns mapped)")
        lines.append(" " * 24 + "".join(f"{c[:12]:>14}" for c in cols))
        for i, c in enumerate(self.class_names):
            row = "".join(f"{v / 1e6:>14.4f}" for v in self.confusion_um2[i])
            lines.append(f"{c:<24}{row}")
        return "\n".join(lines)


def region_report(
    confusions: Sequence[npt.NDArray[np.float64]], class_names: Sequence[str]
) -> RegionReport:
    """Sum per-slide confusions (:func:`region_confusion`) into one report."""
    k = len(class_names)
    total = np.zeros((k, k + 1), dtype=np.float64)
    for cm in confusions:
        total += cm
    return RegionReport(class_names=tuple(class_names), confusion_um2=total)
