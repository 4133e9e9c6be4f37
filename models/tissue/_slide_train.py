"""Training and cross-validation of tissue classifiers on patches sampled from annotated slides.

The patches come from the user's own annotations (``slidestream.tiling.plan_patches`` /
``read_patches``: at the model's µm/px, inside the class regions); every slide (or patient, with
a groups table) is one cross-validation group, so no fold ever validates on a slide it trained
on. The networks and the loss are those of :func:`~._train.train_tissue`:

* fixed features (the default): the front end's features of ``views_per_image`` augmented
  crops of every patch are computed once, in batches, and the normalisation + head are fitted
  on them with the loss weights of ``_Pool.weights`` (every (slide, class) cell counts the same,
  then every class), which balances classes; cross-validation fits one head per fold on the same
  bank, and classifies each held-out patch from its own features (as the whole-slide tissue pass
  classifies a patch);
* a learned CNN branch: :func:`~._fast_train.fit_fast` on device-side augmented crops.

``init`` starts from a trained model (``--init tumour-pan``): its architecture, working µm/px,
patch size and the label-free front end (texton dictionary) are kept; the feature scaler and
the head are fitted on the user's classes (the head starts from the init model's when the
classes are the same).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from slidestream.errors import ConfigError

from ._data import augment_patch, group_kfold, sample_patch
from ._metrics import ClassificationReport, classification_report
from ._network import ARCHITECTURE, TissueNet, fit_textons
from ._runner import PatchClassifier
from ._spec import ModelSpec
from ._stain_norm import he_gains, pooled_he_levels, rescale_he
from ._train import (
    CVResult,
    TrainConfig,
    _Bank,
    _bank_predict,
    _fit,
    _fit_bank,
    _make_spec,
    _net_kwargs,
    _Pool,
    _resolve_device,
)

__all__ = [
    "SlidePatches",
    "SlideTrainResult",
    "config_from_init",
    "cross_validate_slides",
    "normalise_slides",
    "train_on_slides",
]

logger = logging.getLogger(__name__)

#: Side of a spatial cross-validation block, in patch sides (single-slide CV).
_SPATIAL_CELL = 6
#: Crops per forward pass when the feature bank is computed.
_BANK_BATCH = 64
#: Stain levels of a slide come from at most this many of its patches (as ``slidestream run``).
_STAIN_PATCHES = 64

BankCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class SlidePatches:
    """The training patches of one annotated slide.

    Attributes
    ----------
    slide : str
        Slide name (file name).
    group : str
        Cross-validation group: the slide, or its patient (``--groups``).
    patches : ndarray, uint8, (N, S, S, 3)
        RGB patches at the model's µm/px.
    labels : ndarray, int64, (N,)
        Class index into ``class_names``.
    class_names : tuple of str
    l0_xy : ndarray, float64, (N, 2), optional
        Top-left corner of each patch, level-0 px (spatial cross-validation blocks).
    l0_size : float
        Patch side, level-0 px.
    """

    slide: str
    group: str
    patches: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    class_names: tuple[str, ...]
    l0_xy: npt.NDArray[np.float64] | None = None
    l0_size: float = 0.0

    def __post_init__(self) -> None:
        if self.patches.ndim != 4 or self.patches.shape[-1] != 3:
            raise ConfigError(
                f"{self.slide}: patches must be (N, S, S, 3), got {self.patches.shape}"
            )
        if len(self.labels) != len(self.patches):
            raise ConfigError(
                f"{self.slide}: {len(self.labels)} labels for {len(self.patches)} patches"
            )

    def counts(self) -> dict[str, int]:
        """Patches per class."""
        bins = np.bincount(self.labels, minlength=len(self.class_names))
        return {c: int(bins[i]) for i, c in enumerate(self.class_names)}


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideTrainResult:
    """Outcome of :func:`train_on_slides`.

    Attributes
    ----------
    net : torch.nn.Module
        The trained network (eval mode, on the CPU).
    spec : ModelSpec
        Its spec (not yet written).
    seconds : float
        Wall time of the training.
    """

    net: torch.nn.Module
    spec: ModelSpec
    seconds: float


def config_from_init(cfg: TrainConfig, init: PatchClassifier) -> TrainConfig:
    """``cfg`` with the architecture, µm/px and patch size of the model ``init``.

    Raises
    ------
    ConfigError
        ``init`` is not a slidestream TissueNet, or ``cfg`` asks for a learned CNN branch.
    """
    spec = init.spec
    if spec.architecture != ARCHITECTURE:
        raise ConfigError(
            f"--init {init.name}: only slidestream-tissuenet models can be fine-tuned "
            f"(this one is {spec.architecture!r})"
        )
    args = dict(spec.slidestream.get("arch_args", {}))
    if args.get("cnn_channels") or cfg.cnn_channels:
        raise ConfigError(
            f"--init {init.name}: fine-tuning is for fixed-feature models; drop --cnn or --init"
        )
    return replace(
        cfg,
        patch_size_pixels=spec.patch_size_pixels,
        spacing_um_px=spec.spacing_um_px,
        textons=int(args.get("textons", cfg.textons)),
        morphology=bool(args.get("morphology", False)),
        lbp=bool(args.get("lbp", False)),
        hidden=int(args.get("hidden", 0)),
        dropout=float(args.get("dropout", cfg.dropout)),
        cnn_channels=(),
        cnn_blocks=0,
        stem_stride=int(args.get("stem_stride", 2)),
        fixed_features=bool(args.get("fixed_features", True)),
    )


def _spatial_groups(bank: SlidePatches) -> list[str]:
    """Group of each patch: the square of ``_SPATIAL_CELL`` patch sides it starts in (or, without
    positions, runs of consecutive patches)."""
    n = len(bank.patches)
    if bank.l0_xy is None or not bank.l0_size > 0:
        return [f"{bank.group}:{i // 16}" for i in range(n)]
    cell = _SPATIAL_CELL * bank.l0_size
    cx = np.floor(bank.l0_xy[:, 0] / cell).astype(int)
    cy = np.floor(bank.l0_xy[:, 1] / cell).astype(int)
    return [f"{bank.group}:{x}:{y}" for x, y in zip(cx.tolist(), cy.tolist(), strict=True)]


def _pool(banks: Sequence[SlidePatches], cfg: TrainConfig, *, spatial: bool) -> _Pool:
    """All patches as one training pool (groups = slide groups, or spatial blocks)."""
    names = banks[0].class_names
    images: list[npt.NDArray[np.uint8]] = []
    labels, groups, cells = [], [], []
    for bank in banks:
        if bank.class_names != names:
            raise ConfigError(
                f"{bank.slide}: classes {list(bank.class_names)} differ from {list(names)}"
            )
        images += list(bank.patches)
        labels.append(bank.labels)
        groups += _spatial_groups(bank) if spatial else [bank.group] * len(bank.patches)
        cells += [f"{bank.slide}:{int(k)}" for k in bank.labels]
    from pathlib import Path

    return _Pool(
        images=images,
        labels=np.concatenate(labels).astype(np.int64),
        groups=groups,
        mpps=[cfg.spacing_um_px] * len(images),
        cells=cells,
        paths=[Path(b.slide) for b in banks for _ in range(len(b.patches))],
        class_names=names,
    )


def normalise_slides(banks: Sequence[SlidePatches], cfg: TrainConfig) -> list[float] | None:
    """Per-slide H&E gains to the median of the slides' levels (``cfg.stain_norm``), in place;
    returns the reference ``[h, e]`` (None without ``cfg.stain_norm``).

    Call it once, before :func:`cross_validate_slides` and :func:`train_on_slides`.

    A slide's levels come from up to 64 of its patches spread evenly, as ``slidestream run``
    computes them; the reference is stored in the spec.
    """
    if not cfg.stain_norm:
        return None
    levels = []
    for bank in banks:
        pick = np.unique(np.linspace(0, len(bank.patches) - 1, _STAIN_PATCHES).round().astype(int))
        sample = np.ascontiguousarray(bank.patches[pick].transpose(0, 3, 1, 2))
        levels.append(pooled_he_levels(sample))
    reference = torch.stack(levels).median(dim=0).values
    for bank, level in zip(banks, levels, strict=True):
        gains = he_gains(level, reference)
        for start in range(0, len(bank.patches), 256):
            chunk = torch.from_numpy(
                np.ascontiguousarray(bank.patches[start : start + 256].transpose(0, 3, 1, 2))
            )
            out = rescale_he(chunk, gains).permute(0, 2, 3, 1).numpy()
            bank.patches[start : start + 256] = out
    return [float(v) for v in reference]


def _new_patch_net(
    pool: _Pool,
    cfg: TrainConfig,
    device: torch.device,
    init: Mapping[str, torch.Tensor] | None,
) -> TissueNet:
    """A fresh network; textons fitted on augmented crops, or taken from ``init``."""
    torch.manual_seed(cfg.seed)
    net = TissueNet(num_classes=len(pool.class_names), **_net_kwargs(cfg))
    if init is not None:
        own = net.state_dict()
        loaded = {k: v for k, v in init.items() if k in own and own[k].shape == v.shape}
        net.load_state_dict({**own, **loaded})
        logger.info("init: %d of %d tensors taken from the init model", len(loaded), len(own))
    elif cfg.textons:
        rng = np.random.default_rng(cfg.seed + 2)
        n = min(256, 2 * len(pool.images))
        idx = rng.permutation(np.arange(n) % len(pool.images)).astype(np.int64)
        crops = _crops(pool, idx, cfg, rng)
        fit_textons(net, crops, seed=cfg.seed)
    return net.to(device)


def _crops(
    pool: _Pool, idx: npt.NDArray[np.int64], cfg: TrainConfig, rng: np.random.Generator
) -> torch.Tensor:
    """Augmented crops (scale jitter, dihedral, stain, brightness, blur) as float (N, 3, S, S)."""
    out = []
    for i in idx.tolist():
        scale = float(rng.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter))
        p = sample_patch(pool.images[i], scale=scale, patch_px=cfg.patch_size_pixels, rng=rng)
        out.append(augment_patch(p, rng, strength=cfg.aug_strength))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


@torch.inference_mode()
def _patch_bank(
    net: TissueNet,
    pool: _Pool,
    cfg: TrainConfig,
    device: torch.device,
    on_bank: BankCallback | None,
) -> _Bank:
    """Features of ``views_per_image`` augmented crops and of the plain patch, per patch.

    Computed ``_BANK_BATCH`` crops per forward pass (one call per patch would leave a CPU
    mostly idle on per-call overheads).
    """
    rng = np.random.default_rng(cfg.seed + 1)
    net.eval()
    n, views = len(pool.images), cfg.views_per_image
    order = np.repeat(np.arange(n, dtype=np.int64), views)
    feats = []
    total = len(order) + n
    for start in range(0, len(order), _BANK_BATCH):
        x = _crops(pool, order[start : start + _BANK_BATCH], cfg, rng)
        feats.append(net.features(x.to(device)).cpu())
        if on_bank is not None:
            on_bank(min(start + _BANK_BATCH, len(order)), total)
    view_feats = torch.cat(feats).reshape(n, views, -1)
    test = []
    s = cfg.patch_size_pixels
    for start in range(0, n, _BANK_BATCH):
        chunk = np.stack(pool.images[start : start + _BANK_BATCH])
        if chunk.shape[1:3] != (s, s):
            raise ConfigError(f"patches are {chunk.shape[1:3]} px; the model needs {s} x {s}")
        x = torch.from_numpy(np.ascontiguousarray(chunk.transpose(0, 3, 1, 2))).float() / 255.0
        test += list(net.features(x.to(device)).cpu()[:, None, :])
        if on_bank is not None:
            on_bank(len(order) + min(start + _BANK_BATCH, n), total)
    return _Bank(views=view_feats, test=test)


def cross_validate_slides(
    banks: Sequence[SlidePatches],
    *,
    n_folds: int,
    config: TrainConfig,
    init: Mapping[str, torch.Tensor] | None = None,
    on_fold: Callable[[int, ClassificationReport], None] | None = None,
    on_bank: BankCallback | None = None,
) -> tuple[CVResult, bool]:
    """Group k-fold CV of patch classification, folds grouped by slide (or patient).

    With fewer groups than folds (e.g. a single slide) the folds are spatial blocks instead
    (squares of 6 patch sides on each slide; optimistic, neighbouring tissue is alike), and the
    second return value is true.

    Returns
    -------
    (CVResult, spatial)
    """
    cfg = config
    t0 = time.perf_counter()
    n_groups = len({b.group for b in banks})
    spatial = n_groups < n_folds
    if spatial:
        logger.warning(
            "%d slide group(s) for %d folds: cross-validating on spatial blocks of %d patch "
            "sides instead (optimistic: neighbouring patches are alike)",
            n_groups,
            n_folds,
            _SPATIAL_CELL,
        )
    pool = _pool(banks, cfg, spatial=spatial)
    folds = group_kfold(pool.groups, pool.labels, n_folds, seed=cfg.seed)
    device = _resolve_device(cfg.device)
    reports: list[ClassificationReport] = []
    oof = np.zeros(len(pool.images), dtype=np.int64)
    if cfg.cnn_channels:
        spec = _make_spec(
            cfg,
            pool.class_names,
            name=None,
            display_name=None,
            default_input_mpp=None,
            class_colors=None,
        )
        fold_probs = (_cnn_fold(pool, va, spec, cfg, device) for va in folds)
    else:
        base = _new_patch_net(pool, cfg, device, init)
        bank = _patch_bank(base, pool, cfg, device, on_bank)

        def bank_fold(va: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            tr = np.setdiff1d(np.arange(len(pool.images)), va)
            net, _, _ = _fit_bank(
                copy.deepcopy(base), bank, pool, tr, np.zeros(0, np.int64), cfg, None
            )
            return _bank_predict(net, bank, va)

        fold_probs = (bank_fold(va) for va in folds)
    for k, (va, probs) in enumerate(zip(folds, fold_probs, strict=True)):
        report = classification_report(pool.labels[va], probs.argmax(1), pool.class_names)
        oof[va] = probs.argmax(1)
        reports.append(report)
        logger.info("fold %d/%d: %s", k + 1, n_folds, report.summary_line())
        if on_fold is not None:
            on_fold(k, report)
    pooled = classification_report(pool.labels, oof, pool.class_names)
    return CVResult(folds=tuple(reports), pooled=pooled, seconds=time.perf_counter() - t0), spatial


def _cnn_fold(
    pool: _Pool, va: npt.NDArray[np.int64], spec: ModelSpec, cfg: TrainConfig, device: torch.device
) -> npt.NDArray[np.float32]:
    tr = np.setdiff1d(np.arange(len(pool.images)), va)
    net, _, _ = _fit(pool.subset(tr), None, spec, cfg, None)
    model = PatchClassifier(spec=spec, module=net, device=device)
    out = []
    for start in range(0, len(va), 256):
        chunk = np.stack([pool.images[i] for i in va[start : start + 256]])
        x = torch.from_numpy(np.ascontiguousarray(chunk.transpose(0, 3, 1, 2)))
        out.append(model.predict_proba(x))
    return np.concatenate(out).astype(np.float32)


def train_on_slides(
    banks: Sequence[SlidePatches],
    *,
    config: TrainConfig,
    class_colors: Sequence[Sequence[int]] | None = None,
    name: str | None = None,
    display_name: str | None = None,
    default_input_mpp: float | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
    stain_reference: Sequence[float] | None = None,
    on_epoch: Callable[[int, int, Mapping[str, float]], None] | None = None,
    on_bank: BankCallback | None = None,
    extra: Mapping[str, Any] | None = None,
) -> SlideTrainResult:
    """Train the final model on every patch of every slide (the last epoch is kept).

    Parameters
    ----------
    banks : sequence of SlidePatches
        Patches of each slide (already normalised by :func:`normalise_slides` when
        ``config.stain_norm``).
    config : TrainConfig
        ``val_fraction`` is ignored: model quality is measured by :func:`cross_validate_slides`.
    class_colors : sequence of [r, g, b], optional
        One per class (the annotation colours).
    name, display_name : str, optional
    default_input_mpp : float, optional
        Stored in the spec.
    init : mapping of str to Tensor, optional
        State dict of a model to start from (see the module doc).
    stain_reference : sequence of float, optional
        The reference :func:`normalise_slides` returned; stored in the spec.
    on_epoch, on_bank : callable, optional
        Progress: ``on_epoch(epoch, epochs, stats)``, ``on_bank(done, total)`` crops.
    extra : mapping, optional
        More keys for the spec's ``slidestream`` block (e.g. ``training`` provenance).

    Returns
    -------
    SlideTrainResult
    """
    cfg = config
    t0 = time.perf_counter()
    reference = None if stain_reference is None else [float(v) for v in stain_reference]
    pool = _pool(banks, cfg, spatial=False)
    spec = _make_spec(
        cfg,
        pool.class_names,
        name=name,
        display_name=display_name,
        default_input_mpp=default_input_mpp,
        class_colors=class_colors,
        stain_reference=reference,
    )
    if extra:
        spec = spec.replace(slidestream={**spec.slidestream, **dict(extra)})
    device = _resolve_device(cfg.device)
    if cfg.cnn_channels:
        net, _, _ = _fit(pool, None, spec, cfg, on_epoch)
    else:
        net = _new_patch_net(pool, cfg, device, init)
        bank = _patch_bank(net, pool, cfg, device, on_bank)
        everything = np.arange(len(pool.images), dtype=np.int64)
        net, _, _ = _fit_bank(net, bank, pool, everything, np.zeros(0, np.int64), cfg, on_epoch)
    net.eval()
    return SlideTrainResult(net=net.cpu(), spec=spec, seconds=time.perf_counter() - t0)
