"""Named nucleus models: the shipped presets, weights files on disk and the classical baseline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slidestream.errors import ConfigError, WeightsError
from slidestream.models.nuclei._classical import ClassicalSegmenter
from slidestream.models.nuclei._model import NucleusModel, Precision
from slidestream.models.nuclei._network import NetworkConfig
from slidestream.models.nuclei._postprocess import PostprocessConfig
from slidestream.models.nuclei._weights import WEIGHTS_DIR, load_network, read_sidecar

__all__ = [
    "SHIPPED_WEIGHTS",
    "ResolvedWeights",
    "list_nuclei_models",
    "load_nuclei_model",
    "load_resolved_weights",
    "resolve_nuclei_weights",
]

SHIPPED_WEIGHTS = WEIGHTS_DIR / "nuclei-unet.safetensors"
"""The shipped nucleus U-Net (sidecar ``nuclei-unet.json``, card ``nuclei-unet.md``)."""

_PREFIX = "nuclei-unet-"


def _preset(side: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    presets = side.get("presets", {})
    if name == "default":
        name = str(side.get("default", "default"))
    if name not in presets:
        raise ConfigError(
            f"{path.with_suffix('.json')}: no preset {name!r}; choose one of {sorted(presets)}"
        )
    preset = dict(presets[name])
    preset["preset"] = name
    return preset


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedWeights:
    """Where a nucleus model's weights are and how they are used.

    Attributes
    ----------
    sidecar : Path
        The ``.json`` sidecar the preset comes from.
    weights : Path
        The ``.safetensors`` file (a preset may use other weights than its sidecar's own).
    architecture : NetworkConfig
    mpp : float
        Working µm/px of the preset.
    postprocess : PostprocessConfig
        The preset's thresholds.
    tta : bool
        The preset's test-time augmentation.
    preset : dict
        The preset as the sidecar gives it (``mpp``, ``tta``, ``postprocess``, ``summary``, and
        ``preset``: its name), for writing a derived model's sidecar.
    name : str
        The model's name (``nuclei-unet-fast``, a file stem, or the sidecar's ``name``).
    type_colors : dict of str to (int, int, int)
        Display colours the sidecar gives some type names.
    """

    sidecar: Path
    weights: Path
    architecture: NetworkConfig
    mpp: float
    postprocess: PostprocessConfig
    tta: bool
    preset: dict[str, Any]
    name: str
    type_colors: dict[str, tuple[int, int, int]]


def resolve_nuclei_weights(name_or_path: str | Path = "default") -> ResolvedWeights:
    """Find the weights, architecture and preset of a nucleus model (no weights are read).

    Parameters
    ----------
    name_or_path : str or Path
        As :func:`load_nuclei_model` (not ``"classical"``).

    Raises
    ------
    ConfigError
        Unknown name or preset.
    WeightsError
        Missing or invalid sidecar.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.is_dir():
        path = _weights_in(path)
    if path.suffix in (".safetensors", ".json"):
        preset_name = "default"
    else:
        preset_name = text.removeprefix(_PREFIX)
        if preset_name not in ("default", "fast", "accurate"):
            raise ConfigError(
                f"unknown nucleus model {text!r}; use default, nuclei-unet-fast, "
                "nuclei-unet-accurate, classical, a .safetensors path or a model folder"
            )
        path = SHIPPED_WEIGHTS
    side = read_sidecar(path)
    preset = _preset(side, preset_name, path)
    weights_name = preset.get("weights", side.get("weights", path.with_suffix(".safetensors").name))
    weights = path.with_name(str(weights_name))
    try:
        arch = NetworkConfig.from_dict(preset.get("architecture", side["architecture"]))
        postprocess = PostprocessConfig(**preset.get("postprocess", {}))
        mpp = float(preset["mpp"])
        colors = {
            str(k): (int(v[0]), int(v[1]), int(v[2]))
            for k, v in side.get("type_colors", {}).items()
        }
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise WeightsError(
            f"{path.with_suffix('.json')}: invalid weights config ({exc}); "
            "restore it or retrain with `slidestream train nuclei`"
        ) from exc
    name = f"{path.stem}-{preset['preset']}" if preset["preset"] != "default" else weights.stem
    return ResolvedWeights(
        sidecar=path.with_suffix(".json"),
        weights=weights,
        architecture=arch,
        mpp=mpp,
        postprocess=postprocess,
        tta=bool(preset.get("tta", False)),
        preset=preset,
        name=str(side.get("name", name)),
        type_colors=colors,
    )


