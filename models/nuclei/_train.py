"""Training of the nucleus network: ``train_nuclei(data_dirs, out, config=...)``.

Random augmented crops (flips/rot90, scale jitter, HED stain jitter, blur) from every image
resampled to the working µm/px; losses: foreground BCE + soft Dice, boundary weighted BCE + soft
Dice, distance BCE (soft target), and with a type head a class-weighted cross-entropy on the
pixels whose type is known (CoNSeP's typed masks, discs around CRCHisto's typed points). Images
without masks (points) supervise only the type head; images without types only the segmentation.

Splits: ``test_keys`` are never loaded for training nor looked at (reporting only, with
``slidestream evaluate nuclei``); ``val_keys`` choose the post-processing thresholds (and the
checkpoint with ``checkpoint="best"``). The default ``checkpoint="last"`` keeps the weights of
the last step, so that validation chooses nothing but the thresholds.

A run checkpoints its whole state (weights, optimiser, step, random streams, time used) to
``<out stem>.resume.pt`` at every validation and resumes from it with ``resume=True`` after any
interruption. The library reports progress through a callback and never prints.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import multiprocessing
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from slidestream.errors import ConfigError
from slidestream.models.nuclei._data import (
    DataSource,
    LabelledImage,
    load_sources,
    parse_data_arg,
    sample_batch,
)
from slidestream.models.nuclei._metrics import score_instances
from slidestream.models.nuclei._model import _cpu_bf16_fast, pad_to_multiple
from slidestream.models.nuclei._network import (
    N_OUTPUTS,
    TYPE_NAMES,
    NetworkConfig,
    NucleusNet,
    build_network,
    load_segmentation_weights,
)
from slidestream.models.nuclei._postprocess import PostprocessConfig, postprocess_maps
from slidestream.models.nuclei._type_metrics import TypedCounts, TypedPoints, instance_points
from slidestream.models.nuclei._types import instance_types
from slidestream.models.nuclei._weights import save_weights

__all__ = [
    "DEFAULT_TEST_KEYS",
    "DEFAULT_VAL_KEYS",
    "TrainConfig",
    "TrainResult",
    "train_nuclei",
    "truth_points",
]

logger = logging.getLogger(__name__)

DEFAULT_VAL_KEYS: tuple[str, ...] = (
    "monuseg_kumar/Breast_TCGA-AR-A1AS-01Z-00-DX1",
    "monuseg_kumar/Kidney_TCGA-HE-7130-01Z-00-DX1",
    "monuseg_kumar/Prostate_TCGA-G9-6363-01Z-00-DX1",
    "cpm15/image03",
    "cpm15/image11",
    "gbm40_emory/GBM40_37",
    "gbm40_emory/GBM40_38",
    "gbm40_emory/GBM40_39",
    "gbm40_emory/GBM40_40",
)
"""Whole images held out for validation (organ- and source-diverse; MoNuSeg 'val' images).

