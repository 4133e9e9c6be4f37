"""Fit a nucleus model's type head to the user's classified nuclei (``train nuclei-types``).

The segmentation (encoder, decoder, the three segmentation maps) stays as trained; only the type
head (3x3 convolution, batch norm, ReLU, 1x1 convolution on the last decoder features, see
:mod:`~slidestream.models.nuclei._network`) is fitted, with the user's class names as its
channels. A 3x3 convolution at one pixel is a linear map of that pixel's 3x3 feature
neighbourhood, so the head is fitted as a small MLP on the unfolded neighbourhoods of the pixels
of the annotated nuclei, extracted once per image view (:func:`nucleus_type_samples`); the
fitted layers are then written back as the convolution weights (:func:`build_typed_network`).
Fitting takes seconds; extraction (one forward pass per view) is the cost.

Which pixels a nucleus gives:

* an outline (a polygon): its pixels;
* a point: the pixels of the predicted instance it matches (the instance under the point, else
  the one whose centroid is nearest within ``match_um``; each instance goes to one point), else
  a disc of radius ``disc_um`` (the model missed the nucleus: the type head still learns from
  it).

At inference a nucleus's type is the mean type probability over its predicted pixels
(:func:`~slidestream.models.nuclei._types.instance_types`); :func:`predict_sample_types`
does the same over a nucleus's sampled pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from slidestream.errors import ConfigError
from slidestream.models.nuclei._data import resample_image
from slidestream.models.nuclei._model import NucleusModel
from slidestream.models.nuclei._network import N_OUTPUTS, NetworkConfig, NucleusNet

__all__ = [
    "TypeHeadConfig",
    "TypeHeadFit",
    "TypeSamples",
    "build_typed_network",
    "concat_samples",
    "fit_type_head",
    "nucleus_type_samples",
    "predict_sample_types",
]

_MAX_SIDE_PX = 1024
"""Largest working-resolution image side (px) sampled in one forward pass."""

_HEAD = "unet.final_conv.types."
"""State-dict prefix of the type head (``_Heads.types``)."""

#: Dihedral views of an image: (transpose, flip rows, flip columns).
_VIEWS: tuple[tuple[bool, bool, bool], ...] = (
    (False, False, False),
    (False, False, True),
    (False, True, False),
    (True, False, False),
    (False, True, True),
    (True, True, False),
    (True, False, True),
    (True, True, True),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeHeadConfig:
    """How samples are taken and the head is fitted.

    Attributes
    ----------
    views : int
        Dihedral views of each image (1-8; 1: the image as it is).
    pixels_per_nucleus : int
        Most pixels sampled per nucleus and view.
    match_um : float
        A point matches a predicted instance whose centroid is within this distance (µm).
    disc_um : float
        Radius of the disc a point gives when no instance matches (µm).
    steps : int
        Optimiser steps.
    batch_pixels : int
        Pixels per step.
    lr : float
        AdamW learning rate.
    weight_decay : float
    balance : float
        Class weight exponent: a nucleus of class ``c`` weighs ``n_c ** -balance`` (0: as
        annotated, 1: every class alike; 0.5 between).
    seed : int
    """

    views: int = 4
    pixels_per_nucleus: int = 16
    match_um: float = 3.0
    disc_um: float = 2.0
    steps: int = 1500
    batch_pixels: int = 4096
    lr: float = 3e-3
    weight_decay: float = 1e-4
    balance: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.views <= len(_VIEWS):
            raise ConfigError(f"type head views={self.views}: expected 1 to {len(_VIEWS)}")
        if self.pixels_per_nucleus < 1 or self.steps < 1 or self.batch_pixels < 1:
            raise ConfigError("type head pixels_per_nucleus, steps and batch_pixels must be >= 1")
        if not (self.match_um > 0 and self.disc_um > 0 and self.lr > 0):
            raise ConfigError("type head match_um, disc_um and lr must be > 0")
        if not 0 <= self.balance <= 1:
            raise ConfigError(f"type head balance={self.balance}: expected 0 to 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeSamples:
    """Unfolded decoder features of the pixels of annotated nuclei.

    Attributes
    ----------
    features : ndarray, float16, shape (P, C * 9)
        3x3 neighbourhood of the last decoder features (C channels) at each sampled pixel, in
        the order of a 3x3 convolution's weights (channel, row, column).
    nucleus : ndarray, int64, shape (P,)
        Index of each pixel's nucleus into ``labels``.
    view : ndarray, int8, shape (P,)
        Dihedral view the pixel was sampled in (0: the image as it is).
    labels : ndarray, int64, shape (N,)
        Class index of each nucleus.
    groups : ndarray, int64, shape (N,)
        Cross-validation group (slide or patient) index of each nucleus.
    matched : ndarray, bool, shape (N,)
        The nucleus gave a predicted instance's (or its outline's) pixels, not a disc.
    """

    features: npt.NDArray[np.float16]
    nucleus: npt.NDArray[np.int64]
    view: npt.NDArray[np.int8]
    labels: npt.NDArray[np.int64]
    groups: npt.NDArray[np.int64]
    matched: npt.NDArray[np.bool_]

    @property
    def n_nuclei(self) -> int:
        """Number of nuclei."""
        return len(self.labels)

    def subset(self, keep: npt.NDArray[np.bool_]) -> TypeSamples:
        """The nuclei where ``keep`` (N,) is true, renumbered."""
        new_index = np.cumsum(keep) - 1
        px = keep[self.nucleus]
        return TypeSamples(
            features=self.features[px],
            nucleus=new_index[self.nucleus[px]].astype(np.int64),
            view=self.view[px],
            labels=self.labels[keep],
            groups=self.groups[keep],
            matched=self.matched[keep],
        )


def concat_samples(parts: Sequence[TypeSamples], n_features: int) -> TypeSamples:
    """Join samples of several images (nucleus indices renumbered); ``n_features`` shapes the
    empty result of no parts."""
    if not parts:
        return TypeSamples(
            features=np.zeros((0, n_features), np.float16),
            nucleus=np.zeros(0, np.int64),
            view=np.zeros(0, np.int8),
            labels=np.zeros(0, np.int64),
            groups=np.zeros(0, np.int64),
            matched=np.zeros(0, np.bool_),
        )
    offsets = np.cumsum([0, *[p.n_nuclei for p in parts]])
    return TypeSamples(
        features=np.concatenate([p.features for p in parts]),
        nucleus=np.concatenate([p.nucleus + o for p, o in zip(parts, offsets[:-1], strict=True)]),
        view=np.concatenate([p.view for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        groups=np.concatenate([p.groups for p in parts]),
        matched=np.concatenate([p.matched for p in parts]),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Nucleus:
    """One annotated nucleus in a working-resolution image."""

    xy: tuple[float, float]
    label: int
    outline: npt.NDArray[np.float64] | None


def _decoder_features(
    model: NucleusModel, rgb: npt.NDArray[np.uint8]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Last decoder features (C, H, W) and maps (3 + T, H, W) of one working-res image."""
    h, w = rgb.shape[:2]
    if max(h, w) > _MAX_SIDE_PX:
        raise ConfigError(f"type samples: image {w}x{h} px is larger than {_MAX_SIDE_PX} px")
    captured: list[torch.Tensor] = []
    head = model.net.unet.final_conv
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
        maps = model.predict(x)[0]
    finally:
        hook.remove()
    feats = captured[-1][0, :, :h, :w].float().cpu().numpy()
    return np.ascontiguousarray(feats), np.ascontiguousarray(maps)


