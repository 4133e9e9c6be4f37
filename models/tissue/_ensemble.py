"""Ensembles of our tissue networks: one model folder whose probabilities are a weighted average.

Members are :class:`TissueNet` s trained on their own (e.g. the fixed colour/texture front end at
0.75 µm/px and a learned CNN at 1.5 µm/px). The ensemble works at the finest member's resolution
and patch size; a member trained at ``d`` times that µm/px reads the patch average-pooled by
``d`` (an integer), which is what its own resize to ``patch / d`` px would give it. The output is
``log(sum_i w_i softmax(member_i))``, so the runner's softmax returns the weighted mean of the
members' probabilities.

Written by :func:`combine_models` (``slidestream models ensemble``) as ``config.json`` with
architecture :data:`ENSEMBLE_ARCHITECTURE` and ``weights.safetensors`` holding every member's
tensors under ``members.<i>.``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slidestream.errors import ConfigError

from ._network import ARCHITECTURE, TissueNet, build_network
from ._spec import ModelSpec

__all__ = ["ENSEMBLE_ARCHITECTURE", "TissueEnsemble", "build_ensemble", "downsample_factor"]

ENSEMBLE_ARCHITECTURE = "slidestream-tissuenet-ensemble"


class TissueEnsemble(nn.Module):
    """Weighted average of member networks' class probabilities.

    Parameters
    ----------
    members : sequence of TissueNet
    weights : sequence of float
        Positive; normalised to sum 1.
    downsample : sequence of int
        Per member, the average-pooling factor applied to the input patch (1: none).

    Notes
    -----
    Input: float ``(N, 3, H, W)`` RGB in [0, 1] at the ensemble's µm/px, ``H`` and ``W``
    divisible by every ``downsample``. Output: ``(N, K)`` log-probabilities (valid logits).
    """

    def __init__(
        self,
        members: Sequence[TissueNet],
        weights: Sequence[float],
        downsample: Sequence[int],
    ) -> None:
        super().__init__()
        if not members or not len(members) == len(weights) == len(downsample):
            raise ConfigError("an ensemble needs >= 1 member, one weight and factor per member")
        if any(not w > 0 for w in weights) or any(d < 1 for d in downsample):
            raise ConfigError(f"need weights > 0 and downsample >= 1; got {weights}, {downsample}")
        if len({m.num_classes for m in members}) != 1:
            raise ConfigError("ensemble members must have the same number of classes")
        self.members = nn.ModuleList(members)
        total = float(sum(weights))
        self.weights = tuple(float(w) / total for w in weights)
        self.downsample = tuple(int(d) for d in downsample)
        self.num_classes = members[0].num_classes

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """Log of the weighted mean probability ``(N, K)`` of RGB patches ``(N, 3, H, W)``."""
        total: torch.Tensor | None = None
        for member, w, d in zip(self.members, self.weights, self.downsample, strict=True):
            x = F.avg_pool2d(rgb, d) if d > 1 else rgb
            p = torch.softmax(member(x).float(), dim=1) * w
            total = p if total is None else total + p
        assert total is not None
        return torch.log(total.clamp_min(1e-12))


def build_ensemble(num_classes: int, arch_args: Mapping[str, Any]) -> TissueEnsemble:
    """Instantiate an ensemble from its spec's ``slidestream.arch_args``.

    ``arch_args = {"members": [{"architecture", "arch_args", "weight", "downsample"}, ...]}``.

    Raises
    ------
    ConfigError
        Missing or bad member entries.
    """
    entries = arch_args.get("members")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{ENSEMBLE_ARCHITECTURE} needs arch_args.members (a non-empty list)")
    nets, weights, factors = [], [], []
    for i, entry in enumerate(entries):
        try:
            arch = str(entry.get("architecture", ARCHITECTURE))
            if arch != ARCHITECTURE:
                raise ConfigError(f"member {i}: architecture {arch!r} cannot be an ensemble member")
            net = build_network(arch, num_classes, dict(entry.get("arch_args", {})))
            assert isinstance(net, TissueNet)
            nets.append(net)
            weights.append(float(entry["weight"]))
            factors.append(int(entry.get("downsample", 1)))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"ensemble member {i}: bad entry {entry!r} ({exc})") from exc
    return TissueEnsemble(nets, weights, factors)


def downsample_factor(base: ModelSpec, member: ModelSpec, where: str) -> int:
    ratio = member.spacing_um_px / base.spacing_um_px
    factor = round(ratio)
    if factor < 1 or not math.isclose(ratio, factor, rel_tol=1e-3):
        raise ConfigError(
            f"{where}: {member.spacing_um_px} µm/px is not an integer multiple of the finest "
            f"member's {base.spacing_um_px} µm/px; retrain it at a multiple"
        )
    if member.patch_size_pixels * factor != base.patch_size_pixels:
        raise ConfigError(
            f"{where}: patch {member.patch_size_pixels} px at {member.spacing_um_px} µm/px does "
            f"not cover the finest member's {base.patch_size_pixels} px at "
            f"{base.spacing_um_px} µm/px; retrain it with --patch-size-px "
            f"{base.patch_size_pixels // factor}"
        )
    return factor
