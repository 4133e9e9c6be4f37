"""Weights files: safetensors tensors + a JSON sidecar (architecture, µm/px, thresholds, presets).

Loading never unpickles: tensors come from ``safetensors`` and the metadata from JSON. A missing,
corrupt or mismatched file raises :class:`~slidestream.errors.WeightsError` with a one-line
message naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from slidestream.errors import WeightsError
from slidestream.models.nuclei._network import NetworkConfig, NucleusNet, build_network

__all__ = ["WEIGHTS_DIR", "file_sha256", "load_network", "read_sidecar", "save_weights"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
"""Folder of the shipped weights (``slidestream/models/weights`` once installed)."""

FORMAT = "slidestream-nuclei/1"

_FIX = "restore it (git checkout models/weights) or retrain with `slidestream train nuclei`"


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_weights(net: NucleusNet, path: Path, meta: Mapping[str, Any]) -> None:
    """Write ``path`` (``.safetensors``) and its sidecar ``path.with_suffix('.json')``.

    Parameters
    ----------
    net : NucleusNet
        Network whose ``state_dict`` is saved (moved to CPU, contiguous float32).
    path : Path
        Destination ``.safetensors`` file; written atomically (temp name + rename).
    meta : Mapping
        JSON-serialisable metadata (presets, training record); ``format``, ``weights`` and
        ``architecture`` are added.
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    side = {"format": FORMAT, "weights": path.name, "architecture": net.config.to_dict(), **meta}
    side_path = path.with_suffix(".json")
    tmp_json = side_path.with_name(side_path.name + ".tmp")
    tmp_json.write_text(json.dumps(side, indent=2) + "\n")
    tmp_json.replace(side_path)


def read_sidecar(path: Path) -> dict[str, Any]:
    """Read and check the JSON sidecar of a weights file (``.json`` or ``.safetensors`` path)."""
    side_path = path.with_suffix(".json")
    try:
        data = json.loads(side_path.read_text())
    except FileNotFoundError as exc:
        raise WeightsError(f"{side_path}: weights config missing; {_FIX}") from exc
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{side_path}: unreadable weights config ({exc}); {_FIX}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise WeightsError(
            f"{side_path}: not a slidestream nucleus weights config (format != {FORMAT!r}); {_FIX}"
        )
    return data


def load_network(path: Path, config: NetworkConfig) -> tuple[NucleusNet, str]:
    """Build a network and load ``path`` into it (safetensors only, strict key/shape check).

    Returns the network (CPU, eval mode) and the file's SHA-256.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found; {_FIX}")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(
            f"{path}: corrupt weights file ({str(exc).splitlines()[0]}); {_FIX}"
        ) from exc
    net = build_network(config)
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).replace("\n", " ")[:200]
        raise WeightsError(
            f"{path}: weights do not fit architecture {config.to_dict()} ({first}); {_FIX}"
        ) from exc
    for value in net.state_dict().values():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise WeightsError(f"{path}: weights contain NaN/inf; {_FIX}")
    return net.eval(), file_sha256(path)