def _match_points(
    labels: npt.NDArray[np.int32], points: npt.NDArray[np.float64], radius_px: float
) -> npt.NDArray[np.int64]:
    """Predicted instance of each point (0: none): under it, else the nearest centroid within
    ``radius_px``; each instance to one point (the nearest)."""
    from scipy import ndimage

    n = int(labels.max())
    out = np.zeros(len(points), np.int64)
    if n == 0 or len(points) == 0:
        return out
    centroids = np.asarray(ndimage.center_of_mass(labels > 0, labels, range(1, n + 1)))
    centroids = centroids[:, ::-1]  # (x, y)
    h, w = labels.shape
    cand: list[tuple[float, int, int]] = []
    for i, (x, y) in enumerate(points):
        col, row = int(np.clip(round(x), 0, w - 1)), int(np.clip(round(y), 0, h - 1))
        under = int(labels[row, col])
        if under:
            cand.append((0.0, i, under))
        d = np.hypot(centroids[:, 0] - x, centroids[:, 1] - y)
        for j in np.flatnonzero(d <= radius_px):
            cand.append((float(d[j]), i, int(j) + 1))
    cand.sort()
    used: set[int] = set()
    for _, i, inst in cand:
        if out[i] == 0 and inst not in used:
            out[i] = inst
            used.add(inst)
    return out


