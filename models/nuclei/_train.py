"""Training of the nucleus network: ``train_nuclei(data_dirs, out, config=...)``.

Random augmented crops (flips/rot90, scale jitter, HED stain jitter, blur) from every image
resampled to the working µm/px; losses: foreground BCE + soft Dice, boundary weighted BCE + soft
Dice, distance BCE (soft target). Fixed validation split of whole images; the best checkpoint
(validation AJI) is kept; at the end the post-processing thresholds are tuned on validation.
The library reports progress through a callback and never prints.
"""

from __future__ import annotations

import itertools
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
from slidestream.models.nuclei._network import NetworkConfig, NucleusNet, build_network
from slidestream.models.nuclei._postprocess import PostprocessConfig, postprocess_maps
from slidestream.models.nuclei._weights import save_weights

__all__ = ["DEFAULT_VAL_KEYS", "TrainConfig", "TrainResult", "train_nuclei"]

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
"""Whole images held out for validation (organ- and source-diverse; MoNuSeg 'val' images)."""


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


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    fg_t, b_t, d_t = target[:, 0], target[:, 1], target[:, 2]
    fg_l, b_l, d_l = logits[:, 0], logits[:, 1], logits[:, 2]

    def soft_dice(lg: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(lg)
        inter = (p * t).sum()
        return 1.0 - (2.0 * inter + 1.0) / (p.sum() + t.sum() + 1.0)

    loss_fg = F.binary_cross_entropy_with_logits(fg_l, fg_t) + soft_dice(fg_l, fg_t)
    pos_w = torch.tensor(3.0, device=logits.device)
    loss_b = F.binary_cross_entropy_with_logits(b_l, b_t, pos_weight=pos_w) + soft_dice(b_l, b_t)
    loss_d = F.binary_cross_entropy_with_logits(d_l, d_t) + 2.0 * F.mse_loss(
        torch.sigmoid(d_l), d_t
    )
    return loss_fg + loss_b + loss_d


@torch.inference_mode()
def predict_maps(
    net: NucleusNet, rgb: npt.NDArray[np.uint8], device: torch.device
) -> npt.NDArray[np.float32]:
    """Probability maps (3, H, W) of one image at the working µm/px (fp32, no TTA)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].float().to(device)
    x, h, w = pad_to_multiple(x)
    out = torch.sigmoid(net(x).float())[0, :, :h, :w]
    return out.cpu().numpy().astype(np.float32)


def _validate(
    maps: Sequence[npt.NDArray[np.float32]],
    items: Sequence[LabelledImage],
    cfg: PostprocessConfig,
) -> dict[str, float]:
    scores = [
        score_instances(it.labels, postprocess_maps(m, config=cfg))
        for m, it in zip(maps, items, strict=True)
    ]
    if not scores:
        return {"aji": float("nan"), "pq": float("nan")}
    return {
        "aji": float(np.mean([s.aji for s in scores])),
        "pq": float(np.mean([s.pq for s in scores])),
        "dice": float(np.mean([s.dice for s in scores])),
    }


def tune_postprocess(
    maps: Sequence[npt.NDArray[np.float32]], items: Sequence[LabelledImage], mpp: float
) -> tuple[PostprocessConfig, dict[str, float]]:
    """Grid-search the watershed thresholds for mean AJI on validation maps."""
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
        Folders in the common format; ``"DIR:MPP"`` strings give their µm/px (else
        ``DIR/mpp.json`` or the table of known shared datasets).
    out : str or Path
        Destination ``.safetensors`` (``.json`` sidecar beside it; a ``.last.safetensors``
        checkpoint of the latest weights too).
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
    items = load_sources(sources, config.mpp)
    train_items, val_items = _split(items, config.val_keys, config.seed)
    logger.info(
        "nuclei training: %d train / %d val images at %.3f µm/px",
        len(train_items),
        len(val_items),
        config.mpp,
    )
    areas = np.array([it.labels.size for it in train_items], np.float64)
    weights = areas / areas.sum()
    steps_per_epoch = max(1, int(areas.sum() // (config.batch_size * config.crop_px**2)))
    total_steps = steps_per_epoch * config.epochs

    if config.init_weights is not None:
        from slidestream.models.nuclei._weights import load_network as _load_init

        net, _ = _load_init(Path(config.init_weights), config.network)
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
    meta_base: dict[str, Any] = {
        "train": {
            "mpp": config.mpp,
            "crop_px": config.crop_px,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "lr": config.lr,
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
            "n_train_images": len(train_items),
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
    t_opt = time.perf_counter()
    budget_s = None if config.minutes is None else config.minutes * 60.0
    last_val: dict[str, float] = {}

    def run_validation() -> None:
        nonlocal best_aji, last_val
        net.eval()
        maps = [predict_maps(net, it.rgb, device) for it in val_items]
        net.train()
        last_val = _validate(maps, val_items, default_pp)
        mean_loss = float(np.mean(run_loss)) if run_loss else float("nan")
        losses.append(mean_loss)
        run_loss.clear()
        meta = {**meta_base, "steps": step, "val_working_res": last_val}
        save_weights(net, ckpt_last, meta)
        score = last_val["aji"] if val_items else -mean_loss
        if score >= best_aji or not math.isfinite(best_aji):
            best_aji = score
            save_weights(net, out, meta)
        logger.info("step %d: loss %.4f val %s", step, mean_loss, last_val)

    if config.init_weights is not None:
        run_validation()  # the starting point is a candidate best checkpoint
    net.train()
    t_wait = time.perf_counter()
    batches = _batches(train_items, weights, rng, config, pin=use_cuda)
    first = next(batches)
    batches = itertools.chain([first], batches)
    logger.info(
        "first batch after %.1f s (%d loader workers)", time.perf_counter() - t_wait, config.workers
    )
    # The time budget is for optimisation: start it once the batches flow.
    t_opt = time.perf_counter()
    while step < total_steps:
        elapsed = time.perf_counter() - t_opt
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
        loss = _loss(logits.float(), y)
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
    if run_loss or best_aji < 0:
        run_validation()

    # Tune thresholds on the best weights and write the final sidecar.
    from slidestream.models.nuclei._weights import load_network

    best_net, _ = load_network(out, config.network)
    best_net = best_net.to(device)
    maps = [predict_maps(best_net, it.rgb, device) for it in val_items]
    if val_items:
        pp, val = tune_postprocess(maps, val_items, config.mpp)
    else:
        pp, val = default_pp, {}
    wall = time.perf_counter() - t_start
    meta = {
        **meta_base,
        "steps": step,
        "wall_s": round(wall, 1),
        "val_working_res": val,
        "presets": {"default": {"mpp": config.mpp, "tta": False, "postprocess": pp.to_dict()}},
        "default": "default",
    }
    save_weights(best_net, out, meta)
    return TrainResult(weights=out, steps=step, wall_s=wall, val=val, postprocess=pp, losses=losses)
