"""Fast end-to-end training of :class:`TissueNet` with device-side augmentation.

The images stay on the training device (:func:`upload_images`); every step draws a
class-balanced batch (weighted sampling with replacement), augments it on the device
(:func:`augment_batch`) and takes one AdamW step under a one-cycle schedule with label
smoothing, in bfloat16 autocast on CUDA. Nothing is synchronised with the host inside an
epoch. :func:`train_tissue` trains learned CNN branches with it; the fixed-feature-only models
train faster on their feature bank.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from slidestream.errors import ConfigError

from ._gpu_augment import (
    AugmentConfig,
    DeviceImages,
    apply_augment,
    augment_batch,
    draw_params,
)
from ._network import TissueNet, fit_textons

__all__ = ["FastTrainConfig", "fit_fast"]

FastEpochCallback = Callable[[int, int, Mapping[str, float]], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class FastTrainConfig:
    """Hyper-parameters of :func:`fit_fast`.

    Attributes
    ----------
    augment : AugmentConfig
        Crop size and augmentation ranges.
    epochs : int
    steps_per_epoch : int or None
        Optimiser steps per epoch; ``None``: ``ceil(n_images / batch_size)`` (one pass's worth
        of draws over the training images).
    batch_size : int
    lr : float
        Peak learning rate of the one-cycle schedule.
    weight_decay, label_smoothing : float
    warmup_fraction : float
        Share of the steps spent warming up (``pct_start``).
    seed : int
    bf16 : bool
        bfloat16 autocast on CUDA (ignored on the CPU).
    channels_last : bool
        Channels-last memory format on CUDA (ignored on the CPU).
    norm_crops : int
        Augmented crops whose features set the feature standardisation (and fit the textons).
    """

    augment: AugmentConfig
    epochs: int = 60
    steps_per_epoch: int | None = None
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.15
    seed: int = 0
    bf16: bool = True
    channels_last: bool = True
    norm_crops: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError(
                f"need epochs >= 1, batch_size >= 2; got {self.epochs}, {self.batch_size}"
            )
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if not 0 < self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction must be in (0, 1), got {self.warmup_fraction}")

    def epoch_steps(self, n_images: int) -> int:
        """Optimiser steps per epoch for ``n_images`` training images."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        return max(1, math.ceil(n_images / self.batch_size))

    def steps(self, n_images: int) -> int:
        """Total optimiser steps for ``n_images`` training images."""
        return self.epochs * self.epoch_steps(n_images)


def _chunks(n: int, size: int) -> list[torch.Tensor]:
    return [torch.arange(s, min(n, s + size)) for s in range(0, n, size)]


@torch.no_grad()
def _prepare(
    net: TissueNet, data: DeviceImages, cfg: FastTrainConfig, gen: torch.Generator
) -> None:
    """Fit the textons (if any) and the feature standardisation on augmented crops."""
    n = cfg.norm_crops
    idx = torch.randint(0, len(data), (n,), generator=gen)
    net.eval()
    if net.textons:
        crops = torch.cat([augment_batch(data, idx[c], cfg.augment, gen) for c in _chunks(n, 64)])
        fit_textons(net, crops, seed=cfg.seed)
        del crops
    feats = [net.features(augment_batch(data, idx[c], cfg.augment, gen)) for c in _chunks(n, 64)]
    net.fit_scaler(torch.cat(feats))


def fit_fast(
    net: TissueNet,
    data: DeviceImages,
    labels: npt.NDArray[np.int64],
    sample_weights: npt.NDArray[np.float64],
    cfg: FastTrainConfig,
    *,
    on_epoch: FastEpochCallback | None = None,
    deadline: float | None = None,
) -> TissueNet:
    """Train every weight of ``net`` on device-side augmented crops of ``data``.

    Parameters
    ----------
    net : TissueNet
        A fresh network; moved to ``data``'s device. Its textons (if any) and feature
        standardisation are fitted here, without labels.
    data : DeviceImages
        Training images on the training device.
    labels : ndarray, int64, (N,)
    sample_weights : ndarray, float64, (N,)
        Sampling probabilities (e.g. equal total weight per class).
    cfg : FastTrainConfig
    on_epoch : callable, optional
        ``on_epoch(epoch, epochs, {"loss": ..., "seconds": ...})`` (one host sync per epoch).
    deadline : float, optional
        A ``time.perf_counter()`` value: stop after the first epoch that ends later (the
        schedule is then cut short; ``on_epoch`` tells how many epochs ran).

    Returns
    -------
    TissueNet
        ``net`` after the last step, in eval mode.
    """
    if len(labels) != len(data) or len(sample_weights) != len(data):
        raise ConfigError("fit_fast needs one label and one weight per image")
    dev = data.pixels.device
    cuda = dev.type == "cuda"
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = net.to(dev)
    if cuda and cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    _prepare(net, data, cfg, gen)
    y_all = torch.from_numpy(labels).to(dev)
    w = torch.from_numpy(np.asarray(sample_weights, dtype=np.float64)).float()
    steps_per_epoch = cfg.epoch_steps(len(data))
    total = cfg.steps(len(data))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if cuda else None
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=total, pct_start=cfg.warmup_fraction
    )
    autocast: contextlib.AbstractContextManager[object] = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if cuda and cfg.bf16
        else contextlib.nullcontext()
    )
    # Every draw of the run (images and augmentation) is made up front and moved to the device
    # once, so the steps queue on the GPU without host round trips.
    draws = torch.multinomial(w, total * cfg.batch_size, replacement=True, generator=gen)
    plan = draw_params(data, draws, cfg.augment, gen).to(dev)
    t0 = time.perf_counter()
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        loss_sum = torch.zeros((), device=dev)
        for _ in range(steps_per_epoch):
            p = plan.rows(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            step += 1
            x = apply_augment(data, p, cfg.augment.patch_px)
            if cuda and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = net(x)
            loss = F.cross_entropy(
                logits.float(), y_all[p.idx], label_smoothing=cfg.label_smoothing
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            loss_sum += loss.detach()
        if on_epoch is not None:
            stats = {
                "loss": float(loss_sum) / steps_per_epoch,
                "seconds": time.perf_counter() - t0,
            }
            on_epoch(epoch, cfg.epochs, stats)
        if deadline is not None and time.perf_counter() > deadline:
            break
    net.eval()
    return net