def _transform(
    rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64], shape: tuple[int, int], view: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], tuple[int, int]]:
    """Pixel coordinates (and image shape) in a dihedral view of an image."""
    transpose, flip_r, flip_c = _VIEWS[view]
    h, w = shape
    if flip_r:
        rows = h - 1 - rows
    if flip_c:
        cols = w - 1 - cols
    if transpose:
        rows, cols, h, w = cols, rows, w, h
    return rows, cols, (h, w)


def _view_image(rgb: npt.NDArray[np.uint8], view: int) -> npt.NDArray[np.uint8]:
    transpose, flip_r, flip_c = _VIEWS[view]
    out = rgb
    if flip_r:
        out = out[::-1]
    if flip_c:
        out = out[:, ::-1]
    if transpose:
        out = out.transpose(1, 0, 2)
    return np.ascontiguousarray(out)


def nucleus_type_samples(
    model: NucleusModel,
    rgb: npt.NDArray[np.uint8],
    mpp: float,
    points: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    *,
    outlines: Sequence[npt.NDArray[np.float64] | None] | None = None,
    keep: npt.NDArray[np.bool_] | None = None,
    group: int = 0,
    config: TypeHeadConfig | None = None,
) -> TypeSamples:
    """Type-head training samples of the annotated nuclei of one image.

    Parameters
    ----------
    model : NucleusModel
        The model whose type head is fitted (its segmentation finds the nuclei's pixels).
    rgb : ndarray, uint8, shape (H, W, 3)
        The image (with a margin around the nuclei it holds, so that the network sees their
        context).
    mpp : float
        µm/px of ``rgb`` (resampled to the model's working µm/px).
    points : ndarray, float, shape (N, 2)
        Annotated nucleus positions ``(x, y)``, px of ``rgb``.
    labels : ndarray, int, shape (N,)
        Class index of each nucleus.
    outlines : sequence of (K, 2) arrays or None, optional
        Outline ``(x, y)`` in px of ``rgb`` of each nucleus drawn as a polygon (None: a point).
    keep : ndarray, bool, shape (N,), optional
        Nuclei to sample (e.g. those in the image's core, not in its margin); all by default.
    group : int
        Cross-validation group of these nuclei.
    config : TypeHeadConfig, optional

    Returns
    -------
    TypeSamples
        Only nuclei that give at least one pixel.
    """
    cfg = config or TypeHeadConfig()
    scale = mpp / model.mpp
    work = resample_image(rgb, scale)
    shape = (int(work.shape[0]), int(work.shape[1]))
    pts = np.asarray(points, np.float64).reshape(-1, 2) * scale
    sel = np.ones(len(pts), bool) if keep is None else np.asarray(keep, bool)
    nuclei = []
    for i, (p, lab) in enumerate(zip(pts, labels, strict=True)):
        if not sel[i]:
            continue
        outline = None if outlines is None else outlines[i]
        nuclei.append(
            _Nucleus(
                xy=(float(p[0]), float(p[1])),
                label=int(lab),
                outline=None if outline is None else np.asarray(outline, np.float64) * scale,
            )
        )
    rng = np.random.default_rng(cfg.seed + 7919 * group + len(nuclei))
    feats, maps = _decoder_features(model, work)
    pixels, matched = _nucleus_pixels(model, maps, nuclei, shape, cfg, rng)
    rows_of: list[npt.NDArray[np.int64]] = []
    cols_of: list[npt.NDArray[np.int64]] = []
    owner: list[npt.NDArray[np.int64]] = []
    labs: list[int] = []
    good: list[bool] = []
    for k, (nuc, px) in enumerate(zip(nuclei, pixels, strict=True)):
        if px is None or len(px[0]) == 0:
            continue
        idx = len(labs)
        labs.append(nuc.label)
        good.append(matched[k])
        rows_of.append(px[0])
        cols_of.append(px[1])
        owner.append(np.full(len(px[0]), idx, np.int64))
    n_channels = feats.shape[0]
    if not labs:
        return concat_samples([], n_channels * 9)
    rows = np.concatenate(rows_of)
    cols = np.concatenate(cols_of)
    who = np.concatenate(owner)
    out_f, out_n, out_v = [], [], []
    for view in range(cfg.views):
        if view == 0:
            vf = feats
        else:
            vf, _ = _decoder_features(model, _view_image(work, view))
        vr, vc, _ = _transform(rows, cols, shape, view)
        unf = _unfold_at(vf, vr, vc)
        out_f.append(unf.astype(np.float16))
        out_n.append(who)
        out_v.append(np.full(len(who), view, np.int8))
    return TypeSamples(
        features=np.concatenate(out_f),
        nucleus=np.concatenate(out_n),
        view=np.concatenate(out_v),
        labels=np.asarray(labs, np.int64),
        groups=np.full(len(labs), group, np.int64),
        matched=np.asarray(good, bool),
    )


