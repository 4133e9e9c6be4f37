"""Training and group-aware cross-validation of :class:`TissueNet` patch classifiers.

Training crops are random crops at the model's µm/px with ±10 % scale jitter, dihedral
flips/rotations, HED stain jitter in OD space, brightness jitter and blur; classes are balanced
by weights that equalise every (source, class) cell. Two paths:

* fixed features only (no learned CNN branch, the shipped models): the front end is computed
  once for a bank of CPU-augmented crops per image (:func:`sample_patch`,
  :func:`augment_patch`) and the normalisation + head are fitted on it, with loss weights;
* a learned CNN branch: :func:`fit_fast` trains every weight on crops augmented on the training
  device (CPU or CUDA, :mod:`._gpu_augment`; also a small rotation and contrast jitter),
  drawn by a weighted sampler.

Validation images are classified as at inference (:func:`classify_image`: whole or tiled,
probabilities averaged) and never share a group (patient / source tile) with training images.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from slidestream._device import check_device_spec, resolve_device
from slidestream.errors import ConfigError

from ._data import (
    TissueDataset,
    augment_patch,
    discover_dataset,
    group_kfold,
    group_split,
    read_rgb,
    sample_patch,
)
from ._fast_train import FastTrainConfig, fit_fast
from ._gpu_augment import AugmentConfig, DeviceImages, upload_images
from ._metrics import ClassificationReport, classification_report
from ._network import ARCHITECTURE, TissueNet, fit_textons
from ._runner import PatchClassifier, classify_image, image_patches, save_model
from ._spec import ModelSpec, default_transform
from ._stain_norm import he_gains, pooled_he_levels, rescale_he

__all__ = [
    "CVResult",
    "DataSource",
    "TrainConfig",
    "TrainResult",
    "cross_validate_tissue",
    "train_tissue",
]

logger = logging.getLogger(__name__)

#: Display colours (RGB) of well-known class names; other names use the spec's palette.
_KNOWN_COLORS: dict[str, tuple[int, int, int]] = {
    "tumour": (220, 40, 40),
    "malignant": (220, 40, 40),
    "lung_adenocarcinoma": (220, 40, 40),
    "lung_squamous": (240, 150, 30),
    "non_tumour": (60, 170, 75),
    "benign": (60, 170, 75),
    "lung_benign": (60, 170, 75),
}

EpochCallback = Callable[[int, int, Mapping[str, float]], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class DataSource:
    """One training folder with its resolution and label mapping.

    Attributes
    ----------
    data_dir : Path
    mpp : float or None
        µm/px of its images; ``None`` assumes the model's working resolution.
    class_map : dict of str to str
        Raw label / folder name -> class name.
    """

    data_dir: Path
    mpp: float | None = None
    class_map: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mpp is not None and not self.mpp > 0:
            raise ConfigError(f"--mpp must be > 0, got {self.mpp}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters of :func:`train_tissue` (defaults are those of the shipped models).

    Attributes
    ----------
    epochs, batch_size, samples_per_epoch : int
        An epoch is ``ceil(samples_per_epoch / batch_size)`` optimiser steps on either path.
    lr, weight_decay, label_smoothing : float
        AdamW and loss settings; with a learned CNN branch ``lr`` is the peak of a one-cycle
        schedule.
    patch_size_pixels : int
        Model input side, px.
    spacing_um_px : float
        Model working resolution, µm/px.
    cnn_blocks, stem_stride, fixed_features : int, int, bool
        Residual units per CNN stage (0: plain stages), stride of the first stage, and whether
        the fixed front end is used (see :class:`TissueNet`); stored in the spec only when they
        differ from these defaults, so older specs are unchanged.
    cnn_channels : tuple of int
        Learned CNN branch widths. Empty (default): fixed features only, then the front end has
        no trainable weights and training computes its features once for ``views_per_image``
        augmented crops per image and fits the normalisation + linear head on them (fast).
        Otherwise every weight is trained by :func:`fit_fast` on crops augmented on the
        training device (bfloat16 autocast on CUDA).
    views_per_image : int
        Augmented crops per image in that feature bank.
    dropout : float
    aug_strength : float
        Scales the colour jitter ranges (stain, brightness, contrast, blur; 0: none).
    scale_jitter : float
        Crop zoom drawn from ``[1 - j, 1 + j]`` around the image-to-model scale.
    val_fraction : float
        Share of groups held out for model selection (0: train on all, keep the last epoch).
    seed : int
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    tta : bool
        Whole-image classification averages over the 8 dihedral views of every patch
        (``slidestream.tta = "dihedral"`` in the written spec); validation and cross-validation
        classify the same way.
    stain_norm : bool
        H&E intensity normalisation per image (per slide in whole-slide analysis; see
        :mod:`~slidestream.models.tissue._stain_norm`): the training images are normalised once
        at load to the median of their levels (fitted without labels), which the spec stores
        (``slidestream.stain_norm``).
    """

    epochs: int = 25
    batch_size: int = 32
    samples_per_epoch: int = 768
    lr: float = 3e-3
    weight_decay: float = 1e-3
    label_smoothing: float = 0.1
    patch_size_pixels: int = 112
    spacing_um_px: float = 1.5
    cnn_channels: tuple[int, ...] = ()
    dropout: float = 0.0
    textons: int = 32
    morphology: bool = False
    lbp: bool = False
    hidden: int = 0
    cnn_blocks: int = 0
    stem_stride: int = 2
    fixed_features: bool = True
    views_per_image: int = 16
    aug_strength: float = 1.0
    scale_jitter: float = 0.1
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    tta: bool = False
    stain_norm: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.samples_per_epoch < self.batch_size:
            raise ConfigError(
                f"need epochs >= 1, batch_size >= 2, samples_per_epoch >= batch_size; got "
                f"{self.epochs}, {self.batch_size}, {self.samples_per_epoch}"
            )
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        check_device_spec(self.device)
        if self.patch_size_pixels < 32 or not self.spacing_um_px > 0:
            raise ConfigError("patch_size_pixels must be >= 32 and spacing_um_px > 0")
        if self.aug_strength < 0 or not 0 <= self.scale_jitter < 1:
            raise ConfigError(
                f"need aug_strength >= 0 and scale_jitter in [0, 1); got {self.aug_strength}, "
                f"{self.scale_jitter}"
            )

    def arch_args(self) -> dict[str, Any]:
        """Network arguments stored in the spec's ``slidestream.arch_args``."""
        args: dict[str, Any] = {
            "cnn_channels": list(self.cnn_channels),
            "dropout": self.dropout,
            "textons": self.textons,
            "morphology": self.morphology,
            "lbp": self.lbp,
            "hidden": self.hidden,
        }
        if self.cnn_blocks:
            args["cnn_blocks"] = self.cnn_blocks
        if self.stem_stride != 2:
            args["stem_stride"] = self.stem_stride
        if not self.fixed_features:
            args["fixed_features"] = False
        return args


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    """Outcome of :func:`train_tissue`.

    Attributes
    ----------
    model_dir : Path
    spec : ModelSpec
    val_report : ClassificationReport or None
        Metrics of the selected epoch on the group-disjoint validation split.
    best_epoch : int
    seconds : float
        Wall time of the training.
    """

    model_dir: Path
    spec: ModelSpec
    val_report: ClassificationReport | None
    best_epoch: int
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CVResult:
    """Group-aware k-fold cross-validation (see :func:`cross_validate_tissue`).

    Attributes
    ----------
    folds : tuple of ClassificationReport
        Report of each held-out fold.
    pooled : ClassificationReport
        Report over all out-of-fold predictions.
    seconds : float
    """

    folds: tuple[ClassificationReport, ...]
    pooled: ClassificationReport
    seconds: float

    def summary(self) -> dict[str, Any]:
        """Mean ± sd over folds of accuracy, balanced accuracy and macro F1, plus pooled."""
        out: dict[str, Any] = {"n_folds": len(self.folds)}
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            vals = np.array([getattr(f, key) for f in self.folds])
            out[key] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1))}
            out[f"pooled_{key}"] = float(getattr(self.pooled, key))
        return out


