"""The nucleus network: a compact MONAI BasicUNet with three output maps.

Output channels (logits, at the model's working µm/px, same height/width as the input):

0. nucleus foreground,
1. nucleus boundary (a one-pixel inner contour of every instance, DCAN-style),
2. normalised distance to the instance border (1 at the instance's deepest point, 0 at its edge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slidestream.errors import ConfigError

__all__ = [
    "N_OUTPUTS",
    "PAD_MULTIPLE",
    "NetworkConfig",
    "NucleusNet",
    "build_network",
    "fold_batchnorm",
]

N_OUTPUTS = 3
"""Foreground, boundary, distance."""

PAD_MULTIPLE = 16
"""Height and width of the network input must be multiples of this (four 2x poolings)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkConfig:
    """Architecture arguments of :class:`NucleusNet` (stored next to the weights).

    Attributes
    ----------
    features : tuple of int
        Six channel widths of MONAI ``BasicUNet`` (four encoder levels, bottleneck, last decoder).
    norm : str
        Normalisation layer name passed to MONAI (``"batch"`` or ``"instance"``).
    """

    features: tuple[int, int, int, int, int, int] = (16, 16, 32, 64, 128, 16)
    norm: str = "batch"

    def __post_init__(self) -> None:
        if len(self.features) != 6 or any(int(f) < 1 for f in self.features):
            raise ConfigError(
                f"network features {self.features!r}: expected six positive channel widths"
            )
        if self.norm not in ("batch", "instance"):
            raise ConfigError(f"network norm {self.norm!r}: expected 'batch' or 'instance'")

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-serialisable arguments."""
        return {"features": list(self.features), "norm": self.norm}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        """Build from :meth:`to_dict` output."""
        feats = tuple(int(f) for f in data["features"])
        if len(feats) != 6:
            raise ConfigError(f"network features {feats!r}: expected six channel widths")
        return cls(
            features=(feats[0], feats[1], feats[2], feats[3], feats[4], feats[5]),
            norm=str(data.get("norm", "batch")),
        )


class NucleusNet(nn.Module):
    """BasicUNet wrapper taking uint8-range RGB and returning three logit maps.

    Parameters
    ----------
    config : NetworkConfig
        Architecture arguments.
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        from monai.networks.nets.basic_unet import BasicUNet

        self.config = config
        self.unet = BasicUNet(
            spatial_dims=2,
            in_channels=3,
            out_channels=N_OUTPUTS,
            features=config.features,
            norm=config.norm,
            act="relu",
        )
        # Inputs are padded to multiples of PAD_MULTIPLE, so the decoder never needs MONAI's
        # replicate-padding of upsampled features; skipping it saves a full copy per level.
        for module in self.unet.modules():
            if hasattr(module, "is_pad"):
                setattr(module, "is_pad", False)  # noqa: B010

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map RGB in [0, 255] (N, 3, H, W), H and W multiples of 16, to logits (N, 3, H, W)."""
        out: torch.Tensor = self.unet(x * (1.0 / 127.5) - 1.0)
        return out


def build_network(config: NetworkConfig) -> NucleusNet:
    """Create an untrained :class:`NucleusNet`."""
    return NucleusNet(config)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that follows a convolution into that convolution, in place.

    MONAI's ``Convolution`` blocks apply ``conv -> adn.N (BatchNorm2d) -> adn.A``; the
    BatchNorm's affine transform is merged into the convolution's weights and bias
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and replaced by an identity, which saves one
    memory-bound pass per layer (1.15-1.5x faster on a 2-core CPU). Only for inference: the
    module must be in eval mode and is not trainable afterwards in the same way.

    Returns
    -------
    int
        Number of folded BatchNorm layers.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if module.training:
        raise ConfigError("fold_batchnorm: call module.eval() first (inference only)")
    return _fold(module, fuse_conv_bn_eval)


def _fold(module: nn.Module, fuse: Any) -> int:
    folded = 0
    for child in module.children():
        conv = getattr(child, "conv", None)
        adn = getattr(child, "adn", None)
        norm = getattr(adn, "N", None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            child.conv = fuse(conv, norm)
            adn.N = nn.Identity().eval()  # type: ignore[union-attr]
            folded += 1
        else:
            folded += _fold(child, fuse)
    return folded
