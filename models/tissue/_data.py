"""Tissue-classification datasets: discovery, group-aware splits and augmentation.

Two layouts are read: one sub-folder per class (``DIR/<class>/<image>``), or a ``labels.csv`` with
columns ``file,label`` and optionally a group column (``group``, ``patient_id``, ``patient``,
``slide`` or ``slide_id``); ``file`` is relative to ``DIR``. Without a group column every image is
its own group.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

from slidestream.errors import ConfigError

__all__ = [
    "IMAGE_EXTENSIONS",
    "LUNG_CLASS_MAP",
    "Sample",
    "TissueDataset",
    "augment_patch",
    "discover_dataset",
    "group_kfold",
    "group_split",
    "read_rgb",
    "sample_patch",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
_GROUP_COLUMNS = ("group", "patient_id", "patient", "slide", "slide_id")

#: LC25000 folder names -> our class names.
LUNG_CLASS_MAP: Mapping[str, str] = {
    "lung_aca": "lung_adenocarcinoma",
    "lung_scc": "lung_squamous",
    "lung_n": "lung_benign",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One labelled image.

    Attributes
    ----------
    path : Path
    label : str
        Class name after mapping.
    group : str
        Patient / slide / source-tile id; never split across train and validation.
    """

    path: Path
    label: str
    group: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TissueDataset:
    """Images of one dataset with their class names (sorted unless given).

    Attributes
    ----------
    root : Path
    samples : tuple of Sample
    class_names : tuple of str
    """

    root: Path
    samples: tuple[Sample, ...]
    class_names: tuple[str, ...]

    def labels(self) -> npt.NDArray[np.int64]:
        """Class index per sample."""
        index = {c: i for i, c in enumerate(self.class_names)}
        return np.array([index[s.label] for s in self.samples], dtype=np.int64)

    def groups(self) -> list[str]:
        """Group id per sample."""
        return [s.group for s in self.samples]


