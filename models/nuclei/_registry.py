"""Named nucleus models: the shipped presets, weights files on disk and the classical baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slidestream.errors import ConfigError, WeightsError
from slidestream.models.nuclei._classical import ClassicalSegmenter
from slidestream.models.nuclei._model import NucleusModel, Precision
from slidestream.models.nuclei._network import NetworkConfig
from slidestream.models.nuclei._postprocess import PostprocessConfig
from slidestream.models.nuclei._weights import WEIGHTS_DIR, load_network, read_sidecar

__all__ = ["SHIPPED_WEIGHTS", "list_nuclei_models", "load_nuclei_model"]

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


def _from_file(
    path: Path, preset_name: str, device: str | torch.device, precision: Precision
) -> NucleusModel:
    side = read_sidecar(path)
    preset = _preset(side, preset_name, path)
    # A preset may use other weights (and their architecture) than the file's own.
    weights_name = preset.get("weights", side.get("weights", path.with_suffix(".safetensors").name))
    weights = path.with_name(str(weights_name))
    try:
        arch = NetworkConfig.from_dict(preset.get("architecture", side["architecture"]))
        pp = PostprocessConfig(**preset.get("postprocess", {}))
        mpp = float(preset["mpp"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(
            f"{path.with_suffix('.json')}: invalid weights config ({exc}); "
            "restore it or retrain with `slidestream train nuclei`"
        ) from exc
    net, sha = load_network(weights, arch)
    name = f"{path.stem}-{preset['preset']}" if preset["preset"] != "default" else weights.stem
    return NucleusModel(
        net,
        name=name,
        mpp=mpp,
        weights_sha256=sha,
        postprocess_config=pp,
        device=device,
        precision=precision,
        tta=bool(preset.get("tta", False)),
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
    text = str(name_or_path)
    if text == "classical":
        return ClassicalSegmenter()
    path = Path(text)
    if path.suffix in (".safetensors", ".json"):
        return _from_file(path, "default", device, precision)
    preset = text.removeprefix(_PREFIX)
    if preset in ("default", "fast", "accurate"):
        return _from_file(SHIPPED_WEIGHTS, preset, device, precision)
    raise ConfigError(
        f"unknown nucleus model {text!r}; use default, nuclei-unet-fast, "
        "nuclei-unet-accurate, classical or a .safetensors path"
    )


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