@dataclass(slots=True)
class _Pool:
    """In-memory training material: images, labels, groups, per-image scale, sampling weights."""

    images: list[npt.NDArray[np.uint8]]
    labels: npt.NDArray[np.int64]
    groups: list[str]
    mpps: list[float]
    cells: list[str]
    paths: list[Path]
    class_names: tuple[str, ...]

    def subset(self, idx: npt.NDArray[np.int64]) -> _Pool:
        return _Pool(
            images=[self.images[i] for i in idx],
            labels=self.labels[idx],
            groups=[self.groups[i] for i in idx],
            mpps=[self.mpps[i] for i in idx],
            cells=[self.cells[i] for i in idx],
            paths=[self.paths[i] for i in idx],
            class_names=self.class_names,
        )

    def weights(self) -> npt.NDArray[np.float64]:
        """Sampling weights equalising each (source, class) cell, then each class."""
        cell_count: dict[str, int] = {}
        for c in self.cells:
            cell_count[c] = cell_count.get(c, 0) + 1
        w = np.array([1.0 / cell_count[c] for c in self.cells])
        for k in range(len(self.class_names)):
            mask = self.labels == k
            if mask.any():
                w[mask] /= w[mask].sum()
        out: npt.NDArray[np.float64] = w / w.sum()
        return out


