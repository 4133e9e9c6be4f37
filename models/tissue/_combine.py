"""Combining trained tissue models into one ensemble model folder (``models ensemble``).

Imports downwards only: ``_network`` <- ``_ensemble`` <- ``_runner`` <- this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from slidestream.errors import ConfigError

from ._ensemble import ENSEMBLE_ARCHITECTURE, TissueEnsemble, downsample_factor
from ._network import ARCHITECTURE, TissueNet
from ._runner import load_model_dir, save_model
from ._spec import ModelSpec, read_spec

__all__ = ["combine_models"]


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
    factors = [downsample_factor(base, s, str(d)) for d, s in zip(model_dirs, specs, strict=True)]
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