These were the validation images of the segmentation-only presets (they chose those presets'
checkpoints and thresholds, never trained them). Since nuclei v2 they are test images
(:data:`DEFAULT_TEST_KEYS`): the shipped segmentation weights never trained on them.
"""

DEFAULT_TEST_KEYS: tuple[str, ...] = (
    *DEFAULT_VAL_KEYS,
    *(f"consep_train/train_{i}" for i in (24, 25, 26, 27)),
    # CRCHisto: the source repository's 10 "validation" images.
    *(f"crchisto/img{i}" for i in (4, 7, 8, 16, 25, 43, 60, 61, 86, 87)),
)
"""Images kept out of nuclei-v2 training and of every choice (reporting only): the 9 former
validation images, 4 CoNSeP tiles, and 10 CRCHisto images (see the model card for the protocol)."""

DEFAULT_V2_VAL_KEYS: tuple[str, ...] = (
    "consep_train/train_21",
    "consep_train/train_22",
    "consep_train/train_23",
    "monuseg_kumar/Liver_TCGA-18-5592-01Z-00-DX1",
    "cpm15/image12",
    "gbm40_emory/GBM40_33",
    *(f"crchisto/img{i}" for i in (1, 12, 30, 50, 70, 91)),
)
"""Nuclei-v2 validation images: they choose the post-processing thresholds only."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Options of :func:`train_nuclei`.

    Attributes
    ----------
    mpp : float
        Working µm/px of the model; every dataset is resampled to it.
    network : NetworkConfig
        Architecture.
    crop_px, batch_size : int
        Training crop size (px at ``mpp``) and crops per step.
    epochs : int
        Passes over the training pixels (one epoch = training pixels / (batch x crop²) steps).
    minutes : float or None
        Wall-clock budget for the optimisation; the LR schedule follows the larger of the step
        and time fractions, and training stops at whichever limit comes first.
    lr, weight_decay : float
        AdamW settings (cosine decay after a 3 % warm-up).
    seed : int
        Seeds Python, NumPy and torch.
    device : {"auto", "cpu", "cuda"}
        ``auto`` picks CUDA when present (with fp16 autocast + gradient scaling).
    val_keys : tuple of str
        ``<dataset folder>/<image id>`` held out; when none is present in the data, a seeded
        10 % of the images is.
    val_every_steps : int
        Validation (and checkpoint) interval.
    num_threads : int
        ``torch.set_num_threads`` on CPU.
    init_weights : Path or None
        Continue from these ``.safetensors`` (same architecture; safetensors loader, never
        pickle) instead of a random initialisation. They are validated before the first step,
        so the saved best weights are never worse on validation than the starting ones.
    workers : int
        Processes that draw augmented batches in parallel (0: in the training loop). Use them
        on a GPU, where augmentation otherwise starves the device; worker ``i`` draws from its
        own stream seeded ``(seed, i)``, so a run is reproducible for a given worker count.
    colour_strength : float
        Strength of the HED stain / brightness jitter (see ``augment_colour``).
    steps : int or None
        Total optimiser steps (the LR schedule's length); overrides ``epochs``.
    test_keys : tuple of str
        ``<dataset folder>/<image id>`` never trained on nor used for any choice.
    checkpoint : {"last", "best"}
        Keep the last step's weights (validation then chooses only the thresholds) or the best
        validation AJI's.
    resume : bool
        Continue from ``<out stem>.resume.pt`` when it exists (same data, architecture and
        schedule; otherwise an error).
    type_loss_weight : float
        Weight of the type cross-entropy relative to the segmentation losses.
    """

    mpp: float = 0.5
    network: NetworkConfig = field(default_factory=NetworkConfig)
    crop_px: int = 192
    batch_size: int = 8
    epochs: int = 300
    minutes: float | None = None
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    val_keys: tuple[str, ...] = DEFAULT_VAL_KEYS
    val_every_steps: int = 200
    num_threads: int = 2
    init_weights: Path | None = None
    workers: int = 0
    colour_strength: float = 1.0
    steps: int | None = None
    test_keys: tuple[str, ...] = ()
    checkpoint: Literal["last", "best"] = "best"
    resume: bool = False
    type_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.mpp > 0:
            raise ConfigError(f"train mpp={self.mpp}: expected > 0 µm/px")
        if self.crop_px % 16 or self.crop_px < 32:
            raise ConfigError(f"train crop_px={self.crop_px}: expected a multiple of 16, >= 32")
        if self.batch_size < 1 or self.epochs < 1 or self.val_every_steps < 1:
            raise ConfigError("train batch_size/epochs/val_every_steps: expected >= 1")
        if self.minutes is not None and not self.minutes > 0:
            raise ConfigError(f"train minutes={self.minutes}: expected > 0")
        if self.workers < 0 or not self.colour_strength >= 0:
            raise ConfigError("train workers and colour_strength: expected >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train device={self.device!r}: expected auto, cpu or cuda")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"train steps={self.steps}: expected >= 1")
        if self.checkpoint not in ("last", "best"):
            raise ConfigError(f"train checkpoint={self.checkpoint!r}: expected last or best")
        if not self.type_loss_weight >= 0:
            raise ConfigError(f"train type_loss_weight={self.type_loss_weight}: expected >= 0")
        overlap = set(self.val_keys) & set(self.test_keys)
        if overlap:
            raise ConfigError(
                f"train: image(s) {sorted(overlap)} are both validation and test; keep them apart"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    """What :func:`train_nuclei` produced.

    Attributes
    ----------
    weights : Path
        The best ``.safetensors`` (sidecar ``.json`` beside it).
    steps : int
        Optimiser steps run.
    wall_s : float
        Wall time of the whole call, s.
    val : dict
        Validation metrics (working resolution) of the saved weights with tuned thresholds.
    postprocess : PostprocessConfig
        Tuned thresholds.
    losses : list of float
        Mean training loss per validation interval (for the record and tests).
    """

    weights: Path
    steps: int
    wall_s: float
    val: dict[str, float]
    postprocess: PostprocessConfig
    losses: list[float]


ProgressFn = Callable[[int, int, dict[str, float]], None]


def _split(
    items: list[LabelledImage], keys: Sequence[str], seed: int
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    wanted = set(keys)
    val = [it for it in items if it.key in wanted]
    if not val:
        order = np.random.default_rng(seed).permutation(len(items))
        n_val = max(1, len(items) // 10) if len(items) > 1 else 0
        val = [items[i] for i in order[:n_val]]
    val_keys = {it.key for it in val}
    train = [it for it in items if it.key not in val_keys]
    if not train:
        raise ConfigError("no training images left after the validation split; add data")
    return train, val


def truth_points(item: LabelledImage) -> TypedPoints | None:
    """The typed nucleus centroids of a labelled image (working frame), or None (no types).

    Instance masks with a type map give each instance's centroid and majority type; a points
    image gives the centre of each type disc (the points it was drawn from).
    """
    if item.types is None:
        return None
    lab = item.labels if item.has_masks else _disc_labels(item.types)
    n = int(lab.max())
    if n == 0:
        return TypedPoints(xy=np.zeros((0, 2)), types=np.zeros(0, np.int64))
    yy, xx = np.nonzero(lab)
    ids = lab[yy, xx]
    count = np.bincount(ids, minlength=n + 1).astype(np.float64)
    cx = np.bincount(ids, weights=xx, minlength=n + 1) / np.maximum(count, 1)
    cy = np.bincount(ids, weights=yy, minlength=n + 1) / np.maximum(count, 1)
    votes = np.zeros((n + 1, len(TYPE_NAMES) + 1), np.int64)
    np.add.at(votes, (ids, item.types[yy, xx].astype(np.int64)), 1)
    votes[:, 0] = 0  # unknown-type pixels do not vote
    keep = (count > 0) & (votes.sum(axis=1) > 0)
    keep[0] = False
    return TypedPoints(
        xy=np.stack([cx[keep], cy[keep]], axis=1),
        types=votes[keep].argmax(axis=1).astype(np.int64) - 1,
    )


def _disc_labels(types: npt.NDArray[np.uint8]) -> npt.NDArray[np.int32]:
    import cv2

    _, lab = cv2.connectedComponents((types > 0).astype(np.uint8), connectivity=8)
    return np.asarray(lab, np.int32)


def type_class_weights(items: Sequence[LabelledImage]) -> npt.NDArray[np.float32]:
    """Cross-entropy weights of the nucleus types: ``freq^-0.5``, normalised to a pixel mean of 1.

    Frequencies are the typed pixels of the training images; "other" is 2-5 % of nuclei, and
    the inverse square root lifts it without letting a handful of pixels dominate.
    """
    counts = np.zeros(len(TYPE_NAMES), np.float64)
    for it in items:
        if it.types is not None:
            counts += np.bincount(it.types.ravel(), minlength=len(TYPE_NAMES) + 1)[1:]
    if counts.sum() == 0:
        return np.ones(len(TYPE_NAMES), np.float32)
    freq = np.maximum(counts / counts.sum(), 1e-4)
    w = freq**-0.5
    w /= float((w * freq).sum())
    out: npt.NDArray[np.float32] = w.astype(np.float32)
    return out


class _BatchStream(torch.utils.data.IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Endless augmented batches; each DataLoader worker draws from its own seeded stream."""

    def __init__(
        self,
        items: Sequence[LabelledImage],
        weights: npt.NDArray[np.float64],
        *,
        seed: int,
        batch_size: int,
        crop_px: int,
        colour_strength: float,
    ) -> None:
        self.items = list(items)
        self.weights = weights
        self.seed = seed
        self.batch_size = batch_size
        self.crop_px = crop_px
        self.colour_strength = colour_strength

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid = 0 if info is None else info.id
        rng = np.random.default_rng([self.seed, wid])
        while True:
            imgs, tgts = sample_batch(
                self.items,
                self.weights,
                rng,
                batch_size=self.batch_size,
                crop_px=self.crop_px,
                colour_strength=self.colour_strength,
            )
            yield torch.from_numpy(imgs), torch.from_numpy(tgts)


def _batches(
    items: Sequence[LabelledImage],
    weights: npt.NDArray[np.float64],
    rng: np.random.Generator,
    config: TrainConfig,
    pin: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Augmented (images uint8, targets float32) batches, in-loop or from worker processes."""
    if config.workers == 0:
        while True:
            imgs, tgts = sample_batch(
                items,
                weights,
                rng,
                batch_size=config.batch_size,
                crop_px=config.crop_px,
                colour_strength=config.colour_strength,
            )
            yield torch.from_numpy(imgs), torch.from_numpy(tgts)
    stream = _BatchStream(
        items,
        weights,
        seed=config.seed,
        batch_size=config.batch_size,
        crop_px=config.crop_px,
        colour_strength=config.colour_strength,
    )
    # Workers fork from a server that has already imported torch, cv2 and this module, instead of
    # each importing them afresh (seen on a 16-core GPU machine: ~17 s per worker, serialised).
    ctx = multiprocessing.get_context("forkserver")
    multiprocessing.set_forkserver_preload(["__main__", __name__])
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=config.workers,
        pin_memory=pin,
        prefetch_factor=4,
        persistent_workers=True,
        # fork after torch/cv2 threads start can deadlock; forkserver is safe everywhere.
        multiprocessing_context=ctx,
    )
    yield from loader


def _loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    type_weights: torch.Tensor | None = None,
    type_loss_weight: float = 1.0,
) -> torch.Tensor:
    """Segmentation losses on the crops with masks plus the type loss on typed pixels.

    ``target`` is :func:`~slidestream.models.nuclei._data.sample_batch`'s (N, 5, H, W):
    foreground, boundary, distance, type index (0 unknown) and segmentation validity.
    """
    logits = logits.float()
    fg_t, b_t, d_t = target[:, 0], target[:, 1], target[:, 2]
    fg_l, b_l, d_l = logits[:, 0], logits[:, 1], logits[:, 2]
    valid = target[:, 4] if target.shape[1] > 4 else torch.ones_like(fg_t)
    n_valid = valid.sum()
    loss = logits.new_zeros(())
    if float(n_valid) > 0:

        def mean(x: torch.Tensor) -> torch.Tensor:
            return (x * valid).sum() / n_valid

        def soft_dice(lg: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            p = torch.sigmoid(lg) * valid
            inter = (p * t).sum()
            return 1.0 - (2.0 * inter + 1.0) / (p.sum() + (t * valid).sum() + 1.0)

        bce = F.binary_cross_entropy_with_logits
        loss_fg = mean(bce(fg_l, fg_t, reduction="none")) + soft_dice(fg_l, fg_t)
        pos_w = torch.tensor(3.0, device=logits.device)
        loss_b = mean(bce(b_l, b_t, pos_weight=pos_w, reduction="none")) + soft_dice(b_l, b_t)
        loss_d = mean(bce(d_l, d_t, reduction="none")) + 2.0 * mean((torch.sigmoid(d_l) - d_t) ** 2)
        loss = loss_fg + loss_b + loss_d
    if logits.shape[1] > N_OUTPUTS and target.shape[1] > 3 and type_loss_weight > 0:
        t_idx = target[:, 3].long() - 1  # -1: unknown, ignored
        if bool((t_idx >= 0).any()):
            loss = loss + type_loss_weight * F.cross_entropy(
                logits[:, N_OUTPUTS:], t_idx, weight=type_weights, ignore_index=-1
            )
    return loss


@torch.inference_mode()
def predict_maps(
    net: NucleusNet, rgb: npt.NDArray[np.uint8], device: torch.device
) -> npt.NDArray[np.float32]:
    """Probability maps (C, H, W) of one image at the working µm/px (fp32, no TTA): the 3
    segmentation maps (sigmoid), then the type probabilities (softmax) with a type head."""
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].float().to(device)
    x, h, w = pad_to_multiple(x)
    logits = net(x).float()[0, :, :h, :w]
    out = torch.sigmoid(logits[:N_OUTPUTS])
    if logits.shape[0] > N_OUTPUTS:
        out = torch.cat([out, torch.softmax(logits[N_OUTPUTS:], dim=0)])
    return out.cpu().numpy().astype(np.float32)


def _validate(
    maps: Sequence[npt.NDArray[np.float32]],
    items: Sequence[LabelledImage],
    cfg: PostprocessConfig,
    *,
    mpp: float | None = None,
) -> dict[str, float]:
    """Mean AJI/PQ/Dice over the images with masks; with ``mpp`` and type maps also detection
    and per-type F1 (HoVer-Net's, pairing within 3 µm) over the images with types."""
    scores = []
    counts = TypedCounts(names=TYPE_NAMES)
    n_typed = 0
    for m, it in zip(maps, items, strict=True):
        pred = postprocess_maps(m, config=cfg)
        if it.has_masks:
            scores.append(score_instances(it.labels, pred))
        truth = truth_points(it)
        if mpp is None or truth is None or m.shape[0] <= N_OUTPUTS:
            continue
        # The watershed may refine: instance centroids in the working frame.
        u = pred.shape[0] // m.shape[1]
        typed = instance_types(pred, m[N_OUTPUTS:], TYPE_NAMES)
        points = instance_points(pred, typed, upsample=u)
        counts.add(truth, points, radius=3.0 / mpp)
        n_typed += 1
    out: dict[str, float] = {}
    if scores:
        out.update(
            aji=float(np.mean([s.aji for s in scores])),
            pq=float(np.mean([s.pq for s in scores])),
            dice=float(np.mean([s.dice for s in scores])),
        )
    else:
        out.update(aji=float("nan"), pq=float("nan"))
    if n_typed:
        sc = counts.scores()
        out.update(
            det_f1=sc["det_f1"],
            type_accuracy=sc["type_accuracy"],
            **{f"f1_{t}": sc[f"f1_{t}"] for t in TYPE_NAMES},
        )
    return out


def tune_postprocess(
    maps: Sequence[npt.NDArray[np.float32]], items: Sequence[LabelledImage], mpp: float
) -> tuple[PostprocessConfig, dict[str, float]]:
    """Grid-search the watershed thresholds for mean AJI on validation maps (images with
    masks only)."""
    pairs = [(m, it) for m, it in zip(maps, items, strict=True) if it.has_masks]
    maps, items = [m for m, _ in pairs], [it for _, it in pairs]
    area_px = (1.0 / mpp) ** 2  # px per µm²
    best: tuple[float, PostprocessConfig, dict[str, float]] | None = None
    for fg in (0.4, 0.5, 0.6):
        for mk in (0.3, 0.4, 0.5, 0.6):
            for min_um2 in (3.0, 6.0):
                cfg = PostprocessConfig(
                    fg_threshold=fg,
                    marker_threshold=mk,
                    min_marker_px=max(1, round(0.5 * area_px)),
                    min_size_px=max(1, round(min_um2 * area_px)),
                )
                val = _validate(maps, items, cfg)
                if best is None or val["aji"] > best[0]:
                    best = (val["aji"], cfg, val)
    if best is None:  # pragma: no cover - the grid is never empty
        raise ConfigError("empty threshold grid")
    return best[1], best[2]


def _lr_factor(frac: float) -> float:
    if frac < 0.03:
        return max(frac / 0.03, 0.05)
    p = (frac - 0.03) / 0.97
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))


def _resume_path(out: Path) -> Path:
    return out.with_name(out.stem + ".resume.pt")


def _run_identity(config: TrainConfig, sources: Sequence[DataSource], total: int) -> str:
    """What a resumed run must share with the checkpoint: data, split, architecture, schedule."""
    ident = {
        "mpp": config.mpp,
        "network": config.network.to_dict(),
        "crop_px": config.crop_px,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "total_steps": total,
        "minutes": config.minutes,
        "sources": sorted(str(s.path) for s in sources),
        "val_keys": sorted(config.val_keys),
        "test_keys": sorted(config.test_keys),
        "init": None if config.init_weights is None else str(config.init_weights),
    }
    return json.dumps(ident, sort_keys=True)


def _save_resume(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_resume(path: Path, identity: str) -> dict[str, Any]:
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise ConfigError(
            f"{path}: unreadable training checkpoint ({exc}); delete it to start afresh"
        ) from exc
    if state.get("identity") != identity:
        raise ConfigError(
            f"{path}: the checkpoint belongs to a run with other data, split, architecture or "
            "schedule; rerun with the same options, or delete it / drop --resume to start afresh"
        )
    return state


def train_nuclei(
    data_dirs: Sequence[str | Path | DataSource],
    out: str | Path,
    *,
    config: TrainConfig,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train the nucleus network (from scratch or ``config.init_weights``); write weights + JSON.

    Parameters
    ----------
    data_dirs : sequence of str, Path or DataSource
        Folders in the common format (or typed points); ``"DIR:MPP"`` strings give their µm/px
        (else ``DIR/mpp.json`` or the table of known shared datasets).
    out : str or Path
        Destination ``.safetensors`` (``.json`` sidecar beside it; a ``.last.safetensors``
        checkpoint of the latest weights and the ``.resume.pt`` training state too).
    config : TrainConfig
        Options.
    progress : callable, optional
        Called as ``progress(step, total_steps, {"loss": ..., "val_aji": ...})``.

    Returns
    -------
    TrainResult
    """
    t_start = time.perf_counter()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: weights path must end in .safetensors")
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train device=cuda but no CUDA device is available; use --device cpu")
    device = torch.device("cuda" if use_cuda else "cpu")
    if not use_cuda:
        torch.set_num_threads(config.num_threads)

    sources = [d if isinstance(d, DataSource) else parse_data_arg(d) for d in data_dirs]
    test = set(config.test_keys)
    loaded = load_sources(sources, config.mpp)
    items = [it for it in loaded if it.key not in test]
    n_test = len(loaded) - len(items)
    del loaded
    train_items, val_items = _split(items, config.val_keys, config.seed)
    logger.info(
        "nuclei training: %d train / %d val images at %.3f µm/px (%d test images left out)",
        len(train_items),
        len(val_items),
        config.mpp,
        n_test,
    )
    areas = np.array([it.labels.size for it in train_items], np.float64)
    weights = areas / areas.sum()
    steps_per_epoch = max(1, int(areas.sum() // (config.batch_size * config.crop_px**2)))
    total_steps = config.steps if config.steps is not None else steps_per_epoch * config.epochs
    n_types = config.network.n_types
    type_w = type_class_weights(train_items) if n_types else None
    type_w_t = None if type_w is None else torch.from_numpy(type_w).to(device)
    if type_w is not None:
        logger.info(
            "type loss weights %s",
            ", ".join(f"{n} {w:.2f}" for n, w in zip(TYPE_NAMES, type_w, strict=True)),
        )

    if config.init_weights is not None:
        from safetensors.torch import load_file

        from slidestream.models.nuclei._weights import load_network as _load_init

        init_path = Path(config.init_weights)
        init_side = json.loads(init_path.with_suffix(".json").read_text())
        init_arch = NetworkConfig.from_dict(init_side["architecture"])
        if init_arch == config.network:
            net, _ = _load_init(init_path, config.network)
        else:
            _load_init(init_path, init_arch)  # checks the file (sha, shapes, finite values)
            net = build_network(config.network)
            new_keys = load_segmentation_weights(net, load_file(str(init_path)))
            logger.info("initial weights %s; %d new tensors (type head)", init_path, len(new_keys))
        net = net.to(device)
    else:
        net = build_network(config.network).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # bf16 autocast needs no loss scaling (and no per-step sync); fp16 on older GPUs does.
    amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float16
    # On a CPU with native bf16 (AVX512-BF16 / AMX) bf16 autocast trains ~2x faster; elsewhere
    # bf16 is emulated and far slower, so those CPUs train in fp32.
    cpu_amp = not use_cuda and _cpu_bf16_fast()
    if cpu_amp:
        amp_dtype = torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and amp_dtype == torch.float16)
    if use_cuda:
        torch.backends.cudnn.benchmark = True
    loss_sum: torch.Tensor | None = None
    n_sum = 0
    log_every = 1 if not use_cuda else 25
    ckpt_last = out.with_name(out.stem + ".last.safetensors")
    resume_path = _resume_path(out)
    identity = _run_identity(config, sources, total_steps)
    meta_base: dict[str, Any] = {
        "train": {
            "mpp": config.mpp,
            "crop_px": config.crop_px,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "lr": config.lr,
            "steps": total_steps,
            "checkpoint": config.checkpoint,
            "workers": config.workers,
            "colour_strength": config.colour_strength,
            "device": device.type,
            "autocast": str(amp_dtype).removeprefix("torch.") if use_cuda or cpu_amp else None,
            "init_weights": None if config.init_weights is None else str(config.init_weights),
            "sources": [
                {"path": str(s.path), "mpp": s.mpp, "per_image_mpp": dict(s.per_image_mpp)}
                for s in sources
            ],
            "val_keys": [it.key for it in val_items],
            "test_keys": sorted(test),
            "n_train_images": len(train_items),
            "type_loss_weights": None if type_w is None else [float(w) for w in type_w],
        },
    }
    default_pp = PostprocessConfig(
        min_marker_px=max(1, round(0.5 / config.mpp**2)),
        min_size_px=max(1, round(3.0 / config.mpp**2)),
    )
    best_aji = -1.0
    losses: list[float] = []
    run_loss: list[float] = []
    step = 0
    used_s = 0.0  # optimisation time of earlier sittings (resume)
    budget_s = None if config.minutes is None else config.minutes * 60.0
    last_val: dict[str, float] = {}

    if config.resume and resume_path.is_file():
        state = _load_resume(resume_path, identity)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, used_s = int(state["step"]), float(state["used_s"])
        best_aji = float(state["best"])
        losses = [float(x) for x in state["losses"]]
        # A resumed run draws from a stream seeded by (seed, step): reproducible for a given
        # resume point, and never a replay of the batches already seen.
        rng = np.random.default_rng([config.seed, step])
        torch.manual_seed(config.seed + step)
        logger.info("resumed %s at step %d of %d", resume_path, step, total_steps)

    def run_validation() -> None:
        nonlocal best_aji, last_val
        net.eval()
        maps = [predict_maps(net, it.rgb, device) for it in val_items]
        net.train()
        last_val = _validate(maps, val_items, default_pp, mpp=config.mpp)
        mean_loss = float(np.mean(run_loss)) if run_loss else float("nan")
        losses.append(mean_loss)
        run_loss.clear()
        meta = {**meta_base, "steps": step, "val_working_res": last_val}
        save_weights(net, ckpt_last, meta)
        score = last_val["aji"] if val_items and math.isfinite(last_val["aji"]) else -mean_loss
        if config.checkpoint == "last" or score >= best_aji or not math.isfinite(best_aji):
            best_aji = score
            save_weights(net, out, meta)
        _save_resume(
            resume_path,
            {
                "identity": identity,
                "net": net.state_dict(),
                "opt": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "used_s": used_s + (time.perf_counter() - t_opt),
                "best": best_aji,
                "losses": losses,
            },
        )
        logger.info("step %d/%d: loss %.4f val %s", step, total_steps, mean_loss, last_val)

    t_opt = time.perf_counter()
    if config.init_weights is not None and step == 0:
        run_validation()  # the starting point is a candidate best checkpoint
    net.train()
    t_wait = time.perf_counter()
    batch_config = config if step == 0 else dataclasses.replace(config, seed=config.seed + step)
    batches = _batches(train_items, weights, rng, batch_config, pin=use_cuda)
    first = next(batches)
    batches = itertools.chain([first], batches)
    logger.info(
        "first batch after %.1f s (%d loader workers)", time.perf_counter() - t_wait, config.workers
    )
    # The time budget is for optimisation: start it once the batches flow.
    t_opt = time.perf_counter()
    while step < total_steps:
        elapsed = used_s + time.perf_counter() - t_opt
        if budget_s is not None and elapsed >= budget_s:
            break
        frac = step / total_steps
        if budget_s is not None:
            frac = max(frac, elapsed / budget_s)
        for group in opt.param_groups:
            group["lr"] = config.lr * _lr_factor(frac)
        imgs, tgts = next(batches)
        x = imgs.to(device, non_blocking=True).float()
        y = tgts.to(device, non_blocking=True)
        if not use_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_cuda or cpu_amp):
            logits = net(x)
        loss = _loss(logits.float(), y, type_w_t, config.type_loss_weight)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        scaler.step(opt)
        scaler.update()
        step += 1
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        n_sum += 1
        if n_sum == log_every or step % config.val_every_steps == 0:
            # One device sync per log interval, not per step.
            run_loss.append(float(loss_sum) / n_sum)  # type: ignore[arg-type]
            loss_sum, n_sum = None, 0
            if progress is not None:
                progress(
                    step,
                    total_steps,
                    {"loss": run_loss[-1], **{f"val_{k}": v for k, v in last_val.items()}},
                )
        if step % config.val_every_steps == 0:
            run_validation()
    if run_loss or best_aji < 0 or not out.is_file():
        run_validation()

    # Tune thresholds on the kept weights and write the final sidecar.
    from slidestream.models.nuclei._weights import load_network

    best_net, _ = load_network(out, config.network)
    best_net = best_net.to(device)
    maps = [predict_maps(best_net, it.rgb, device) for it in val_items]
    if any(it.has_masks for it in val_items):
        pp, _ = tune_postprocess(maps, val_items, config.mpp)
    else:
        pp = default_pp
    val = _validate(maps, val_items, pp, mpp=config.mpp) if val_items else {}
    wall = time.perf_counter() - t_start
    meta = {
        **meta_base,
        "steps": step,
        "wall_s": round(wall, 1),
        "optimisation_s": round(used_s + time.perf_counter() - t_opt, 1),
        "val_working_res": val,
        "presets": {"default": {"mpp": config.mpp, "tta": False, "postprocess": pp.to_dict()}},
        "default": "default",
    }
    save_weights(best_net, out, meta)
    return TrainResult(weights=out, steps=step, wall_s=wall, val=val, postprocess=pp, losses=losses)