def _load_pool(
    sources: Sequence[DataSource], class_names: Sequence[str] | None, spacing: float
) -> _Pool:
    datasets: list[tuple[DataSource, TissueDataset]] = []
    for src in sources:
        datasets.append((src, discover_dataset(src.data_dir, class_map=src.class_map)))
    names = (
        tuple(class_names)
        if class_names
        else tuple(sorted({c for _, ds in datasets for c in ds.class_names}))
    )
    images, labels, groups, mpps, cells, paths = [], [], [], [], [], []
    index = {c: i for i, c in enumerate(names)}
    for si, (src, ds) in enumerate(datasets):
        for s in ds.samples:
            if s.label not in index:
                raise ConfigError(f"{s.path}: label {s.label!r} is not in classes {list(names)}")
            images.append(read_rgb(s.path))
            labels.append(index[s.label])
            groups.append(f"{si}:{s.group}")
            mpps.append(src.mpp or spacing)
            cells.append(f"{si}:{s.label}")
            paths.append(s.path)
    return _Pool(images, np.array(labels, dtype=np.int64), groups, mpps, cells, paths, names)


def _resolve_device(device: str) -> torch.device:
    return torch.device(resolve_device(device))


def _make_spec(
    cfg: TrainConfig,
    class_names: tuple[str, ...],
    *,
    name: str | None,
    display_name: str | None,
    default_input_mpp: float | None,
    class_colors: Sequence[Sequence[int]] | None,
    stain_reference: Sequence[float] | None = None,
) -> ModelSpec:
    block: dict[str, Any] = {"arch_args": cfg.arch_args(), "tta": "dihedral" if cfg.tta else "none"}
    if default_input_mpp is not None:
        block["default_input_mpp"] = default_input_mpp
    if stain_reference is not None:
        block["stain_norm"] = {"scope": "image", "reference": [float(v) for v in stain_reference]}
    if class_colors is None and all(c in _KNOWN_COLORS for c in class_names):
        class_colors = [_KNOWN_COLORS[c] for c in class_names]
    colors = (
        None
        if class_colors is None
        else tuple((int(c[0]), int(c[1]), int(c[2])) for c in class_colors)
    )
    return ModelSpec(
        architecture=ARCHITECTURE,
        class_names=class_names,
        patch_size_pixels=cfg.patch_size_pixels,
        spacing_um_px=cfg.spacing_um_px,
        transform=default_transform(cfg.patch_size_pixels),
        name=name,
        display_name=display_name,
        class_colors=colors,
        slidestream=block,
    )


