"""Batch augmentation of training crops on the training device (CPU or CUDA), in torch.

All training images are uploaded once as one uint8 tensor ``(N, 3, H, W)`` (smaller images are
zero-padded; their valid size is kept). Each batch is then drawn without leaving the device:

* one ``affine_grid`` / ``grid_sample`` warp per crop: a random crop at the model µm/px with
  scale jitter (clipped to the image, as :func:`sample_patch`), a small rotation, and a random
  dihedral symmetry (rot90 x flip), all folded into one 2x3 matrix;
* H&E stain jitter in optical-density space (Ruifrok vectors, per-stain scale and shift);
* brightness and contrast;
* a random Gaussian blur (separable, per-crop sigma).

The random parameters are drawn on the CPU from a seeded :class:`torch.Generator` (a few
numbers per crop), so a seed gives the same parameters on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from slidestream.errors import ConfigError

from . import _data

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "DeviceImages",
    "apply_augment",
    "augment_batch",
    "draw_params",
    "upload_images",
]

# The stain matrices of the CPU augmentation (augment_patch): unit-length Ruifrok vectors, float64.
_RGB_FROM_HED = torch.from_numpy(_data._RGB_FROM_HED)
_HED_FROM_RGB = torch.from_numpy(_data._HED_FROM_RGB)
_BLUR_RADIUS_PX = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class AugmentConfig:
    """Ranges of the device-side augmentation.

    Attributes
    ----------
    patch_px : int
        Output side, px.
    scale_jitter : float
        Zoom factor drawn from ``[1 - j, 1 + j]`` around the image-to-model scale.
    rotation_deg : float
        Small rotation drawn from ``[-r, r]`` degrees (on top of the dihedral symmetry).
    stain_scale, stain_shift : float
        Per-stain OD factor in ``[1 - s, 1 + s]`` and shift in ``[-t, t]`` (H, E, residual).
    brightness, contrast : float
        Factors in ``[1 - b, 1 + b]`` and ``[1 - c, 1 + c]``.
    blur_p : float
        Probability of a Gaussian blur with sigma in ``blur_sigma``.
    blur_sigma : tuple of float
    """

    patch_px: int
    scale_jitter: float = 0.1
    rotation_deg: float = 10.0
    stain_scale: float = _data.STAIN_SCALE
    stain_shift: float = _data.STAIN_SHIFT
    brightness: float = _data.BRIGHTNESS
    contrast: float = 0.1
    blur_p: float = _data.BLUR_P
    blur_sigma: tuple[float, float] = _data.BLUR_SIGMA

    def __post_init__(self) -> None:
        if self.patch_px < 8:
            raise ConfigError(f"patch_px must be >= 8, got {self.patch_px}")
        if not 0 <= self.scale_jitter < 1:
            raise ConfigError(f"scale_jitter must be in [0, 1), got {self.scale_jitter}")
        if not 0 <= self.blur_p <= 1:
            raise ConfigError(f"blur_p must be in [0, 1], got {self.blur_p}")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceImages:
    """Training images resident on one device.

    Attributes
    ----------
    pixels : torch.Tensor
        uint8 ``(N, 3, H, W)``, zero-padded to the largest image.
    sizes : torch.Tensor
        float32 ``(N, 2)`` valid ``(height, width)`` px of each image (CPU).
    scales : torch.Tensor
        float32 ``(N,)`` model px per image px (image µm/px / model µm/px) (CPU).
    """

    pixels: torch.Tensor
    sizes: torch.Tensor
    scales: torch.Tensor

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


def upload_images(
    images: Sequence[npt.NDArray[np.uint8]],
    scales: Sequence[float],
    device: torch.device | str,
) -> DeviceImages:
    """Copy ``(H, W, 3)`` uint8 RGB images to ``device`` once, as :class:`DeviceImages`.

    Parameters
    ----------
    images : sequence of ndarray
    scales : sequence of float
        Model px per image px of each image.
    device : torch.device or str
    """
    if not images or len(images) != len(scales):
        raise ConfigError("upload_images needs as many scales as images (>= 1)")
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    buf = np.zeros((len(images), 3, h, w), dtype=np.uint8)
    for i, im in enumerate(images):
        buf[i, :, : im.shape[0], : im.shape[1]] = im.transpose(2, 0, 1)
    sizes = torch.tensor([[im.shape[0], im.shape[1]] for im in images], dtype=torch.float32)
    return DeviceImages(
        pixels=torch.from_numpy(buf).to(device),
        sizes=sizes,
        scales=torch.tensor(list(scales), dtype=torch.float32),
    )


def _uniform(n: int, half: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` draws from ``[-half, half]`` (float32, CPU)."""
    return (torch.rand(n, generator=gen) * 2.0 - 1.0) * half


