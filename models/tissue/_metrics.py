"""Classification metrics and dataset evaluation of tissue classifiers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from slidestream.errors import ConfigError

if TYPE_CHECKING:
    from ._runner import PatchClassifier

__all__ = ["ClassificationReport", "classification_report", "evaluate_tissue"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClassificationReport:
    """Image-level classification metrics.

    Attributes
    ----------
    class_names : tuple of str
    confusion : tuple of tuple of int
        ``confusion[true][pred]`` counts.
    accuracy, balanced_accuracy, macro_f1 : float
    precision, recall, f1 : tuple of float
        Per class (0 where undefined).
    n : int
        Number of images.
    """

    class_names: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    f1: tuple[float, ...]
    n: int

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable mapping."""
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            "per_class": {
                c: {"precision": p, "recall": r, "f1": f, "support": sum(row)}
                for c, p, r, f, row in zip(
                    self.class_names,
                    self.precision,
                    self.recall,
                    self.f1,
                    self.confusion,
                    strict=True,
                )
            },
            "class_names": list(self.class_names),
            "confusion_matrix": [list(r) for r in self.confusion],
        }

    def summary_line(self) -> str:
        """``n=.. acc=.. bal_acc=.. macro_f1=..`` on one line."""
        return (
            f"n={self.n} acc={self.accuracy:.4f} bal_acc={self.balanced_accuracy:.4f} "
            f"macro_f1={self.macro_f1:.4f}"
        )

    def to_text(self) -> str:
        """Multi-line human-readable report with the confusion matrix."""
        width = max(8, *(len(c) for c in self.class_names))
        lines = [self.summary_line(), "", f"{'class':<{width}}  precision  recall  f1"]
        for c, p, r, f in zip(self.class_names, self.precision, self.recall, self.f1, strict=True):
            lines.append(f"{c:<{width}}  {p:9.3f}  {r:6.3f}  {f:.3f}")
        lines += [
            "",
            "confusion (rows true, columns predicted):",
            " " * width + "  " + " ".join(f"{c[:8]:>8}" for c in self.class_names),
        ]
        for c, row in zip(self.class_names, self.confusion, strict=True):
            lines.append(f"{c:<{width}}  " + " ".join(f"{v:>8d}" for v in row))
        return "\n".join(lines)


def classification_report(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, class_names: Sequence[str]
) -> ClassificationReport:
    """Accuracy, balanced accuracy (mean recall over present classes), macro F1, per-class
    precision/recall/F1 and the confusion matrix.

    >>> r = classification_report([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b"])
    >>> r.accuracy, r.balanced_accuracy
    (0.75, 0.75)
    """
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    k = len(class_names)
    if t.shape != p.shape:
        raise ConfigError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    diag = np.diag(cm).astype(float)
    recall = np.divide(diag, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(diag, predicted, out=np.zeros(k), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    present = support > 0
    n = int(t.size)
    return ClassificationReport(
        class_names=tuple(class_names),
        confusion=tuple(tuple(int(v) for v in row) for row in cm),
        accuracy=float(diag.sum() / n) if n else 0.0,
        balanced_accuracy=float(recall[present].mean()) if present.any() else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        precision=tuple(float(v) for v in precision),
        recall=tuple(float(v) for v in recall),
        f1=tuple(float(v) for v in f1),
        n=n,
    )


def evaluate_tissue(
    data_dir: str | Path,
    model: PatchClassifier,
    *,
    mpp: float | None = None,
    class_map: Mapping[str, str] | None = None,
    on_image: Callable[[int, int], None] | None = None,
    tta: bool | None = None,
) -> ClassificationReport:
    """Classify every labelled image of ``data_dir`` and score it against its label.

    Parameters
    ----------
    data_dir : str or Path
        Class sub-folders or ``labels.csv`` (as for training).
    model : PatchClassifier
    mpp : float, optional
        µm/px of the images (default: the model's ``default_input_mpp``).
    class_map : mapping, optional
        Raw label -> model class; LC25000 folder names (``lung_aca`` ...) map automatically
        when the model has the lung classes.
    on_image : callable, optional
        ``on_image(done, total)`` progress callback.
    tta : bool, optional
        Dihedral test-time augmentation; ``None`` follows the model's spec.

    Raises
    ------
    ConfigError
        A label is not one of the model's classes.
    """
    from ._data import LUNG_CLASS_MAP, discover_dataset, read_rgb
    from ._runner import classify_image

    mapping = dict(class_map or {})
    if not mapping and set(LUNG_CLASS_MAP.values()) <= set(model.class_names):
        mapping = dict(LUNG_CLASS_MAP)
    ds = discover_dataset(data_dir, class_map=mapping, class_names=model.class_names)
    preds = []
    for i, s in enumerate(ds.samples):
        preds.append(int(classify_image(read_rgb(s.path), mpp, model, tta=tta).argmax()))
        if on_image is not None:
            on_image(i + 1, len(ds.samples))
    return classification_report(ds.labels(), np.array(preds), model.class_names)