def _batch(
    pool: _Pool, idx: npt.NDArray[np.int64], cfg: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    patches = []
    for i in idx:
        scale = pool.mpps[i] / cfg.spacing_um_px
        scale *= float(rng.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter))
        p = sample_patch(pool.images[i], scale=scale, patch_px=cfg.patch_size_pixels, rng=rng)
        patches.append(augment_patch(p, rng, strength=cfg.aug_strength))
    x = torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.from_numpy(pool.labels[idx])


def _evaluate(
    model: PatchClassifier, pool: _Pool
) -> tuple[ClassificationReport, npt.NDArray[np.float32]]:
    probs = np.stack(
        [classify_image(im, m, model) for im, m in zip(pool.images, pool.mpps, strict=True)]
    )
    pred = probs.argmax(axis=1)
    return classification_report(pool.labels, pred, pool.class_names), probs


@dataclass(slots=True)
class _Bank:
    """Fixed-front-end features: augmented training views and inference patches per image."""

    views: torch.Tensor  # (n_images, V, F)
    test: list[torch.Tensor]  # per image (P, F), the patches classify_image uses


@torch.inference_mode()
def _feature_bank(net: TissueNet, pool: _Pool, cfg: TrainConfig, device: torch.device) -> _Bank:
    rng = np.random.default_rng(cfg.seed + 1)
    net.eval()
    views = []
    for i in range(len(pool.images)):
        x, _ = _batch(pool, np.full(cfg.views_per_image, i, dtype=np.int64), cfg, rng)
        views.append(net.features(x.to(device)).cpu())
    test = []
    for im, m in zip(pool.images, pool.mpps, strict=True):
        patches = torch.from_numpy(image_patches(im, m, _spec_for(cfg, pool.class_names)))
        test.append(net.features(patches.to(device).float() / 255.0).cpu())
    return _Bank(views=torch.stack(views), test=test)


def _spec_for(
    cfg: TrainConfig, class_names: tuple[str, ...], stain_reference: Sequence[float] | None = None
) -> ModelSpec:
    return _make_spec(
        cfg,
        class_names,
        name=None,
        display_name=None,
        default_input_mpp=None,
        class_colors=None,
        stain_reference=stain_reference,
    )


def _normalise_pool(pool: _Pool, cfg: TrainConfig) -> list[float] | None:
    """Image-level stain normalisation of the training images, in place (``cfg.stain_norm``);
    returns the reference ``[h, e]`` (median of the images' levels), else None.

    Each image's levels come from its patches at the model's µm/px (as :func:`classify_image`
    computes them); its gains are applied to the image at its own resolution.
    """
    if not cfg.stain_norm:
        return None
    spec = _spec_for(cfg, pool.class_names)
    levels = [
        pooled_he_levels(image_patches(im, m, spec, tta=False))
        for im, m in zip(pool.images, pool.mpps, strict=True)
    ]
    reference = torch.stack(levels).median(dim=0).values
    for i, level in enumerate(levels):
        x = torch.from_numpy(np.ascontiguousarray(pool.images[i].transpose(2, 0, 1)))[None]
        out = rescale_he(x, he_gains(level, reference))[0].permute(1, 2, 0)
        pool.images[i] = np.ascontiguousarray(out.numpy())
    return [float(v) for v in reference]


