"""Instance segmentation metrics (AJI, PQ = DQ x SQ, object F1 at IoU 0.5, pixel Dice).

All metrics come from one contingency (overlap) matrix built with ``np.bincount``; there is no
per-pixel or per-pixel-pair Python loop. Both label maps must share one pixel frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from slidestream.errors import ConfigError

__all__ = ["NucleusScores", "aggregated_jaccard_index", "overlap_matrix", "score_instances"]


@dataclass(frozen=True, slots=True, kw_only=True)
class NucleusScores:
    """Scores of one predicted instance map against the ground truth.

    Attributes
    ----------
    aji : float
        Aggregated Jaccard Index (Kumar et al. 2017, as in HoVer-Net's ``get_fast_aji``).
    pq, dq, sq : float
        Panoptic quality = detection quality x segmentation quality (matches at IoU > 0.5).
    f1 : float
        Object F1 at IoU > 0.5 (equal to ``dq`` by definition).
    dice : float
        Pixel Dice of foreground vs background.
    n_true, n_pred, n_matched : int
        Instance counts and IoU > 0.5 matches.
    """

    aji: float
    pq: float
    dq: float
    sq: float
    f1: float
    dice: float
    n_true: int
    n_pred: int
    n_matched: int

    def to_dict(self) -> dict[str, float | int]:
        """Return a JSON-serialisable dict."""
        return asdict(self)


def _compact(labels: npt.NDArray[np.integer[Any]]) -> tuple[npt.NDArray[np.int64], int]:
    ids, inv = np.unique(labels, return_inverse=True)
    inv = inv.reshape(labels.shape).astype(np.int64)
    if ids[0] != 0:  # no background present: shift so that index 0 stays "background"
        inv += 1
    return inv, (len(ids) if ids[0] == 0 else len(ids) + 1)


def overlap_matrix(
    true: npt.NDArray[np.integer[Any]], pred: npt.NDArray[np.integer[Any]]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Pixel overlaps between every true and predicted instance.

    Parameters
    ----------
    true, pred : ndarray of int, shape (H, W)
        Instance maps in the same pixel frame; 0 is background.

    Returns
    -------
    inter : ndarray, int64, shape (n_true, n_pred)
        Overlap in pixels of true instance ``i`` and predicted instance ``j`` (compacted ids).
    true_area, pred_area : ndarray, int64, shapes (n_true,), (n_pred,)
        Instance areas in pixels.
    """
    if true.shape != pred.shape:
        raise ConfigError(f"label maps of shapes {true.shape} and {pred.shape}: expected equal")
    t, nt = _compact(true)
    p, np_ = _compact(pred)
    full = np.bincount((t * np_ + p).ravel(), minlength=nt * np_).reshape(nt, np_)
    true_area = full[1:].sum(axis=1)
    pred_area = full[:, 1:].sum(axis=0)
    return full[1:, 1:], true_area, pred_area


def aggregated_jaccard_index(
    inter: npt.NDArray[np.int64], true_area: npt.NDArray[np.int64], pred_area: npt.NDArray[np.int64]
) -> float:
    """AJI from an overlap matrix (each true nucleus paired with its highest-IoU prediction)."""
    n_true, n_pred = inter.shape
    if n_true == 0:
        return 1.0 if n_pred == 0 else 0.0
    if n_pred == 0:
        return 0.0
    union = true_area[:, None] + pred_area[None, :] - inter
    iou = inter / np.maximum(union, 1)
    best = iou.argmax(axis=1)
    rows = np.arange(n_true)
    has = inter[rows, best] > 0
    c = int(inter[rows, best][has].sum())
    u = int(union[rows, best][has].sum()) + int(true_area[~has].sum())
    used = np.zeros(n_pred, bool)
    used[best[has]] = True
    u += int(pred_area[~used].sum())
    return c / u if u > 0 else 1.0


def score_instances(
    true: npt.NDArray[np.integer[Any]], pred: npt.NDArray[np.integer[Any]]
) -> NucleusScores:
    """Score a predicted instance map against ground truth.

    Parameters
    ----------
    true, pred : ndarray of int, shape (H, W)
        Instance maps in one pixel frame (0 background; ids need not be consecutive).

    Returns
    -------
    NucleusScores

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros((4, 4), int); a[:2, :2] = 1
    >>> score_instances(a, a).aji
    1.0
    """
    inter, ta, pa = overlap_matrix(true, pred)
    n_true, n_pred = inter.shape
    aji = aggregated_jaccard_index(inter, ta, pa)
    union = ta[:, None] + pa[None, :] - inter
    iou = inter / np.maximum(union, 1)
    matched = iou > 0.5  # at most one match per row and column when IoU > 0.5
    tp = int(matched.sum())
    fp, fn = n_pred - tp, n_true - tp
    denom = tp + 0.5 * fp + 0.5 * fn
    dq = tp / denom if denom > 0 else 1.0
    sq = float(iou[matched].mean()) if tp > 0 else (1.0 if denom == 0 else 0.0)
    fg_t, fg_p = true > 0, pred > 0
    s = int(fg_t.sum()) + int(fg_p.sum())
    dice = 2.0 * int((fg_t & fg_p).sum()) / s if s > 0 else 1.0
    return NucleusScores(
        aji=float(aji),
        pq=float(dq * sq),
        dq=float(dq),
        sq=float(sq),
        f1=float(dq),
        dice=float(dice),
        n_true=n_true,
        n_pred=n_pred,
        n_matched=tp,
    )
