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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slidestream.errors import ConfigError

from ._network import ARCHITECTURE, TissueNet, build_network
from ._spec import ModelSpec, read_spec

__all__ = ["ENSEMBLE_ARCHITECTURE", "TissueEnsemble", "build_ensemble", "combine_models"]

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


def _downsample_factor(base: ModelSpec, member: ModelSpec, where: str) -> int:
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


def combine_models(
    model_dirs: Sequence[str | Path],
    weights: Sequence[float],
    out_dir: str | Path,
    *,
    name: str | None = None,
    display_name: str | None = None,
) -> ModelSpec:
    """Write one model folder that averages the probabilities of our trained model folders.

    Parameters
    ----------
    model_dirs : sequence of str or Path
        Folders written by ``slidestream train tissue`` (architecture ``slidestream-tissuenet``),
        with identical class names. Their µm/px must be integer multiples of the finest one,
        and each patch must cover the same field of view (µm).
    weights : sequence of float
        One positive weight per folder (normalised to sum 1).
    out_dir : str or Path
        Folder to create / overwrite (``config.json`` + ``weights.safetensors``).
    name, display_name : str, optional

    Returns
    -------
    ModelSpec
        The written spec. Class colours, TTA and default input µm/px come from the finest
        member.

    Raises
    ------
    ConfigError
        Mismatched classes, resolutions or fields of view; not our architecture.
    WeightsError
        A member's weights are missing, corrupt or do not fit its config.
    """
    from ._runner import load_model_dir, save_model

    if len(model_dirs) < 2 or len(model_dirs) != len(weights):
        raise ConfigError("give >= 2 model folders and one weight per folder")
    specs = [read_spec(d) for d in model_dirs]
    for d, s in zip(model_dirs, specs, strict=True):
        if s.architecture != ARCHITECTURE:
            raise ConfigError(
                f"{d}: architecture {s.architecture!r} is not {ARCHITECTURE!r}; only models "
                "trained by slidestream can be combined"
            )
        if s.class_names != specs[0].class_names:
            raise ConfigError(
                f"{d}: classes {list(s.class_names)} differ from {list(specs[0].class_names)}"
            )
        # the ensemble normalises its input once, so every member must expect the same
        if s.slidestream.get("stain_norm") != specs[0].slidestream.get("stain_norm"):
            raise ConfigError(
                f"{d}: stain normalisation {s.slidestream.get('stain_norm')!r} differs from "
                f"{specs[0].slidestream.get('stain_norm')!r} of {model_dirs[0]}; combine models "
                "trained with the same --stain-norm setting on the same data"
            )
    base = min(specs, key=lambda s: s.spacing_um_px)
    factors = [_downsample_factor(base, s, str(d)) for d, s in zip(model_dirs, specs, strict=True)]
    nets = []
    for d in model_dirs:
        # loading checks the member's sha256 and that its weights fit its arch_args
        net = load_model_dir(d, allow_torchscript=False).module
        assert isinstance(net, TissueNet)
        nets.append(net)
    members = [
        {
            "architecture": s.architecture,
            "arch_args": s.slidestream.get("arch_args", {}),
            "weight": float(w),
            "downsample": f,
            "source": {
                "name": s.name or Path(d).name,
                "spacing_um_px": s.spacing_um_px,
                "patch_size_pixels": s.patch_size_pixels,
                "weights_sha256": s.slidestream.get("weights_sha256"),
            },
        }
        for d, s, w, f in zip(model_dirs, specs, weights, factors, strict=True)
    ]
    block = {
        key: value
        for key, value in base.slidestream.items()
        if key not in ("arch_args", "weights_sha256")
    }
    block["arch_args"] = {"members": members}
    spec = base.replace(
        architecture=ENSEMBLE_ARCHITECTURE,
        name=name or base.name,
        display_name=display_name or base.display_name,
        slidestream=block,
    )
    return save_model(TissueEnsemble(nets, weights, factors), spec, Path(out_dir))