def _head_logits(net: TissueNet, feats: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = net.head(net.dropout(net.norm(feats)))
    return out


@torch.inference_mode()
def _bank_predict(
    net: TissueNet, bank: _Bank, idx: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    net.eval()
    dev = next(net.parameters()).device
    out = [
        torch.softmax(_head_logits(net, bank.test[i].to(dev)), 1).mean(0).cpu().numpy() for i in idx
    ]
    return np.stack(out).astype(np.float32)


def _new_net(
    pool: _Pool, cfg: TrainConfig, device: torch.device, *, fit_dictionary: bool = True
) -> TissueNet:
    """A fresh network; its texton dictionary is fitted on augmented crops of ``pool``
    unless ``fit_dictionary`` is false."""
    torch.manual_seed(cfg.seed)
    net = TissueNet(num_classes=len(pool.class_names), **_net_kwargs(cfg))
    if cfg.textons and fit_dictionary:
        rng = np.random.default_rng(cfg.seed + 2)
        n = min(256, 2 * len(pool.images))
        idx = rng.permutation(np.arange(n) % len(pool.images)).astype(np.int64)
        x, _ = _batch(pool, idx, cfg, rng)
        fit_textons(net, x, seed=cfg.seed)
    return net.to(device)


def _net_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    args = cfg.arch_args()
    args["cnn_channels"] = tuple(args["cnn_channels"])
    return args


def _fit(
    train: _Pool,
    val: _Pool | None,
    spec: ModelSpec,
    cfg: TrainConfig,
    on_epoch: EpochCallback | None,
) -> tuple[TissueNet, ClassificationReport | None, int]:
    """Train on ``train``; select the epoch with the best validation balanced accuracy."""
    device = _resolve_device(cfg.device)
    # With a learned branch, fit_fast fits the textons itself (on device-side crops).
    net = _new_net(train, cfg, device, fit_dictionary=not cfg.cnn_channels)
    if not cfg.cnn_channels:
        both = train if val is None else _concat(train, val)
        bank = _feature_bank(net, both, cfg, device)
        n_tr = len(train.images)
        va_idx = np.arange(n_tr, len(both.images), dtype=np.int64)
        return _fit_bank(net, bank, both, np.arange(n_tr, dtype=np.int64), va_idx, cfg, on_epoch)
    return _fit_learned(net, train, val, spec, cfg, on_epoch, device)


def _concat(a: _Pool, b: _Pool) -> _Pool:
    return _Pool(
        a.images + b.images,
        np.concatenate([a.labels, b.labels]),
        a.groups + b.groups,
        a.mpps + b.mpps,
        a.cells + b.cells,
        a.paths + b.paths,
        a.class_names,
    )


def _fit_bank(
    net: TissueNet,
    bank: _Bank,
    pool: _Pool,
    tr: npt.NDArray[np.int64],
    va: npt.NDArray[np.int64],
    cfg: TrainConfig,
    on_epoch: EpochCallback | None,
) -> tuple[TissueNet, ClassificationReport | None, int]:
    """Fit the feature scaler and head on precomputed features of the ``tr`` images."""
    dev = next(net.parameters()).device
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    net.fit_scaler(bank.views[torch.from_numpy(tr)].flatten(0, 1).to(dev))
    opt = torch.optim.AdamW(net.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(cfg.samples_per_epoch / cfg.batch_size)
    # Uniform draws, loss weighted per (source, class) cell: the same balance as a weighted
    # sampler, but every training image contributes to every epoch.
    sample_w = torch.from_numpy(pool.subset(tr).weights() * len(tr)).float()
    n_views = bank.views.shape[1]
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    best_report: ClassificationReport | None = None
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        losses = []
        for _ in range(steps):
            pick = torch.from_numpy(rng.integers(0, len(tr), size=cfg.batch_size))
            img = torch.from_numpy(tr)[pick]
            view = torch.from_numpy(rng.integers(0, n_views, size=cfg.batch_size))
            x = bank.views[img, view].to(dev)
            y = torch.from_numpy(pool.labels)[img].to(dev)
            per = F.cross_entropy(
                _head_logits(net, x), y, label_smoothing=cfg.label_smoothing, reduction="none"
            )
            w = sample_w[pick].to(dev)
            loss = (per * w).sum() / w.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
        stats = {"loss": float(np.mean(losses))}
        if len(va):
            probs = _bank_predict(net, bank, va)
            report = classification_report(pool.labels[va], probs.argmax(1), pool.class_names)
            stats["val_balanced_accuracy"] = report.balanced_accuracy
            if best is None or report.balanced_accuracy >= best[0]:
                state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                best, best_report = (report.balanced_accuracy, epoch, state), report
        if on_epoch is not None:
            on_epoch(epoch, cfg.epochs, stats)
    net.eval()
    if best is not None:
        net.load_state_dict(best[2])
        return net, best_report, best[1]
    return net, None, cfg.epochs


def _augment_config(cfg: TrainConfig) -> AugmentConfig:
    """Device-side augmentation equivalent to the CPU crops of the feature bank.

    The colour ranges of :func:`augment_patch` (HED stain scale / shift, brightness, blur
    probability) scale with ``aug_strength``, plus a contrast jitter of the same relative size;
    the geometry (scale jitter, dihedral symmetry and a small rotation) does not.
    """
    s = cfg.aug_strength
    base = AugmentConfig(patch_px=cfg.patch_size_pixels)
    return replace(
        base,
        scale_jitter=cfg.scale_jitter,
        stain_scale=base.stain_scale * s,
        stain_shift=base.stain_shift * s,
        brightness=base.brightness * s,
        contrast=base.contrast * s,
        blur_p=min(1.0, base.blur_p * s),
    )


def _upload(pool: _Pool, cfg: TrainConfig, device: torch.device) -> DeviceImages:
    """``pool``'s images on ``device`` with their model px per image px.

    Images finer than the model resolution are first area-downsampled on the host to the
    largest zoom the scale jitter can ask for, so that the device's bilinear crops never
    shrink them by more than ``1 + scale_jitter`` (no aliasing, less device memory).
    """
    images, scales = [], []
    for im, mpp in zip(pool.images, pool.mpps, strict=True):
        scale = mpp / cfg.spacing_um_px
        shrink = scale * (1 + cfg.scale_jitter)
        if shrink < 1:
            h, w = im.shape[:2]
            size = (max(1, round(w * shrink)), max(1, round(h * shrink)))
            im = np.ascontiguousarray(cv2.resize(im, size, interpolation=cv2.INTER_AREA))
            scale *= w / size[0]
        images.append(im)
        scales.append(scale)
    return upload_images(images, scales, device)


def _fit_learned(
    net: TissueNet,
    train: _Pool,
    val: _Pool | None,
    spec: ModelSpec,
    cfg: TrainConfig,
    on_epoch: EpochCallback | None,
    device: torch.device,
) -> tuple[TissueNet, ClassificationReport | None, int]:
    """Train every weight (learned CNN branch) with :func:`fit_fast` (device-side crops).

    An epoch is ``ceil(samples_per_epoch / batch_size)`` steps of crops drawn with
    :meth:`_Pool.weights`; with a validation pool, each epoch ends with :func:`classify_image`
    on it and the best epoch's weights are kept (later epochs win ties: the schedule has
    annealed).
    """
    fast = FastTrainConfig(
        augment=_augment_config(cfg),
        epochs=cfg.epochs,
        steps_per_epoch=math.ceil(cfg.samples_per_epoch / cfg.batch_size),
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        label_smoothing=cfg.label_smoothing,
        seed=cfg.seed,
    )
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    best_report: ClassificationReport | None = None

    def epoch_done(epoch: int, epochs: int, fast_stats: Mapping[str, float]) -> None:
        nonlocal best, best_report
        stats = {"loss": fast_stats["loss"]}
        if val is not None and val.images:
            report, _ = _evaluate(PatchClassifier(spec=spec, module=net, device=device), val)
            stats["val_balanced_accuracy"] = report.balanced_accuracy
            if best is None or report.balanced_accuracy >= best[0]:
                state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                best, best_report = (report.balanced_accuracy, epoch, state), report
        logger.info("epoch %d/%d %s", epoch, epochs, stats)
        if on_epoch is not None:
            on_epoch(epoch, epochs, stats)

    data = _upload(train, cfg, device)
    net = fit_fast(net, data, train.labels, train.weights(), fast, on_epoch=epoch_done)
    del data
    if best is not None:
        net.load_state_dict(best[2])
        return net, best_report, best[1]
    return net, None, cfg.epochs


def train_tissue(
    data_dir: str | Path | Sequence[DataSource],
    out_dir: str | Path,
    *,
    mpp: float | None = None,
    config: TrainConfig | None = None,
    class_map: Mapping[str, str] | None = None,
    class_names: Sequence[str] | None = None,
    class_colors: Sequence[Sequence[int]] | None = None,
    name: str | None = None,
    display_name: str | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train a tissue patch classifier and write ``config.json`` + ``weights.safetensors``.

    Parameters
    ----------
    data_dir : str, Path or sequence of DataSource
        One folder (class sub-folders or ``labels.csv``) or several sources (e.g. two organs).
    out_dir : str or Path
        Model folder to create / overwrite.
    mpp : float, optional
        µm/px of the images in ``data_dir`` (ignored for ``DataSource`` inputs); ``None``
        assumes the model's working resolution.
    config : TrainConfig, optional
    class_map : mapping, optional
        Raw label -> class name (e.g. ``LUNG_CLASS_MAP``).
    class_names : sequence of str, optional
        Class order (default: sorted).
    class_colors : sequence of [r, g, b], optional
    name, display_name : str, optional
        Stored in the spec.
    on_epoch : callable, optional
        ``on_epoch(epoch, epochs, stats)`` after each epoch (progress bars live in the CLI).

    Returns
    -------
    TrainResult
    """
    cfg = config or TrainConfig()
    t0 = time.perf_counter()
    if isinstance(data_dir, (str, Path)):
        sources: Sequence[DataSource] = [
            DataSource(data_dir=Path(data_dir), mpp=mpp, class_map=dict(class_map or {}))
        ]
    else:
        sources = list(data_dir)
    pool = _load_pool(sources, class_names, cfg.spacing_um_px)
    reference = _normalise_pool(pool, cfg)
    in_mpps = [s.mpp for s in sources if s.mpp is not None]
    spec = _make_spec(
        cfg,
        pool.class_names,
        name=name,
        display_name=display_name,
        default_input_mpp=float(np.median(in_mpps)) if in_mpps else None,
        class_colors=class_colors,
        stain_reference=reference,
    )
    tr_idx, va_idx = group_split(pool.groups, pool.labels, cfg.val_fraction, seed=cfg.seed)
    val = pool.subset(va_idx) if len(va_idx) else None
    logger.info("training on %d images, validating on %d", len(tr_idx), len(va_idx))
    net, report, best_epoch = _fit(pool.subset(tr_idx), val, spec, cfg, on_epoch)
    out = Path(out_dir)
    spec = save_model(net, spec, out)
    return TrainResult(
        model_dir=out,
        spec=spec,
        val_report=report,
        best_epoch=best_epoch,
        seconds=time.perf_counter() - t0,
    )


def bank_fold_probs(
    pool: _Pool, folds: Sequence[npt.NDArray[np.int64]], cfg: TrainConfig, device: torch.device
) -> Iterator[npt.NDArray[np.float32]]:
    """Held-out class probabilities of each fold of a fixed-feature config, fold by fold.

    The fixed front end (incl. the unsupervised texton dictionary, fitted on all images without
    labels) and its feature bank are computed once, on the first fold; each fold's head is then
    fitted on the other folds' images. Yields ``(len(va), K)`` probabilities per fold, as
    :func:`classify_image` gives them.
    """
    base = _new_net(pool, cfg, device)
    bank = _feature_bank(base, pool, cfg, device)
    for va in folds:
        tr = np.setdiff1d(np.arange(len(pool.images)), va)
        net = copy.deepcopy(base)
        net, _, _ = _fit_bank(net, bank, pool, tr, np.zeros(0, dtype=np.int64), cfg, None)
        yield _bank_predict(net, bank, va)


def _fold_probs(
    pool: _Pool, folds: Sequence[npt.NDArray[np.int64]], cfg: TrainConfig, spec: ModelSpec
) -> Iterator[npt.NDArray[np.float32]]:
    """Held-out probabilities ``(len(va), K)`` of each fold, for any configuration.

    Fixed-feature configurations go through :func:`bank_fold_probs`; a learned CNN trains one
    network per fold and classifies the held-out images with :func:`classify_image`.
    """
    device = _resolve_device(cfg.device)
    if not cfg.cnn_channels:
        yield from bank_fold_probs(pool, folds, cfg, device)
        return
    for va in folds:
        tr = np.setdiff1d(np.arange(len(pool.images)), va)
        net, _, _ = _fit(pool.subset(tr), None, spec, cfg, None)
        _, probs = _evaluate(PatchClassifier(spec=spec, module=net, device=device), pool.subset(va))
        yield probs


class OutOfFold(NamedTuple):
    """Result of :func:`out_of_fold_probabilities`, one row per image."""

    labels: npt.NDArray[np.int64]
    probs: npt.NDArray[np.float32]
    """``(n, K)``: each image classified by the model of the fold that held it out."""
    class_names: tuple[str, ...]
    fold: npt.NDArray[np.int64]
    """The fold that held each image out, ``0 .. n_folds - 1``."""


def out_of_fold_probabilities(
    sources: Sequence[DataSource],
    *,
    n_folds: int = 5,
    config: TrainConfig | None = None,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> OutOfFold:
    """Out-of-fold class probabilities of every image under group-aware k-fold CV.

    The folds depend only on the data and ``seed`` (not on ``config``), so the probabilities
    of different configurations -- e.g. ensemble members at different µm/px -- can be averaged
    image by image. Images are classified as :func:`classify_image` does (with
    ``config.tta``).

    Returns
    -------
    OutOfFold
        ``labels``, ``probs``, ``class_names`` and each image's ``fold``.
    """
    cfg = config or TrainConfig()
    pool = _load_pool(sources, class_names, cfg.spacing_um_px)
    reference = _normalise_pool(pool, cfg)
    folds = group_kfold(pool.groups, pool.labels, n_folds, seed=seed)
    spec = _spec_for(cfg, pool.class_names, reference)
    probs = np.zeros((len(pool.images), len(pool.class_names)), dtype=np.float32)
    fold = np.zeros(len(pool.images), dtype=np.int64)
    for k, (va, p) in enumerate(zip(folds, _fold_probs(pool, folds, cfg, spec), strict=True)):
        probs[va] = p
        fold[va] = k
        logger.info("fold %d/%d done", k + 1, n_folds)
    return OutOfFold(pool.labels, probs, pool.class_names, fold)


def cross_validate_tissue(
    sources: Sequence[DataSource],
    *,
    n_folds: int = 5,
    config: TrainConfig | None = None,
    class_names: Sequence[str] | None = None,
    on_fold: Callable[[int, ClassificationReport], None] | None = None,
) -> CVResult:
    """Group-aware k-fold cross-validation at image level.

    Whole groups (patients / source tiles) go to one fold; each fold's model trains on the other
    folds for ``config.epochs`` epochs (no inner selection) and classifies its held-out images
    whole or tiled exactly as :func:`classify_image` does.

    Returns
    -------
    CVResult
    """
    cfg = config or TrainConfig()
    t0 = time.perf_counter()
    pool = _load_pool(sources, class_names, cfg.spacing_um_px)
    reference = _normalise_pool(pool, cfg)
    folds = group_kfold(pool.groups, pool.labels, n_folds, seed=cfg.seed)
    spec = _spec_for(cfg, pool.class_names, reference)
    reports = []
    oof = np.zeros(len(pool.images), dtype=np.int64)
    for k, (va, probs) in enumerate(zip(folds, _fold_probs(pool, folds, cfg, spec), strict=True)):
        report = classification_report(pool.labels[va], probs.argmax(1), pool.class_names)
        oof[va] = probs.argmax(axis=1)
        reports.append(report)
        logger.info("fold %d/%d: %s", k + 1, n_folds, report.summary_line())
        if on_fold is not None:
            on_fold(k, report)
    pooled = classification_report(pool.labels, oof, pool.class_names)
    return CVResult(folds=tuple(reports), pooled=pooled, seconds=time.perf_counter() - t0)
