"""``TissueNet``: a small, fast patch classifier for H&E built from torch/MONAI blocks.

Two branches read the same patch in optical-density (OD) space:

* a fixed (not trained) colour/texture front end: Ruifrok colour deconvolution into
  haematoxylin / eosin / residual concentrations, soft histograms of H and E, and the energy of
  Gaussian-derivative filters over a 5-level image pyramid (scales ``2**level`` px);
* a learned CNN (global average pooling): plain MONAI ``Convolution`` stages of stride 2, or,
  with ``cnn_blocks >= 1``, residual stages of MONAI ``ResidualUnit`` blocks (the first of each
  stage strided); ``fixed_features=False`` keeps the CNN alone.

The concatenated features are standardised (mean / sd of the training features, stored) and
pass through optional dropout and a linear (or one-hidden-layer) head. The fixed front
end makes the model data-efficient (few hundred images); the CNN adds learned morphology.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.convolutions import Convolution, ResidualUnit
from torch import nn

from slidestream.errors import ConfigError

from ._stain_norm import HED_FROM_RGB, od_and_hed

__all__ = ["ARCHITECTURE", "TissueNet", "build_network", "fit_textons"]

ARCHITECTURE = "slidestream-tissuenet"

_OD_MAX = math.log(256.0)
_TEXTON_DIM = 30
_GRANULOMETRY_PX = (3, 5, 7, 11)
_JOINT_BINS = 6
# Local binary patterns: (neighbours P, radius R in px) on the H and E optical densities.
_LBP_SCALES = ((8, 1.0), (8, 2.0), (16, 3.0))


def _lbp_kernels(points: int, radius: float) -> torch.Tensor:
    """``(P, 1, K, K)`` kernels sampling ``P`` neighbours on a circle of ``radius`` px.

    Each kernel holds the bilinear-interpolation weights of one neighbour (angle ``2πk/P``,
    scikit-image's ``local_binary_pattern`` sampling) minus 1 at the centre, so that a
    convolution gives ``neighbour - centre``.
    """
    half = math.ceil(radius)
    size = 2 * half + 1
    kernels = torch.zeros(points, 1, size, size)
    for k in range(points):
        angle = 2.0 * math.pi * k / points
        dy, dx = -radius * math.sin(angle), radius * math.cos(angle)
        dy, dx = round(dy, 5), round(dx, 5)
        y0, x0 = math.floor(dy), math.floor(dx)
        fy, fx = dy - y0, dx - x0
        for yy, xx, w in (
            (y0, x0, (1 - fy) * (1 - fx)),
            (y0, x0 + 1, (1 - fy) * fx),
            (y0 + 1, x0, fy * (1 - fx)),
            (y0 + 1, x0 + 1, fy * fx),
        ):
            if w > 0:
                kernels[k, 0, half + yy, half + xx] += w
        kernels[k, 0, half, half] -= 1.0
    return kernels


def _gaussian_derivative_bank() -> torch.Tensor:
    """Five 3x3 kernels: binomial smooth, d/dx, d/dy, Laplacian, d2/dxdy, shape (5, 1, 3, 3)."""
    b = torch.tensor([1.0, 2.0, 1.0])
    d = torch.tensor([-1.0, 0.0, 1.0])
    smooth = torch.outer(b, b) / 16.0
    dx = torch.outer(b, d) / 8.0
    lap = torch.tensor([[1.0, 2.0, 1.0], [2.0, -12.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
    dxy = torch.outer(d, d) / 4.0
    return torch.stack([smooth, dx, dx.T.contiguous(), lap, dxy]).unsqueeze(1)


class FeatureScaler(nn.Module):
    """``(x - mean) / std`` with stored (not trained) statistics, set by :meth:`fit`."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    @torch.no_grad()
    def fit(self, feats: torch.Tensor) -> None:
        """Set the statistics from training features ``(M, F)``."""
        self.mean.copy_(feats.mean(dim=0))
        self.std.copy_(feats.std(dim=0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise ``(N, F)`` features."""
        return (x - self.mean) / self.std


class TissueNet(nn.Module):
    """Patch classifier: fixed OD colour/texture features + compact CNN + linear head.

    Parameters
    ----------
    num_classes : int
        Output logits.
    cnn_channels : tuple of int
        Widths of the CNN stages (each halves the resolution, except a first stage of
        ``stem_stride`` 1); empty disables the learned branch.
    cnn_blocks : int
        0 (default): each stage is one plain conv-BN-ReLU block. ``n >= 1``: each stage is ``n``
        residual units (two conv-BN-ReLU sub-units and a skip connection; the first unit of a
        stage is strided and has a projection skip).
    stem_stride : int
        Stride of the first CNN stage (2, default, or 1 for full-resolution early features).
    fixed_features : bool
        Use the fixed colour/texture front end (default). ``False``: the CNN alone (needs
        ``cnn_channels``; ``textons``, ``morphology`` and ``lbp`` must be off).
    pyramid_levels : int
        Levels of the texture pyramid (level ``l`` is ``2**l`` times coarser).
    hist_bins : int
        Soft-histogram bins per stain channel.
    textons : int
        Texton dictionary size (0: none); fitted with :func:`fit_textons`.
    morphology : bool
        Add granulometry and joint H-E histogram features.
    lbp : bool
        Add rotation-invariant uniform local-binary-pattern histograms of H and E (radii 1, 2
        and 3 px at the model's µm/px; 76 features).
    hidden : int
        Hidden units of the head (0: linear head).
    dropout : float
        Dropout on the standardised features.

    Notes
    -----
    Input: float ``(N, 3, H, W)`` RGB in [0, 1] (after the spec's ``ToTensor``). Output: logits
    ``(N, num_classes)``. ``H`` and ``W`` should be >= ``2**pyramid_levels``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        cnn_channels: tuple[int, ...] = (16, 32, 64, 64),
        pyramid_levels: int = 5,
        hist_bins: int = 8,
        textons: int = 0,
        morphology: bool = False,
        lbp: bool = False,
        hidden: int = 0,
        dropout: float = 0.0,
        cnn_blocks: int = 0,
        stem_stride: int = 2,
        fixed_features: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"TissueNet needs >= 2 classes, got {num_classes}")
        if cnn_blocks < 0 or stem_stride not in (1, 2):
            raise ConfigError(
                f"need cnn_blocks >= 0, stem_stride 1 or 2; got {cnn_blocks}, {stem_stride}"
            )
        if not fixed_features and (not cnn_channels or textons or morphology or lbp):
            raise ConfigError(
                "fixed_features=False needs cnn_channels and no textons / morphology / lbp"
            )
        self.use_fixed = fixed_features
        self.num_classes = num_classes
        self.pyramid_levels = pyramid_levels
        self.hist_bins = hist_bins
        hed_from_rgb = HED_FROM_RGB.clone()  # Ruifrok & Johnston unit stain vectors, inverted
        self.hed_from_rgb: torch.Tensor
        self.bank: torch.Tensor
        self.hist_centers: torch.Tensor
        self.register_buffer("hed_from_rgb", hed_from_rgb, persistent=False)
        self.register_buffer("bank", _gaussian_derivative_bank(), persistent=False)
        centers = torch.linspace(0.0, 2.0, hist_bins)
        self.register_buffer("hist_centers", centers, persistent=False)
        self.hist_width = float(centers[1] - centers[0]) if hist_bins > 1 else 1.0
        # Texton dictionary (unsupervised k-means over pixel descriptors, see fit_textons);
        # persistent, so it ships in the safetensors file.
        self.textons = textons
        self.morphology = morphology
        self.lbp = lbp
        if lbp:
            for i, (points, radius) in enumerate(_LBP_SCALES):
                kernels = _lbp_kernels(points, radius)
                self.register_buffer(f"lbp_kernel_{i}", kernels, persistent=False)
        self.texton_centers: torch.Tensor
        self.texton_scale: torch.Tensor
        self.register_buffer("texton_centers", torch.zeros(textons, _TEXTON_DIM))
        self.register_buffer("texton_scale", torch.ones(_TEXTON_DIM))
        self.cnn = _cnn(cnn_channels, cnn_blocks, stem_stride)
        self.cnn_features = cnn_channels[-1] if cnn_channels else 0
        n_fixed = self.fixed_feature_count() if fixed_features else 0
        self.norm = FeatureScaler(n_fixed + self.cnn_features)
        self.dropout = nn.Dropout(dropout)
        n_in = n_fixed + self.cnn_features
        self.head: nn.Module = (
            nn.Sequential(
                nn.Linear(n_in, hidden),
                nn.ReLU(),
                nn.Dropout(0.3),
                nn.Linear(hidden, num_classes),
            )
            if hidden
            else nn.Linear(n_in, num_classes)
        )

    def fixed_feature_count(self) -> int:
        """Length of the fixed colour/texture feature vector."""
        colour = 4 * 2 + 2 * self.hist_bins + 3 * 2
        texture = (
            self.pyramid_levels * 3 * (int(self.bank.shape[0]) - 1) * 2 + self.pyramid_levels * 3
        )
        morph = (3 * len(_GRANULOMETRY_PX) * 2 + _JOINT_BINS**2) if self.morphology else 0
        lbp = 2 * sum(p + 2 for p, _ in _LBP_SCALES) if self.lbp else 0
        return colour + texture + self.textons + morph + lbp

    def lbp_features(self, st: torch.Tensor) -> torch.Tensor:
        """Square-rooted histograms of rotation-invariant uniform LBP codes of H and E.

        Per scale ``(P, R)`` of :data:`_LBP_SCALES`: a pixel's bits are ``neighbour >= centre``
        for its ``P`` circle samples; a pattern with at most two 0/1 transitions around the
        circle has code = number of 1 bits (0..P), any other code P + 1 (as scikit-image's
        ``local_binary_pattern(method="uniform")``). Centres are every second pixel of every second
        row; those whose circle leaves the patch are not counted. Returns ``(N, 2 * sum(P + 2))``.
        """
        x = st[:, :2]
        n, c, h, w = x.shape
        flat = x.reshape(n * c, 1, h, w)
        feats = []
        for i, (points, _radius) in enumerate(_LBP_SCALES):
            kernels: torch.Tensor = getattr(self, f"lbp_kernel_{i}")
            # centres on every second row and column (the histogram of a 2x-subsampled grid of
            # centres; neighbours still sampled at full resolution): a quarter of the work
            diff = F.conv2d(flat, kernels, stride=2)  # (N*C, P, h', w'), valid centres only
            bits = diff >= -1e-6
            ones = bits.sum(dim=1, dtype=torch.int64)
            transitions = (bits != bits.roll(1, dims=1)).sum(dim=1, dtype=torch.int64)
            code = torch.where(transitions <= 2, ones, points + 1).flatten(1)  # (N*C, pixels)
            bins = points + 2
            offset = torch.arange(code.shape[0], device=code.device).unsqueeze(1) * bins
            counts = torch.bincount((code + offset).flatten(), minlength=code.shape[0] * bins)
            hist = counts.reshape(n, c * bins).float() / code.shape[1]
            feats.append(hist.sqrt())
        return torch.cat(feats, dim=1)

    def morphology_features(self, st: torch.Tensor) -> torch.Tensor:
        """Granulometry (mean of grey openings / closings of H, E and total OD with square
        elements of 3-11 px) and a soft joint H-E histogram, ``(N, 24 + 36)``."""
        x = st[:, (0, 1, 3)]
        feats = []
        for size in _GRANULOMETRY_PX:
            pad = size // 2
            ero = -F.max_pool2d(-x, size, stride=1, padding=pad)
            opening = F.max_pool2d(ero, size, stride=1, padding=pad)
            dil = F.max_pool2d(x, size, stride=1, padding=pad)
            closing = -F.max_pool2d(-dil, size, stride=1, padding=pad)
            feats += [opening.mean(dim=(2, 3)), closing.mean(dim=(2, 3))]
        coarse = F.avg_pool2d(st[:, :2], 2, ceil_mode=True).flatten(2)  # (N, 2, P)
        centers = torch.linspace(0.0, 1.5, _JOINT_BINS, device=st.device)
        width = float(centers[1] - centers[0])
        wh = torch.relu(1.0 - (coarse[:, 0].unsqueeze(-1) - centers).abs() / width)
        we = torch.relu(1.0 - (coarse[:, 1].unsqueeze(-1) - centers).abs() / width)
        joint = torch.einsum("npi,npj->nij", wh, we) / coarse.shape[2]
        feats.append(joint.flatten(1).sqrt())
        return torch.cat(feats, dim=1)

    def pixel_descriptors(self, st: torch.Tensor) -> torch.Tensor:
        """Per-pixel texton descriptors ``(N, D, H/2, W/2)``: the 5 filters on H, E and total OD
        at 2x and 4x down-sampling (the coarser one up-sampled), divided by ``texton_scale``."""
        x = F.avg_pool2d(st[:, (0, 1, 3)], 2, ceil_mode=True)
        n, c, h, w = x.shape
        k = int(self.bank.shape[0])
        fine = F.conv2d(x.reshape(n * c, 1, h, w), self.bank, padding=1).reshape(n, c * k, h, w)
        y = F.avg_pool2d(x, 2, ceil_mode=True)
        coarse = F.conv2d(y.reshape(n * c, 1, *y.shape[2:]), self.bank, padding=1)
        coarse = F.interpolate(coarse.reshape(n, c * k, *y.shape[2:]), size=(h, w), mode="nearest")
        return torch.cat([fine, coarse], dim=1) / self.texton_scale.view(1, -1, 1, 1)

    def texton_histogram(self, st: torch.Tensor) -> torch.Tensor:
        """Square-rooted frequency of the nearest texton per pixel ``(N, textons)``."""
        d = self.pixel_descriptors(st)
        n = d.shape[0]
        flat = d.flatten(2).transpose(1, 2)  # (N, P, D)
        dist = torch.cdist(flat, self.texton_centers.unsqueeze(0).expand(n, -1, -1))
        nearest = dist.argmin(dim=2)
        counts = F.one_hot(nearest, self.textons).float().mean(dim=1)
        return counts.sqrt()

    def stains(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] ``(N, 3, H, W)`` -> ``(N, 4, H, W)``: H, E, residual, total OD."""
        od, hed = od_and_hed(rgb, self.hed_from_rgb)
        total = od.mean(dim=1, keepdim=True)
        return torch.cat([hed, total], dim=1)

    def fixed_features(self, rgb: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
        """Colour moments, H/E soft histograms and multi-scale Gaussian-derivative energies."""
        feats = [st.mean(dim=(2, 3)), st.std(dim=(2, 3)), rgb.mean(dim=(2, 3)), rgb.std(dim=(2, 3))]
        coarse = F.avg_pool2d(st[:, :2], 2, ceil_mode=True)
        for c in (0, 1):
            x = coarse[:, c].flatten(1).unsqueeze(-1)
            w = torch.relu(1.0 - (x - self.hist_centers).abs() / self.hist_width)
            feats.append(w.mean(dim=1))
        x = st[:, (0, 1, 3)]
        n, c = x.shape[:2]
        k = int(self.bank.shape[0])
        for level in range(self.pyramid_levels):
            if level:
                x = F.avg_pool2d(x, 2, ceil_mode=True)
            resp = F.conv2d(x.reshape(n * c, 1, *x.shape[2:]), self.bank, padding=1)
            resp = resp.reshape(n, c, k, *resp.shape[2:])
            smooth, deriv = resp[:, :, 0], resp[:, :, 1:]
            feats.append(deriv.abs().mean(dim=(3, 4)).flatten(1))
            feats.append(deriv.pow(2).mean(dim=(3, 4)).add(1e-8).sqrt().flatten(1))
            feats.append(smooth.std(dim=(2, 3)))
        if self.textons:
            feats.append(self.texton_histogram(st))
        if self.morphology:
            feats.append(self.morphology_features(st))
        if self.lbp:
            feats.append(self.lbp_features(st))
        return torch.cat(feats, dim=1)

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        """Concatenated fixed + CNN features ``(N, F)`` of RGB in [0, 1]."""
        # The fixed features and the stain transform stay in float32 under autocast (no-op
        # without autocast); only the CNN runs in reduced precision.
        with torch.autocast(device_type=rgb.device.type, enabled=False):
            st = self.stains(rgb.float())
            fixed = self.fixed_features(rgb.float(), st) if self.use_fixed else None
        if self.cnn_features:
            learned = self.cnn(st / 2.0 - 0.25).mean(dim=(2, 3)).float()
            return learned if fixed is None else torch.cat([fixed.float(), learned], dim=1)
        assert fixed is not None
        return fixed.float()

    @torch.no_grad()
    def fit_scaler(self, feats: torch.Tensor) -> None:
        """Set the feature standardisation from training features ``(M, F)``.

        The fixed features get their training mean / sd. The learned CNN features (the last
        ``cnn_features`` columns) keep an identity scaling: they are batch-normalised inside the
        CNN already, and their spread across images at initialisation (the only time this is
        called) is tiny (~1e-4), so dividing by it would multiply them -- and their gradients --
        by ~1e4 once training makes them vary (seen: standardised values near 9,400 and
        probabilities saturated at exactly 0 or 1).
        """
        self.norm.fit(feats)
        if self.cnn_features:
            self.norm.mean[-self.cnn_features :] = 0.0
            self.norm.std[-self.cnn_features :] = 1.0

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of RGB patches in [0, 1] ``(N, 3, H, W)``."""
        out: torch.Tensor = self.head(self.dropout(self.norm(self.features(rgb))))
        return out


def _cnn(channels: tuple[int, ...], blocks: int, stem_stride: int) -> nn.Sequential:
    """The learned branch on the 4 stain channels: plain (``blocks`` 0) or residual stages."""
    layers: list[nn.Module] = []
    in_ch = 4
    for i, ch in enumerate(channels):
        stride = stem_stride if i == 0 else 2
        if not blocks:
            layers.append(
                Convolution(
                    spatial_dims=2,
                    in_channels=in_ch,
                    out_channels=ch,
                    strides=stride,
                    kernel_size=3,
                    act="RELU",
                    norm="BATCH",
                )
            )
        for b in range(blocks):
            layers.append(
                ResidualUnit(
                    spatial_dims=2,
                    in_channels=in_ch if b == 0 else ch,
                    out_channels=ch,
                    strides=stride if b == 0 else 1,
                    kernel_size=3,
                    subunits=2,
                    act="RELU",
                    norm="BATCH",
                )
            )
        in_ch = ch
    return nn.Sequential(*layers)


def build_network(architecture: str, num_classes: int, arch_args: dict[str, Any]) -> nn.Module:
    """Instantiate our network from a spec's ``architecture`` and ``slidestream.arch_args``.

    ``slidestream-tissuenet`` gives a :class:`TissueNet` (an ensemble of them is built by
    ``_ensemble.build_ensemble``; ``_runner`` dispatches on the architecture).

    Raises
    ------
    ConfigError
        Unknown architecture or bad arguments.
    """
    if architecture != ARCHITECTURE:
        raise ConfigError(
            f"architecture {architecture!r} is not a slidestream network (expected "
            f"{ARCHITECTURE!r}); a WSInfer model folder needs model.pt / torchscript_model.pt"
        )
    args = dict(arch_args)
    if "cnn_channels" in args:
        args["cnn_channels"] = tuple(int(c) for c in args["cnn_channels"])
    try:
        return TissueNet(num_classes=num_classes, **args)
    except TypeError as exc:
        raise ConfigError(f"bad arch_args {arch_args!r} for {architecture}: {exc}") from exc


@torch.no_grad()
def fit_textons(
    net: TissueNet,
    patches: torch.Tensor,
    *,
    seed: int,
    iterations: int = 20,
    max_pixels: int = 60000,
) -> None:
    """Fit ``net``'s texton dictionary by k-means on pixel descriptors of RGB patches in [0, 1].

    Unsupervised (labels unused). Sets ``texton_scale`` (per-dimension RMS) and
    ``texton_centers`` in place.
    """
    if not net.textons:
        return
    gen = torch.Generator().manual_seed(seed)
    net.texton_scale.fill_(1.0)
    d = net.pixel_descriptors(net.stains(patches)).permute(0, 2, 3, 1).reshape(-1, _TEXTON_DIM)
    d = d[torch.randperm(d.shape[0], generator=gen)[:max_pixels]]
    scale = d.pow(2).mean(dim=0).sqrt().clamp_min(1e-6)
    d = d / scale
    centers = d[torch.randperm(d.shape[0], generator=gen)[: net.textons]].clone()
    for _ in range(iterations):
        assign = torch.cdist(d, centers).argmin(dim=1)
        for j in range(net.textons):
            members = d[assign == j]
            if len(members):
                centers[j] = members.mean(dim=0)
            else:
                centers[j] = d[torch.randint(0, d.shape[0], (1,), generator=gen)].squeeze(0)
    net.texton_scale.copy_(scale)
    net.texton_centers.copy_(centers)