def load_resolved_weights(
    found: ResolvedWeights, device: str | torch.device, precision: Precision = "auto"
) -> NucleusModel:
    """Load the model :func:`resolve_nuclei_weights` found."""
    net, sha = load_network(found.weights, found.architecture)
    return NucleusModel(
        net,
        name=found.name,
        mpp=found.mpp,
        weights_sha256=sha,
        postprocess_config=found.postprocess,
        device=device,
        precision=precision,
        tta=found.tta,
        type_colors=found.type_colors,
    )


def load_nuclei_model(
    name_or_path: str | Path = "default",
    device: str | torch.device = "cpu",
    *,
    precision: Precision = "auto",
) -> NucleusModel | ClassicalSegmenter:
    """Load a nucleus segmenter by registry name or weights path.

    Parameters
    ----------
    name_or_path : str or Path
        ``"default"`` (the preset the whole-slide analysis uses), ``"nuclei-unet-fast"`` /
        ``"fast"``, ``"nuclei-unet-accurate"`` / ``"accurate"``, ``"classical"``, or a path to
        a ``.safetensors`` file with its ``.json`` sidecar (its default preset).
    device : str or torch.device
        ``"cpu"`` or ``"cuda[:i]"``.
    precision : {"auto", "fp32", "bf16", "fp16"}
        Autocast precision (see :class:`NucleusModel`).

    Returns
    -------
    NucleusModel or ClassicalSegmenter

    Raises
    ------
    ConfigError
        Unknown name.
    WeightsError
        Missing, corrupt or mismatched weights file.
    """
    if str(name_or_path) == "classical":
        return ClassicalSegmenter()
    return load_resolved_weights(resolve_nuclei_weights(name_or_path), device, precision)


def _weights_in(folder: Path) -> Path:
    """The one ``.safetensors`` file of a model folder."""
    found = sorted(folder.glob("*.safetensors"))
    if len(found) != 1:
        raise WeightsError(
            f"{folder}: expected one .safetensors nucleus weights file with its .json sidecar, "
            f"found {len(found)}; pass the .safetensors path"
        )
    return found[0]


def list_nuclei_models() -> list[dict[str, Any]]:
    """Describe the available nucleus models (for ``slidestream models list``).

    Returns
    -------
    list of dict
        One dict per model with ``name``, ``mpp`` (working µm/px), ``default`` (bool),
        ``summary`` (one line) and ``card`` (path of the model card or ``""``).
    """
    rows: list[dict[str, Any]] = []
    try:
        side = read_sidecar(SHIPPED_WEIGHTS)
    except WeightsError:
        side = {}
    default = str(side.get("default", ""))
    card = SHIPPED_WEIGHTS.with_suffix(".md")
    for name, preset in side.get("presets", {}).items():
        rows.append(
            {
                "name": _PREFIX + name,
                "mpp": float(preset["mpp"]),
                "default": name == default,
                "summary": str(preset.get("summary", "")),
                "card": str(card) if card.is_file() else "",
            }
        )
    rows.append(
        {
            "name": "classical",
            "mpp": ClassicalSegmenter().mpp,
            "default": not rows,
            "summary": "colour deconvolution + Otsu + distance watershed (no weights)",
            "card": str(card) if card.is_file() else "",
        }
    )
    return rows