def _affine(
    data: DeviceImages, idx: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> torch.Tensor:
    """``(B, 2, 3)`` ``affine_grid`` matrices (output -> padded-input normalised coordinates)."""
    n = int(idx.shape[0])
    hw = data.sizes[idx]  # (B, 2) valid size
    full = torch.tensor(data.pixels.shape[2:], dtype=torch.float32)  # padded (H, W)
    zoom = data.scales[idx] * (1.0 + _uniform(n, cfg.scale_jitter, gen))
    side = cfg.patch_px / zoom  # crop side in image px
    crop = torch.minimum(side.unsqueeze(1), hw)  # (B, 2) crop (h, w), clipped to the image
    free = hw - crop
    centre = torch.rand(n, 2, generator=gen) * free + crop / 2.0  # (B, 2) (y, x) px
    angle = torch.deg2rad(_uniform(n, cfg.rotation_deg, gen))
    angle = angle + torch.randint(0, 4, (n,), generator=gen).float() * (math.pi / 2.0)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output normalised (u, v) -> crop half-extent in px -> rotate -> padded normalised coords.
    sx = crop[:, 1] / full[1] * flip  # half crop width over half padded width
    sy = crop[:, 0] / full[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * sx
    theta[:, 0, 1] = -sin * sy * full[0] / full[1]
    theta[:, 1, 0] = sin * sx * full[1] / full[0]
    theta[:, 1, 1] = cos * sy
    theta[:, 0, 2] = centre[:, 1] / full[1] * 2.0 - 1.0
    theta[:, 1, 2] = centre[:, 0] / full[0] * 2.0 - 1.0
    return theta


@dataclass(frozen=True, slots=True, kw_only=True)
class AugmentParams:
    """The random draws of a run of crops (one row per crop), on one device.

    Drawn on the CPU by :func:`draw_params`; moved to the training device once (for a whole
    training run), so that no step needs a host-to-device copy.

    Attributes
    ----------
    idx : torch.Tensor
        int64 ``(B,)`` image indices.
    theta : torch.Tensor
        ``(B, 2, 3)`` ``affine_grid`` matrices.
    alpha, beta : torch.Tensor
        ``(B, 3)`` per-stain (H, E, residual) OD scale and shift.
    bright, contrast : torch.Tensor
        ``(B,)`` brightness and contrast factors.
    blur : torch.Tensor
        ``(B, 2 r + 1)`` normalised 1-D Gaussian kernels (a unit impulse: no blur).
    """

    idx: torch.Tensor
    theta: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    bright: torch.Tensor
    contrast: torch.Tensor
    blur: torch.Tensor

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AugmentParams:
        return AugmentParams(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str) -> AugmentParams:
        """The same draws on ``device``."""
        return self._map(lambda t: t.to(device))

    def rows(self, start: int, stop: int) -> AugmentParams:
        """Crops ``start:stop`` (views, no copy)."""
        return self._map(lambda t: t[start:stop])


def draw_params(
    data: DeviceImages, idx: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> AugmentParams:
    """Random augmentation parameters of crops of the images ``idx``, on the CPU.

    Parameters
    ----------
    data : DeviceImages
    idx : torch.Tensor
        int64 ``(B,)`` image indices.
    cfg : AugmentConfig
    gen : torch.Generator
        A CPU generator (the same seed gives the same crops on every device).
    """
    idx = idx.detach().cpu().long()
    n = int(idx.shape[0])
    theta = _affine(data, idx, cfg, gen)
    alpha = 1.0 + _uniform(3 * n, cfg.stain_scale, gen).view(n, 3)
    beta = _uniform(3 * n, cfg.stain_shift, gen).view(n, 3)
    bright = 1.0 + _uniform(n, cfg.brightness, gen)
    contrast = 1.0 + _uniform(n, cfg.contrast, gen)
    on = torch.rand(n, generator=gen) < cfg.blur_p
    lo, hi = cfg.blur_sigma
    sigma = lo + torch.rand(n, generator=gen) * (hi - lo)
    r = torch.arange(-_BLUR_RADIUS_PX, _BLUR_RADIUS_PX + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (r.unsqueeze(0) / sigma.unsqueeze(1)) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    delta = (r == 0).float().expand(n, -1)
    blur = torch.where(on.unsqueeze(1), k, delta)
    return AugmentParams(
        idx=idx, theta=theta, alpha=alpha, beta=beta, bright=bright, contrast=contrast, blur=blur
    )


def _stain_jitter(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Per-crop HED scale/shift in OD space, then brightness and contrast; RGB in [0, 1]."""
    n, dev = x.shape[0], x.device
    hed_from_rgb = _HED_FROM_RGB.to(dev, torch.float32)
    rgb_from_hed = _RGB_FROM_HED.to(dev, torch.float32)
    od = -torch.log((x * 255.0 + 1.0) / 256.0)
    hed = torch.einsum("nchw,cd->ndhw", od, hed_from_rgb)
    hed = hed * p.alpha.view(n, 3, 1, 1) + p.beta.view(n, 3, 1, 1)
    od = torch.einsum("ndhw,dc->nchw", hed, rgb_from_hed).clamp_min(0.0)
    rgb = (256.0 * torch.exp(-od) - 1.0) / 255.0 * p.bright.view(n, 1, 1, 1)
    mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
    return ((rgb - mean) * p.contrast.view(n, 1, 1, 1) + mean).clamp(0.0, 1.0)


def _blur(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Separable Gaussian blur with each crop's kernel (an impulse leaves a crop unchanged)."""
    n, c, h, w = x.shape
    kk = p.blur.repeat_interleave(c, dim=0)  # (B*C, K)
    size = kk.shape[1]
    y = F.pad(x.reshape(1, n * c, h, w), (_BLUR_RADIUS_PX,) * 4, mode="reflect")
    y = F.conv2d(y, kk.view(n * c, 1, 1, size), groups=n * c)
    y = F.conv2d(y, kk.view(n * c, 1, size, 1), groups=n * c)
    return y.reshape(n, c, h, w)


def apply_augment(
    data: DeviceImages, params: AugmentParams, patch_px: int, *, colour: bool = True
) -> torch.Tensor:
    """Crops described by ``params`` (on ``data``'s device): float32 ``(B, 3, P, P)`` in [0, 1].

    No host synchronisation: safe to queue ahead of the GPU.
    """
    src = data.pixels[params.idx].float() / 255.0
    grid = F.affine_grid(params.theta, [len(params), 3, patch_px, patch_px], align_corners=False)
    x = F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if colour:
        x = _blur(_stain_jitter(x, params), params)
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def augment_batch(
    data: DeviceImages,
    idx: torch.Tensor,
    cfg: AugmentConfig,
    gen: torch.Generator,
    *,
    colour: bool = True,
) -> torch.Tensor:
    """Augmented crops of the images ``idx``: float32 ``(B, 3, P, P)`` RGB in [0, 1].

    Parameters
    ----------
    data : DeviceImages
    idx : torch.Tensor
        int64 ``(B,)`` image indices (any device).
    cfg : AugmentConfig
    gen : torch.Generator
        A CPU generator; the same seed gives the same crops on every device.
    colour : bool
        Apply the stain / brightness / contrast / blur jitter (``False``: geometry only).

    Returns
    -------
    torch.Tensor
        On the device of ``data.pixels``, quantised to multiples of 1/255 like a uint8 image.
    """
    params = draw_params(data, idx, cfg, gen).to(data.pixels.device)
    return apply_augment(data, params, cfg.patch_px, colour=colour)
