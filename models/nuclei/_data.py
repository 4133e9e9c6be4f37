"""Nucleus training data: folders in the common format, resampling, targets and augmentation.

Common format: ``<dir>/images/<id>.png`` (RGB) and ``<dir>/masks/<id>.png`` (uint16 instance
ids, 0 background), optionally ``<dir>/types/<id>.png`` (uint8 nucleus type per pixel, 1..4 =
``TYPE_NAMES``, 0 background; CoNSeP's layout). A points dataset has ``images/`` and a
``points.csv`` (``image,x,y,type``, CRCHisto's layout) and no masks: it supervises only the type
head, through a small disc around each point. Every image is resampled once to the model's
working µm/px; targets (foreground, boundary, normalised distance, type, and where the
segmentation targets are valid) are computed per augmented crop.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from slidestream.errors import ConfigError
from slidestream.models.nuclei._network import TYPE_NAMES

__all__ = [
    "KNOWN_DATASET_MPP",
    "N_TARGETS",
    "POINT_TYPE_ALIASES",
    "DataSource",
    "LabelledImage",
    "augment_colour",
    "load_sources",
    "make_targets",
    "parse_data_arg",
    "point_type_map",
    "resample_image",
    "resample_labels",
    "sample_batch",
]

# µm/px of the shared nucleus datasets (see shared/data/MANIFEST.md). gbm40_emory has no stated
# resolution: its median nucleus equivalent diameter (25.5 px) matches CPM-15's 40x tiles
# (25.1 px at ~0.25 µm/px), so 0.25 µm/px (40x) is our estimate.
KNOWN_DATASET_MPP: Mapping[str, Mapping[str, float]] = {
    "monuseg_kumar": {"*": 0.25},
    "cpm15": {"*": 0.25, **{f"image{i:02d}": 0.5 for i in range(1, 8)}},
    "gbm40_emory": {"*": 0.25},
    "cryonuseg_partial": {"*": 0.25},
    "consep_train": {"*": 0.25},
    # CRCHistoPhenotypes: 500 x 500 px tiles at 20x, 0.55 µm/px per Sirinukunwattana et al. 2016
    # (not stated in the files; see their README).
    "crchisto": {"*": 0.55},
}

POINT_TYPE_ALIASES: Mapping[str, str] = {
    **{name: name for name in TYPE_NAMES},
    "fibroblast": "spindle",
    "others": "other",
    "miscellaneous": "other",
    "lymphocyte": "inflammatory",
}
"""Class names of typed-point datasets (CRCHisto's and ours) -> :data:`TYPE_NAMES`."""

N_TARGETS = 5
"""Target channels: foreground, boundary, distance, type (0 unknown, k = TYPE_NAMES[k-1]) and
segmentation validity (1 where the first three are supervised)."""

_POINT_DISC_UM = 2.0
"""Radius (µm) of the type-supervision disc drawn around each typed point: inside even a small
lymphocyte nucleus (about 6 µm across)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DataSource:
    """One dataset folder and the µm/px of its images.

    Attributes
    ----------
    path : Path
        Folder holding ``images/`` and ``masks/``.
    mpp : float
        Default µm/px of the images.
    per_image_mpp : Mapping[str, float]
        µm/px overrides by image id (file stem).
    """

    path: Path
    mpp: float
    per_image_mpp: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.mpp > 0:
            raise ConfigError(f"{self.path}: µm/px {self.mpp} must be > 0; pass --data DIR:MPP")

    def mpp_of(self, image_id: str) -> float:
        """µm/px of one image."""
        return float(self.per_image_mpp.get(image_id, self.mpp))


def parse_data_arg(arg: str | Path) -> DataSource:
    """Parse ``DIR`` or ``DIR:MPP`` into a :class:`DataSource`.

    Without ``:MPP`` the resolution comes from ``DIR/mpp.json`` (``{"default": 0.25,
    "images": {"id": 0.5}}``) or, for the shared datasets, from :data:`KNOWN_DATASET_MPP`.
    """
    text = str(arg)
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            mpp = float(tail)
        except ValueError:
            mpp = -1.0
        if mpp > 0:
            return DataSource(path=Path(head), mpp=mpp)
    path = Path(text)
    table = path / "mpp.json"
    if table.is_file():
        try:
            data = json.loads(table.read_text())
            return DataSource(
                path=path,
                mpp=float(data["default"]),
                per_image_mpp={str(k): float(v) for k, v in data.get("images", {}).items()},
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{table}: unreadable µm/px table ({exc}); expected "
                '{"default": 0.25, "images": {"id": 0.5}}'
            ) from exc
    known = KNOWN_DATASET_MPP.get(path.name)
    if known is None:
        raise ConfigError(f"{path}: unknown µm/px; pass --data {path}:MPP or add {path}/mpp.json")
    return DataSource(
        path=path, mpp=known["*"], per_image_mpp={k: v for k, v in known.items() if k != "*"}
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelledImage:
    """An image and its instance labels resampled to the working µm/px.

    Attributes
    ----------
    key : str
        ``<dataset>/<id>``.
    rgb : ndarray, uint8, shape (H, W, 3)
        Image at the working µm/px.
    labels : ndarray, int32, shape (H, W)
        Instance ids at the working µm/px (all 0 for a points dataset).
    source_mpp : float
        µm/px of the original file.
    types : ndarray, uint8, shape (H, W), or None
        Nucleus type per pixel (0 unknown, ``k`` = ``TYPE_NAMES[k - 1]``), or None (no types).
    has_masks : bool
        Whether ``labels`` are instance masks (False: points only, no segmentation targets).
    """

    key: str
    rgb: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int32]
    source_mpp: float
    types: npt.NDArray[np.uint8] | None = None
    has_masks: bool = True


def resample_image(rgb: npt.NDArray[np.uint8], scale: float) -> npt.NDArray[np.uint8]:
    """Resize an (H, W, 3) image by ``scale`` (area filter when shrinking, linear otherwise)."""
    if abs(scale - 1.0) < 1e-6:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(rgb, size, interpolation=interp))


def resample_labels(
    labels: npt.NDArray[np.integer[Any]], size: tuple[int, int]
) -> npt.NDArray[np.int32]:
    """Nearest-neighbour resize of an (H, W) label map to ``size`` = (width, height)."""
    if labels.shape[1] == size[0] and labels.shape[0] == size[1]:
        return labels.astype(np.int32)
    out = cv2.resize(labels.astype(np.int32), size, interpolation=cv2.INTER_NEAREST_EXACT)
    return np.asarray(out, np.int32)


def _read_rgb(path: Path) -> npt.NDArray[np.uint8]:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _read_labels(path: Path) -> npt.NDArray[np.int32]:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im, dtype=np.int32)


def _read_points(path: Path) -> dict[str, list[tuple[float, float, int]]]:
    """``points.csv`` (``image,x,y,type``) -> image id -> [(x, y, type index 1..4)]."""
    out: dict[str, list[tuple[float, float, int]]] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"image", "x", "y", "type"} - set(reader.fieldnames or ())
            if missing:
                raise ConfigError(
                    f"{path}: missing column(s) {sorted(missing)}; expected image,x,y,type"
                )
            for line, row in enumerate(reader, start=2):
                name = POINT_TYPE_ALIASES.get(str(row["type"]).strip().lower())
                if name is None:
                    raise ConfigError(
                        f"{path}:{line}: unknown nucleus type {row['type']!r}; expected one of "
                        f"{sorted(POINT_TYPE_ALIASES)}"
                    )
                try:
                    x, y = float(row["x"]), float(row["y"])
                except ValueError as exc:
                    raise ConfigError(f"{path}:{line}: x/y are not numbers ({exc})") from exc
                out.setdefault(str(row["image"]), []).append((x, y, TYPE_NAMES.index(name) + 1))
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable points file ({exc})") from exc
    return out


def point_type_map(
    shape: tuple[int, int], points: Sequence[tuple[float, float, int]], radius_px: float
) -> npt.NDArray[np.uint8]:
    """A type map (0 unknown) with a disc of ``radius_px`` around each ``(x, y, type)`` point."""
    out = np.zeros(shape, np.uint8)
    r = max(1, round(radius_px))
    for x, y, t in points:
        cv2.circle(out, (round(x), round(y)), r, int(t), thickness=-1)
    return out


def load_sources(sources: Sequence[DataSource], mpp: float) -> list[LabelledImage]:
    """Read every image of ``sources`` with its labels and resample it to ``mpp`` µm/px.

    A folder with ``masks/`` gives instance labels (and types from ``types/`` when present); a
    folder with ``points.csv`` and no ``masks/`` gives typed points only.
    """
    out: list[LabelledImage] = []
    for src in sources:
        img_dir, mask_dir, type_dir = src.path / "images", src.path / "masks", src.path / "types"
        points_csv = src.path / "points.csv"
        points = None
        if not mask_dir.is_dir() and points_csv.is_file():
            points = _read_points(points_csv)
        if not img_dir.is_dir() or (points is None and not mask_dir.is_dir()):
            raise ConfigError(
                f"{src.path}: expected images/ and masks/ folders (common format) or images/ "
                "and points.csv (typed points)"
            )
        for img_path in sorted(img_dir.glob("*.png")):
            src_mpp = src.mpp_of(img_path.stem)
            scale = src_mpp / mpp
            if points is not None:
                pts = points.get(img_path.stem)
                if not pts:
                    continue
                t_rgb = resample_image(_read_rgb(img_path), scale)
                shape = (t_rgb.shape[0], t_rgb.shape[1])
                # Point (x, y) is a pixel centre: it maps to (x + 0.5) * scale - 0.5.
                t_pts = [((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5, t) for x, y, t in pts]
                out.append(
                    LabelledImage(
                        key=f"{src.path.name}/{img_path.stem}",
                        rgb=t_rgb,
                        labels=np.zeros(shape, np.int32),
                        source_mpp=src_mpp,
                        types=point_type_map(shape, t_pts, _POINT_DISC_UM / mpp),
                        has_masks=False,
                    )
                )
                continue
            mask_path = mask_dir / img_path.name
            if not mask_path.is_file():
                continue
            rgb = _read_rgb(img_path)
            lab = _read_labels(mask_path)
            if lab.shape != rgb.shape[:2]:
                raise ConfigError(f"{mask_path}: mask {lab.shape} != image {rgb.shape[:2]}")
            t_rgb = resample_image(rgb, scale)
            size = (t_rgb.shape[1], t_rgb.shape[0])
            t_lab = resample_labels(lab, size)
            t_types: npt.NDArray[np.uint8] | None = None
            type_path = type_dir / img_path.name
            if type_path.is_file():
                types = _read_labels(type_path)
                if types.shape != lab.shape or types.max() > len(TYPE_NAMES) or types.min() < 0:
                    raise ConfigError(
                        f"{type_path}: type map {types.shape} with values {types.min()}.."
                        f"{types.max()}: expected {lab.shape} with 0..{len(TYPE_NAMES)}"
                    )
                t_types = resample_labels(types, size).astype(np.uint8)
            out.append(
                LabelledImage(
                    key=f"{src.path.name}/{img_path.stem}",
                    rgb=t_rgb,
                    labels=t_lab,
                    source_mpp=src_mpp,
                    types=t_types,
                )
            )
    if not out:
        raise ConfigError(f"no labelled images found in {[str(s.path) for s in sources]}")
    return out


def make_targets(labels: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.float32]:
    """Training targets from an instance map.

    Parameters
    ----------
    labels : ndarray of int, shape (H, W)
        Instance ids (0 background).

    Returns
    -------
    ndarray, float32, shape (3, H, W)
        Foreground (0/1), boundary (one-pixel inner contour of every instance, 0/1) and the
        distance to the instance border divided by the instance's maximum (0..1).
    """
    lab = labels.astype(np.int32)
    fg = lab > 0
    # A pixel is an inner boundary if a 4-neighbour carries a different id.
    pad = np.pad(lab, 1, mode="edge")
    centre = pad[1:-1, 1:-1]
    diff = (
        (pad[:-2, 1:-1] != centre)
        | (pad[2:, 1:-1] != centre)
        | (pad[1:-1, :-2] != centre)
        | (pad[1:-1, 2:] != centre)
    )
    boundary = diff & fg
    # Distance inside each instance: cut touching instances apart at their shared border.
    touching = np.zeros_like(fg)
    for a, b in (
        (pad[:-2, 1:-1], centre),
        (pad[2:, 1:-1], centre),
        (pad[1:-1, :-2], centre),
        (pad[1:-1, 2:], centre),
    ):
        touching |= (a != b) & (a > 0) & (b > 0)
    dist = ndi.distance_transform_edt(fg & ~touching).astype(np.float32)
    n = int(lab.max())
    if n > 0:
        # per-instance maximum (np.maximum.at: ndimage.maximum sorts every pixel)
        peak = np.zeros(n + 1, np.float32)
        np.maximum.at(peak, lab.ravel(), dist.ravel())
        peak[0] = 1.0
        dist = (dist / np.maximum(peak[lab], 1.0)).astype(np.float32)
    return np.stack([fg.astype(np.float32), boundary.astype(np.float32), dist])


# Ruifrok & Johnston H&E(-DAB) stain vectors (as scikit-image ``rgb_from_hed``).
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32
)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def augment_colour(
    rgb: npt.NDArray[np.uint8], rng: np.random.Generator, *, strength: float = 1.0
) -> npt.NDArray[np.uint8]:
    """Stain jitter in optical-density (HED) space, brightness/contrast and optional blur.

    Each stain concentration is scaled by ``U(1 - 0.25s, 1 + 0.25s)`` and shifted by
    ``U(-0.05s, 0.05s)`` OD units (``s = strength``); with probability 0.25 a Gaussian blur of
    sigma ``U(0.3, 1.0)`` px follows.
    """
    od = -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    hed = od.reshape(-1, 3) @ _HED_FROM_RGB
    alpha = rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength, size=3).astype(np.float32)
    beta = rng.uniform(-0.05 * strength, 0.05 * strength, size=3).astype(np.float32)
    hed = hed * alpha + beta
    out = 255.0 * np.power(10.0, -(hed @ _RGB_FROM_HED))
    out = out.reshape(rgb.shape)
    gain = rng.uniform(1 - 0.1 * strength, 1 + 0.1 * strength)
    out = (out - 128.0) * gain + 128.0 + rng.uniform(-10, 10) * strength
    res: npt.NDArray[np.uint8] = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < 0.25:
        blurred = cv2.GaussianBlur(res, (0, 0), sigmaX=float(rng.uniform(0.3, 1.0)))
        res = np.asarray(blurred, np.uint8)
    return res


def _random_crop(
    item: LabelledImage, crop_px: int, rng: np.random.Generator, scale_range: tuple[float, float]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int32], npt.NDArray[np.uint8]]:
    h, w = item.labels.shape
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    scale = float(np.exp(rng.uniform(lo, hi)))  # >1 zooms in
    src = round(crop_px / scale)
    src = min(src, h, w)
    y0 = int(rng.integers(0, h - src + 1))
    x0 = int(rng.integers(0, w - src + 1))
    rgb = item.rgb[y0 : y0 + src, x0 : x0 + src]
    lab = item.labels[y0 : y0 + src, x0 : x0 + src]
    types = (
        item.types[y0 : y0 + src, x0 : x0 + src]
        if item.types is not None
        else np.zeros((src, src), np.uint8)
    )
    if src != crop_px:
        interp = cv2.INTER_AREA if src > crop_px else cv2.INTER_LINEAR
        rgb = np.asarray(cv2.resize(rgb, (crop_px, crop_px), interpolation=interp), np.uint8)
        lab = resample_labels(lab, (crop_px, crop_px))
        types = resample_labels(types, (crop_px, crop_px)).astype(np.uint8)
    k = int(rng.integers(0, 4))
    rgb, lab, types = np.rot90(rgb, k), np.rot90(lab, k), np.rot90(types, k)
    if rng.random() < 0.5:
        rgb, lab, types = rgb[:, ::-1], lab[:, ::-1], types[:, ::-1]
    return np.ascontiguousarray(rgb), np.ascontiguousarray(lab), np.ascontiguousarray(types)


def sample_batch(
    items: Sequence[LabelledImage],
    weights: npt.NDArray[np.float64],
    rng: np.random.Generator,
    *,
    batch_size: int,
    crop_px: int,
    scale_range: tuple[float, float] = (0.8, 1.25),
    colour_strength: float = 1.0,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Draw an augmented batch.

    Returns
    -------
    images : ndarray, uint8, shape (N, 3, crop_px, crop_px)
    targets : ndarray, float32, shape (N, N_TARGETS, crop_px, crop_px)
        Foreground, boundary and distance (:func:`make_targets`), the type index (0 unknown) and
        the segmentation validity (0 for crops of points-only images).
    """
    imgs = np.empty((batch_size, 3, crop_px, crop_px), np.uint8)
    tgts = np.empty((batch_size, N_TARGETS, crop_px, crop_px), np.float32)
    picks = rng.choice(len(items), size=batch_size, p=weights)
    for b, idx in enumerate(picks):
        item = items[int(idx)]
        rgb, lab, types = _random_crop(item, crop_px, rng, scale_range)
        rgb = augment_colour(rgb, rng, strength=colour_strength)
        imgs[b] = rgb.transpose(2, 0, 1)
        tgts[b, :3] = make_targets(lab)
        tgts[b, 3] = types
        tgts[b, 4] = 1.0 if item.has_masks else 0.0
    return imgs, tgts
