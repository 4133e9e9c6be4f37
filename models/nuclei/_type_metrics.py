"""Detection and per-type F1 of typed nuclei, with HoVer-Net's definitions.

Detection pairs each true nucleus with at most one predicted nucleus whose centroid lies within
a radius (HoVer-Net's ``pair_coordinates``: optimal one-to-one assignment on centroid distance,
pairs farther than the radius discarded; 12 px = 3 µm at 0.25 µm/px). Per-type F1 follows
HoVer-Net's ``compute_stats.py``:

``F_t = 2 (TP_t + TN_t) / (2 (TP_t + TN_t) + 2 FP_t + 2 FN_t + FP_d,t + FN_d,t)``

with TP/TN/FP/FN over the *paired* nuclei (true type vs predicted type, one-vs-rest for ``t``),
``FP_d,t`` the unpaired predictions of type ``t`` and ``FN_d,t`` the unpaired true nuclei of type
``t``. As in HoVer-Net's ``_f1_type``, the paired nuclei are first restricted to those whose true
or predicted type is ``t``, so ``TN_t`` is always 0 there, and so here. Counts are summed over all
images before the scores are formed, as HoVer-Net does.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from slidestream.errors import ConfigError
from slidestream.models.nuclei._data import POINT_TYPE_ALIASES
from slidestream.models.nuclei._network import TYPE_NAMES
from slidestream.models.nuclei._types import InstanceTypes

__all__ = [
    "TypedCounts",
    "TypedPoints",
    "instance_points",
    "pair_coordinates",
    "read_typed_truth",
    "typed_counts",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class TypedPoints:
    """Nucleus centroids with a type each, in one image's pixel frame.

    Attributes
    ----------
    xy : ndarray, float64, shape (n, 2)
        Centroids ``(x, y)`` in px (x = column).
    types : ndarray, int64, shape (n,)
        Index into the type names of each nucleus.
    """

    xy: npt.NDArray[np.float64]
    types: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        if self.xy.ndim != 2 or self.xy.shape[1] != 2 or self.types.shape != (self.xy.shape[0],):
            raise ConfigError(
                f"typed points: xy {self.xy.shape} and types {self.types.shape}: expected "
                "(n, 2) and (n,)"
            )


def instance_points(
    labels: npt.NDArray[np.integer[Any]], types: InstanceTypes, *, upsample: int = 1
) -> TypedPoints:
    """Centroids and types of the instances of ``labels`` that ``types`` describes.

    Parameters
    ----------
    labels : ndarray of int, shape (H * u, W * u)
        Instance ids (0 background).
    types : InstanceTypes
        Per-instance types; ids absent from ``labels`` (lost in a resampling) are dropped.
    upsample : int
        ``u``: the labels are ``u`` times finer than the frame the points are wanted in (a
        refined watershed); centroids are mapped back by pixel centres.

    Returns
    -------
    TypedPoints
        Centroids ``(x, y)`` in px of the coarse frame (pixel centres at integers).
    """
    n = int(labels.max(initial=0))
    if n == 0 or len(types.ids) == 0:
        return TypedPoints(xy=np.zeros((0, 2)), types=np.zeros(0, np.int64))
    yy, xx = np.nonzero(labels)
    ids = labels[yy, xx]
    cnt = np.bincount(ids, minlength=n + 1).astype(np.float64)
    cx = np.bincount(ids, weights=xx, minlength=n + 1) / np.maximum(cnt, 1)
    cy = np.bincount(ids, weights=yy, minlength=n + 1) / np.maximum(cnt, 1)
    if upsample > 1:
        cx, cy = (cx + 0.5) / upsample - 0.5, (cy + 0.5) / upsample - 0.5
    ids_t = np.asarray(types.ids, np.int64)
    ok = (ids_t <= n) & (cnt[np.minimum(ids_t, n)] > 0)
    keep = ids_t[ok]
    return TypedPoints(
        xy=np.stack([cx[keep], cy[keep]], axis=1), types=types.index[ok].astype(np.int64)
    )


def read_typed_truth(path: Path) -> dict[str, TypedPoints]:
    """Typed ground-truth centroids per image stem from a ``types.csv`` or ``points.csv``.

    ``types.csv`` (CoNSeP's layout here): ``image,instance,type,type_name,centroid_x,centroid_y``;
    ``points.csv`` (CRCHisto's): ``image,x,y,type``. Type names go through
    :data:`~slidestream.models.nuclei._data.POINT_TYPE_ALIASES` to :data:`TYPE_NAMES`.

    Raises
    ------
    ConfigError
        Unreadable file, missing columns or an unknown type (naming the line).
    """
    per: dict[str, tuple[list[tuple[float, float]], list[int]]] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = set(reader.fieldnames or ())
            if {"centroid_x", "centroid_y", "type_name"} <= fields:
                xk, yk, tk = "centroid_x", "centroid_y", "type_name"
            elif {"x", "y", "type"} <= fields:
                xk, yk, tk = "x", "y", "type"
            else:
                raise ConfigError(
                    f"{path}: expected columns image,centroid_x,centroid_y,type_name (types.csv) "
                    "or image,x,y,type (points.csv)"
                )
            for line, row in enumerate(reader, start=2):
                name = POINT_TYPE_ALIASES.get(str(row[tk]).strip().lower())
                if name is None:
                    raise ConfigError(
                        f"{path}:{line}: unknown nucleus type {row[tk]!r}; expected one of "
                        f"{sorted(POINT_TYPE_ALIASES)}"
                    )
                xy, ts = per.setdefault(str(row["image"]), ([], []))
                xy.append((float(row[xk]), float(row[yk])))
                ts.append(TYPE_NAMES.index(name))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path}: unreadable typed ground truth ({exc})") from exc
    return {
        k: TypedPoints(xy=np.asarray(xy, np.float64).reshape(-1, 2), types=np.asarray(ts, np.int64))
        for k, (xy, ts) in per.items()
    }


def pair_coordinates(
    true_xy: npt.NDArray[np.float64], pred_xy: npt.NDArray[np.float64], radius: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Pair true and predicted centroids one-to-one within ``radius`` px.

    The pairs are the most pairs within ``radius`` (then the least total distance among them).
    HoVer-Net's ``pair_coordinates`` solves the assignment on all distances and drops the pairs
    beyond the radius afterwards; on large point sets (a whole mosaic) that trades near pairs for
    far ones (detection F1 0.53 pooled over 16 CoNSeP tiles whose per-tile F1 is 0.67-0.74). Here a
    pair beyond the radius costs more than any within-radius matching, so it never displaces one;
    per image the two agree but where the assignment was ambiguous.

    Returns
    -------
    pairs : ndarray, int64, shape (k, 2)
        ``(true index, predicted index)`` of each pair.
    unpaired_true, unpaired_pred : ndarray of int64
        Indices left without a partner.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    n_t, n_p = len(true_xy), len(pred_xy)
    if n_t == 0 or n_p == 0:
        return np.zeros((0, 2), np.int64), np.arange(n_t), np.arange(n_p)
    dist = cdist(true_xy, pred_xy)
    far = radius * (min(n_t, n_p) + 1.0) + 1.0  # more than every within-radius pair together
    rows, cols = linear_sum_assignment(np.where(dist <= radius, dist, far))
    keep = dist[rows, cols] <= radius
    pairs = np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64)
    unpaired_t = np.setdiff1d(np.arange(n_t), pairs[:, 0])
    unpaired_p = np.setdiff1d(np.arange(n_p), pairs[:, 1])
    return pairs, unpaired_t, unpaired_p


@dataclass(slots=True, kw_only=True)
class TypedCounts:
    """Pairing counts accumulated over images; :meth:`scores` forms the F1 figures.

    Attributes
    ----------
    names : tuple of str
        Type names.
    paired, unpaired_true, unpaired_pred : int
        Detection counts.
    confusion : ndarray, int64, shape (T, T)
        Paired nuclei by (true type, predicted type).
    fp_d, fn_d : ndarray, int64, shape (T,)
        Unpaired predictions / true nuclei by type.
    """

    names: tuple[str, ...]
    paired: int = 0
    unpaired_true: int = 0
    unpaired_pred: int = 0
    confusion: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    fp_d: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    fn_d: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        t = len(self.names)
        if self.confusion.shape != (t, t):
            self.confusion = np.zeros((t, t), np.int64)
        if self.fp_d.shape != (t,):
            self.fp_d = np.zeros(t, np.int64)
        if self.fn_d.shape != (t,):
            self.fn_d = np.zeros(t, np.int64)

    def add(self, true: TypedPoints, pred: TypedPoints, radius: float) -> None:
        """Pair one image's nuclei and add its counts."""
        pairs, un_t, un_p = pair_coordinates(true.xy, pred.xy, radius)
        t = len(self.names)
        self.paired += len(pairs)
        self.unpaired_true += len(un_t)
        self.unpaired_pred += len(un_p)
        if len(pairs):
            np.add.at(self.confusion, (true.types[pairs[:, 0]], pred.types[pairs[:, 1]]), 1)
        self.fn_d += np.bincount(true.types[un_t], minlength=t)[:t]
        self.fp_d += np.bincount(pred.types[un_p], minlength=t)[:t]

    def scores(self) -> dict[str, float]:
        """Detection precision, recall and F1, type accuracy over pairs, and ``f1_<type>``."""
        tp_d = self.paired
        out = {
            "det_precision": tp_d / max(1, tp_d + self.unpaired_pred),
            "det_recall": tp_d / max(1, tp_d + self.unpaired_true),
            "det_f1": 2 * tp_d / max(1, 2 * tp_d + self.unpaired_pred + self.unpaired_true),
            "type_accuracy": float(np.trace(self.confusion)) / max(1, tp_d),
            "n_true": float(tp_d + self.unpaired_true),
            "n_pred": float(tp_d + self.unpaired_pred),
        }
        for k, name in enumerate(self.names):
            tp = int(self.confusion[k, k])
            fp = int(self.confusion[:, k].sum()) - tp
            fn = int(self.confusion[k, :].sum()) - tp
            tn = 0  # HoVer-Net counts TN only among pairs of type t on one side: none
            denom = 2 * (tp + tn) + 2 * fp + 2 * fn + int(self.fp_d[k]) + int(self.fn_d[k])
            out[f"f1_{name}"] = 2 * (tp + tn) / denom if denom else float("nan")
        return out


def typed_counts(
    pairs: Sequence[tuple[TypedPoints, TypedPoints]], names: tuple[str, ...], radius: float
) -> TypedCounts:
    """:class:`TypedCounts` of ``(true, predicted)`` point sets, one pair of sets per image."""
    counts = TypedCounts(names=names)
    for true, pred in pairs:
        counts.add(true, pred, radius)
    return counts