def read_rgb(path: Path) -> npt.NDArray[np.uint8]:
    """Read an image file as ``(H, W, 3)`` uint8 RGB (alpha dropped, grey expanded).

    Raises
    ------
    ConfigError
        The file cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read image ({exc}); remove or replace the file") from exc


def discover_dataset(
    data_dir: str | Path,
    *,
    class_map: Mapping[str, str] | None = None,
    class_names: Sequence[str] | None = None,
) -> TissueDataset:
    """Find the labelled images under ``data_dir``.

    Parameters
    ----------
    data_dir : str or Path
        Folder with ``labels.csv`` or one sub-folder per class.
    class_map : mapping of str to str, optional
        Renames raw labels / folder names (e.g. :data:`LUNG_CLASS_MAP`); unmapped names stay.
    class_names : sequence of str, optional
        Class order to use; default sorted names found. Labels outside it raise.

    Returns
    -------
    TissueDataset

    Raises
    ------
    ConfigError
        No images, a missing file, or a label outside ``class_names``.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"{root}: data folder not found; pass --data DIR")
    mapping = dict(class_map or {})
    csv_path = root / "labels.csv"
    samples: list[Sample] = []
    if csv_path.is_file():
        with csv_path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            if "file" not in fields or "label" not in fields:
                raise ConfigError(
                    f"{csv_path}: needs columns file,label[,group]; found {fields}; fix the header"
                )
            gcol = next((g for g in _GROUP_COLUMNS if g in fields), None)
            for row in reader:
                path = root / row["file"]
                if not path.is_file():
                    raise ConfigError(f"{csv_path}: listed file {path} is missing; fix labels.csv")
                label = mapping.get(row["label"], row["label"])
                group = row[gcol] if gcol else row["file"]
                samples.append(Sample(path=path, label=label, group=f"{group}"))
    else:
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            label = mapping.get(sub.name, sub.name)
            for f in sorted(sub.iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    samples.append(Sample(path=f, label=label, group=str(f.relative_to(root))))
    if not samples:
        raise ConfigError(
            f"{root}: no images found; use one sub-folder per class or a labels.csv (file,label)"
        )
    found = sorted({s.label for s in samples})
    names = tuple(class_names) if class_names else tuple(found)
    extra = sorted(set(found) - set(names))
    if extra:
        raise ConfigError(f"{root}: labels {extra} are not model classes {list(names)}")
    return TissueDataset(root=root, samples=tuple(samples), class_names=names)


def group_kfold(
    groups: Sequence[str], labels: npt.NDArray[np.int64], n_folds: int, *, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Assign whole groups to ``n_folds`` folds, balancing size and class mix (seeded).

    Groups are shuffled, then each goes to the fold whose class counts it unbalances least.

    Returns
    -------
    list of ndarray
        Sample indices of each fold's validation set; folds are group-disjoint.
    """
    uniq = sorted(set(groups))
    if n_folds < 2 or n_folds > len(uniq):
        raise ConfigError(f"cannot make {n_folds} folds from {len(uniq)} groups; lower --cv-folds")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    k = int(labels.max()) + 1
    garr = np.asarray(groups)
    members = {g: np.flatnonzero(garr == g) for g in uniq}
    counts = np.zeros((n_folds, k))
    total = np.bincount(labels, minlength=k).astype(float)
    fold_of: dict[str, int] = {}
    # Largest groups first (ties broken by the seeded order) keeps folds even.
    ranked = sorted((uniq[i] for i in order), key=lambda g: -len(members[g]))
    for g in ranked:
        gc = np.bincount(labels[members[g]], minlength=k).astype(float)
        cost = [((counts[f] + gc) / np.maximum(total, 1)).sum() for f in range(n_folds)]
        best = int(np.argmin(cost))
        fold_of[g] = best
        counts[best] += gc
    return [
        np.flatnonzero(np.array([fold_of[g] == f for g in groups])).astype(np.int64)
        for f in range(n_folds)
    ]


def group_split(
    groups: Sequence[str], labels: npt.NDArray[np.int64], val_fraction: float, *, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Group-disjoint train/validation split (GroupShuffleSplit-like, seeded).

    Returns
    -------
    (train_idx, val_idx) : tuple of ndarray
        ``val_idx`` is empty when ``val_fraction`` is 0 or there is a single group.
    """
    n = len(groups)
    if val_fraction <= 0 or len(set(groups)) < 2:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n_folds = max(2, min(len(set(groups)), round(1.0 / val_fraction)))
    val = group_kfold(groups, labels, n_folds, seed=seed)[0]
    train = np.setdiff1d(np.arange(n, dtype=np.int64), val)
    return train, val


def sample_patch(
    image: npt.NDArray[np.uint8],
    *,
    scale: float,
    patch_px: int,
    rng: np.random.Generator,
) -> npt.NDArray[np.uint8]:
    """Random crop of ``image`` resampled by ``scale`` (model px per input px) to a patch.

    The crop covers ``patch_px / scale`` input px (clipped to the image), so an image smaller
    than one patch at the model resolution is used whole, as at inference.
    """
    h, w = image.shape[:2]
    side = patch_px / scale
    ch, cw = min(h, round(side)), min(w, round(side))
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    crop = image[y : y + ch, x : x + cw]
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(crop, (patch_px, patch_px), interpolation=interp))


_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
# Colour jitter ranges at strength 1, shared with the device-side augmentation (AugmentConfig):
# per-stain OD scale 1 ± STAIN_SCALE and shift ± STAIN_SHIFT, brightness 1 ± BRIGHTNESS, and a
# Gaussian blur with probability BLUR_P and sigma in BLUR_SIGMA (px).
STAIN_SCALE = 0.15
STAIN_SHIFT = 0.04
BRIGHTNESS = 0.08
BLUR_P = 0.3
BLUR_SIGMA = (0.3, 1.2)


def augment_patch(
    patch: npt.NDArray[np.uint8], rng: np.random.Generator, *, strength: float = 1.0
) -> npt.NDArray[np.uint8]:
    """Augment an RGB patch: dihedral flips/rot90, HED stain jitter in OD space, brightness,
    Gaussian blur.

    Parameters
    ----------
    patch : ndarray, uint8, (H, W, 3)
    rng : numpy Generator
    strength : float
        Scales the colour jitter ranges (0 disables colour/blur changes).
    """
    out = np.rot90(patch, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if strength > 0:
        od = -np.log((out.astype(np.float32) + 1.0) / 256.0)
        hed = od @ _HED_FROM_RGB.astype(np.float32)
        a, b = STAIN_SCALE * strength, STAIN_SHIFT * strength
        alpha = rng.uniform(1 - a, 1 + a, size=3).astype(np.float32)
        beta = rng.uniform(-b, b, size=3).astype(np.float32)
        hed = hed * alpha + beta
        od = np.clip(hed @ _RGB_FROM_HED.astype(np.float32), 0, None)
        rgb = 256.0 * np.exp(-od) - 1.0
        rgb = rgb * rng.uniform(1 - BRIGHTNESS * strength, 1 + BRIGHTNESS * strength)
        out = np.clip(rgb, 0, 255).astype(np.uint8)
        if rng.random() < BLUR_P * strength:
            sigma = float(rng.uniform(*BLUR_SIGMA))
            out = cv2.GaussianBlur(out, (0, 0), sigma)
    return np.ascontiguousarray(out)