def _unfold_at(
    feats: npt.NDArray[np.float32], rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """(P, C * 9) 3x3 neighbourhoods (zero padding, as the head's convolution) at pixels."""
    c = feats.shape[0]
    padded = np.pad(feats, ((0, 0), (1, 1), (1, 1)))
    out = np.empty((len(rows), c, 3, 3), np.float32)
    for dy in range(3):
        for dx in range(3):
            out[:, :, dy, dx] = padded[:, rows + dy, cols + dx].T
    return out.reshape(len(rows), c * 9)


def _nucleus_pixels(
    model: NucleusModel,
    maps: npt.NDArray[np.float32],
    nuclei: Sequence[_Nucleus],
    shape: tuple[int, int],
    cfg: TypeHeadConfig,
    rng: np.random.Generator,
) -> tuple[list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None], list[bool]]:
    """Sampled pixels (rows, cols) of each nucleus in the working frame, and whether they came
    from an outline or a matched instance."""
    h, w = shape
    point_idx = [i for i, n in enumerate(nuclei) if n.outline is None]
    inst = np.zeros(len(nuclei), np.int64)
    labels = np.zeros(shape, np.int32)
    if point_idx:
        labels = model.postprocess_for(model.mpp)(maps[:N_OUTPUTS])
        pts = np.array([nuclei[i].xy for i in point_idx], np.float64)
        inst[point_idx] = _match_points(labels, pts, cfg.match_um / model.mpp)
    objects = _instance_pixels(labels) if inst.any() else {}
    disc_r = max(1.0, cfg.disc_um / model.mpp)
    out: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None] = []
    matched: list[bool] = []
    for i, nuc in enumerate(nuclei):
        if nuc.outline is not None:
            mask = np.zeros(shape, np.uint8)
            cv2.fillPoly(mask, [np.round(nuc.outline).astype(np.int32)], 1)
            rr, cc = np.nonzero(mask)
            ok = len(rr) > 0
        elif inst[i]:
            rr, cc = objects[int(inst[i])]
            ok = True
        else:
            x, y = nuc.xy
            r = int(np.ceil(disc_r))
            yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
            inside = yy**2 + xx**2 <= disc_r**2
            rr = (np.round(y) + yy[inside]).astype(np.int64)
            cc = (np.round(x) + xx[inside]).astype(np.int64)
            valid = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            rr, cc = rr[valid], cc[valid]
            ok = False
        if len(rr) == 0:
            out.append(None)
            matched.append(False)
            continue
        if len(rr) > cfg.pixels_per_nucleus:
            pick = rng.choice(len(rr), cfg.pixels_per_nucleus, replace=False)
            rr, cc = rr[pick], cc[pick]
        out.append((np.asarray(rr, np.int64), np.asarray(cc, np.int64)))
        matched.append(ok)
    return out, matched


def _instance_pixels(
    labels: npt.NDArray[np.int32],
) -> dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """Instance id -> its pixels (rows, cols)."""
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    ids, starts = np.unique(flat[order], return_index=True)
    ends = np.append(starts[1:], len(flat))
    w = labels.shape[1]
    out = {}
    for i, a, b in zip(ids.tolist(), starts.tolist(), ends.tolist(), strict=True):
        if i == 0:
            continue
        pos = order[a:b]
        out[int(i)] = (pos // w, pos % w)
    return out


class _HeadMLP(nn.Module):
    """The type head on unfolded 3x3 neighbourhoods: Linear (= the 3x3 conv), BN, ReLU, Linear."""

    def __init__(self, in_features: int, width: int, n_types: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, width, bias=False)
        self.norm = nn.BatchNorm1d(width)
        self.out = nn.Linear(width, n_types)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(torch.relu(self.norm(self.hidden(x))))
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeHeadFit:
    """A fitted type head, as the state dict of ``_Heads.types``.

    Attributes
    ----------
    state : dict of str to torch.Tensor
        ``0.weight`` (width, C, 3, 3), ``1.weight/bias/running_mean/running_var/
        num_batches_tracked``, ``3.weight`` (T, width, 1, 1), ``3.bias`` (T,).
    class_weights : ndarray, float64, shape (T,)
        Weight of one nucleus of each class in the loss (mean 1 over the nuclei).
    loss : float
        Mean loss of the last 100 steps.
    """

    state: dict[str, torch.Tensor]
    class_weights: npt.NDArray[np.float64]
    loss: float
    history: list[float] = field(default_factory=list)


def _initial_head(
    mlp: _HeadMLP,
    init: Mapping[str, torch.Tensor] | None,
    copy_rows: Mapping[int, int],
    n_channels: int,
) -> None:
    if not init:
        return
    w0 = init.get("0.weight")
    if w0 is not None and w0.shape == (mlp.hidden.out_features, n_channels, 3, 3):
        mlp.hidden.weight.data.copy_(w0.reshape(mlp.hidden.out_features, -1))
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = init.get(f"1.{name}")
            if src is not None:
                getattr(mlp.norm, name).data.copy_(src)
        w3, b3 = init.get("3.weight"), init.get("3.bias")
        if w3 is not None and b3 is not None:
            for new, old in copy_rows.items():
                mlp.out.weight.data[new] = w3[old].reshape(-1)
                mlp.out.bias.data[new] = b3[old]


def fit_type_head(
    samples: TypeSamples,
    n_types: int,
    *,
    width: int = 32,
    init: Mapping[str, torch.Tensor] | None = None,
    copy_rows: Mapping[int, int] | None = None,
    config: TypeHeadConfig | None = None,
) -> TypeHeadFit:
    """Fit a type head to samples.

    Parameters
    ----------
    samples : TypeSamples
        Training nuclei (every class present).
    n_types : int
        Classes (channels of the head).
    width : int
        Hidden channels (as the base model's head when ``init`` is given).
    init : mapping, optional
        The base model's type head state (``_Heads.types``): the hidden layer and batch norm
        start from it.
    copy_rows : mapping of int to int, optional
        New class -> base type whose output row is copied (the same name in both).
    config : TypeHeadConfig, optional

    Returns
    -------
    TypeHeadFit
    """
    cfg = config or TypeHeadConfig()
    if samples.n_nuclei == 0:
        raise ConfigError("no annotated nuclei to fit the type head on")
    torch.manual_seed(cfg.seed)
    n_feat = samples.features.shape[1]
    n_channels = n_feat // 9
    mlp = _HeadMLP(n_feat, width, n_types)
    _initial_head(mlp, init, copy_rows or {}, n_channels)
    counts = np.bincount(samples.labels, minlength=n_types).astype(np.float64)
    cw = np.where(counts > 0, np.maximum(counts, 1.0) ** -cfg.balance, 0.0)
    cw *= samples.n_nuclei / max(float((cw * counts).sum()), 1e-12)
    # Each nucleus weighs its class weight, shared by its pixels.
    px_per_nucleus = np.bincount(samples.nucleus, minlength=samples.n_nuclei).astype(np.float64)
    px_weight = cw[samples.labels[samples.nucleus]] / px_per_nucleus[samples.nucleus]
    cdf = np.cumsum(px_weight)
    y_all = samples.labels[samples.nucleus]
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    mlp.train()
    history: list[float] = []
    threads = torch.get_num_threads()
    # A step is a few small matrix products: one thread is 10-20x faster than two threads
    # spinning on a busy 2-core machine.
    torch.set_num_threads(1)
    try:
        for _ in range(cfg.steps):
            idx = np.minimum(
                np.searchsorted(cdf, rng.random(cfg.batch_pixels) * cdf[-1]), len(cdf) - 1
            )
            x = torch.from_numpy(samples.features[idx].astype(np.float32))
            loss = F.cross_entropy(mlp(x), torch.from_numpy(y_all[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            history.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    mlp.eval()
    state = {
        "0.weight": mlp.hidden.weight.detach().reshape(width, n_channels, 3, 3).clone(),
        "1.weight": mlp.norm.weight.detach().clone(),
        "1.bias": mlp.norm.bias.detach().clone(),
        "1.running_mean": mlp.norm.running_mean.detach().clone(),  # type: ignore[union-attr]
        "1.running_var": mlp.norm.running_var.detach().clone(),  # type: ignore[union-attr]
        "1.num_batches_tracked": mlp.norm.num_batches_tracked.detach().clone(),  # type: ignore[union-attr]
        "3.weight": mlp.out.weight.detach().reshape(n_types, width, 1, 1).clone(),
        "3.bias": mlp.out.bias.detach().clone(),
    }
    return TypeHeadFit(
        state=state,
        class_weights=cw,
        loss=float(np.mean(history[-100:])),
        history=history[:: max(1, len(history) // 50)],
    )


def predict_sample_types(
    fit: TypeHeadFit, samples: TypeSamples, *, views: int = 1
) -> npt.NDArray[np.float32]:
    """Mean type probability (N, T) of each nucleus over its sampled pixels of the first
    ``views`` views (1: the image as it is, as at inference)."""
    width = fit.state["1.weight"].shape[0]
    n_types = fit.state["3.bias"].shape[0]
    mlp = _HeadMLP(samples.features.shape[1], width, n_types)
    mlp.hidden.weight.data.copy_(fit.state["0.weight"].reshape(width, -1))
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(mlp.norm, name).data.copy_(fit.state[f"1.{name}"])
    mlp.out.weight.data.copy_(fit.state["3.weight"].reshape(n_types, width))
    mlp.out.bias.data.copy_(fit.state["3.bias"])
    mlp.eval()
    sel = samples.view < views
    with torch.inference_mode():
        p = torch.softmax(mlp(torch.from_numpy(samples.features[sel]).float()), dim=1).numpy()
    owner = samples.nucleus[sel]
    total = np.zeros((samples.n_nuclei, n_types), np.float64)
    np.add.at(total, owner, p)
    n = np.bincount(owner, minlength=samples.n_nuclei)[:, None]
    return (total / np.maximum(n, 1)).astype(np.float32)


def build_typed_network(
    base: Mapping[str, torch.Tensor],
    base_config: NetworkConfig,
    type_names: Sequence[str],
    fit: TypeHeadFit,
) -> NucleusNet:
    """The base network with the fitted type head (channels ``type_names``).

    Parameters
    ----------
    base : mapping of str to torch.Tensor
        The base model's state dict (unfolded, as stored); with or without a type head.
    base_config : NetworkConfig
    type_names : sequence of str
    fit : TypeHeadFit

    Returns
    -------
    NucleusNet
        Eval mode, CPU.
    """
    width = int(fit.state["1.weight"].shape[0])
    config = NetworkConfig(
        features=base_config.features,
        norm=base_config.norm,
        type_head_width=width,
        type_names=tuple(type_names),
    )
    net = NucleusNet(config)
    own = net.state_dict()
    state: dict[str, Any] = {}
    for key, value in base.items():
        if key.startswith(_HEAD):
            continue
        target = key
        if not base_config.n_types and key.startswith("unet.final_conv."):
            target = key.replace("unet.final_conv.", "unet.final_conv.seg.", 1)
        state[target] = value
    for key, value in fit.state.items():
        state[_HEAD + key] = value
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"typed network: base weights do not fit (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]})"
        )
    net.load_state_dict(state, strict=True)
    return net.eval()
