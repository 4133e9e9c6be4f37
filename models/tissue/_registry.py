"""Registry of tissue models: shipped folders, user-registered folders, the ``default`` alias.

Shipped models live in ``slidestream/models/weights/tissue-<name>/`` (``config.json``,
``weights.safetensors``, ``MODEL_CARD.md``). Users register their own folders in a JSON file
(``{"name": "/abs/dir", ...}``) whose path the caller passes (the CLI uses its app config dir);
the library itself reads no environment variables.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from slidestream.errors import ConfigError

from ._runner import TORCHSCRIPT_NAMES, WEIGHTS_NAME, PatchClassifier, load_model_dir
from ._spec import atomic_write_text, read_spec

__all__ = [
    "DEFAULT_TISSUE_MODEL",
    "TissueModelInfo",
    "list_tissue_models",
    "load_tissue_model",
    "register_tissue_model",
    "shipped_model_dir",
]

logger = logging.getLogger(__name__)

#: Shipped model used for ``"default"`` (whole-slide analysis); see its MODEL_CARD.md.
DEFAULT_TISSUE_MODEL = "tumour-pan"
_PREFIX = "tissue-"


@dataclass(frozen=True, slots=True, kw_only=True)
class TissueModelInfo:
    """One listed model.

    Attributes
    ----------
    name : str
    path : Path
    origin : str
        ``shipped`` or ``user``.
    class_names : tuple of str
    mpp : float
        Working µm/px.
    patch_size_pixels : int
    summary : str
        First paragraph line of ``MODEL_CARD.md`` (or the display name).
    is_default : bool
    """

    name: str
    path: Path
    origin: str
    class_names: tuple[str, ...]
    mpp: float
    patch_size_pixels: int
    summary: str
    is_default: bool = False


def _weights_root() -> Path:
    return Path(str(resources.files("slidestream.models.weights")))


def shipped_model_dir(name: str) -> Path | None:
    """Folder of a shipped model (``default`` resolves to :data:`DEFAULT_TISSUE_MODEL`)."""
    name = DEFAULT_TISSUE_MODEL if name == "default" else name
    folder = _weights_root() / f"{_PREFIX}{name}"
    return folder if (folder / "config.json").is_file() else None


def _read_registry(registry: Path | None) -> dict[str, str]:
    if registry is None or not registry.is_file():
        return {}
    try:
        data = json.loads(registry.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{registry}: unreadable model registry ({exc}); fix or delete it"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{registry}: model registry must be a JSON object; fix or delete it")
    return {str(k): str(v) for k, v in data.items()}


def register_tissue_model(model_dir: str | Path, name: str, registry: Path) -> Path:
    """Add a user model folder to the registry file under ``name``.

    Raises
    ------
    ConfigError
        The folder has no valid ``config.json`` / weights, or ``name`` is a shipped model.
    """
    folder = Path(model_dir).resolve()
    read_spec(folder)
    if not any((folder / f).is_file() for f in (WEIGHTS_NAME, *TORCHSCRIPT_NAMES)):
        raise ConfigError(f"{folder}: no {WEIGHTS_NAME} or TorchScript file; add the weights")
    if name == "default" or shipped_model_dir(name) is not None:
        raise ConfigError(f"model name {name!r} is taken by a shipped model; choose another --name")
    entries = _read_registry(registry)
    entries[name] = str(folder)
    atomic_write_text(registry, json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return registry


def _card_summary(folder: Path, fallback: str) -> str:
    card = folder / "MODEL_CARD.md"
    if card.is_file():
        for line in card.read_text(encoding="utf-8").splitlines():
            text = line.strip()
            if text and not text.startswith(("#", "|", "-", ">")):
                return text[:200]
    return fallback


def _info(name: str, folder: Path, origin: str) -> TissueModelInfo:
    spec = read_spec(folder)
    return TissueModelInfo(
        name=name,
        path=folder,
        origin=origin,
        class_names=spec.class_names,
        mpp=spec.spacing_um_px,
        patch_size_pixels=spec.patch_size_pixels,
        summary=_card_summary(folder, spec.display_name or spec.architecture),
        is_default=origin == "shipped" and name == DEFAULT_TISSUE_MODEL,
    )


def list_tissue_models(
    *, registry: Path | None = None, models_dir: Path | None = None
) -> list[TissueModelInfo]:
    """Shipped models, then user-registered ones, then model folders inside ``models_dir``."""
    out: list[TissueModelInfo] = []
    root = _weights_root()
    for folder in sorted(root.glob(f"{_PREFIX}*")):
        if (folder / "config.json").is_file():
            out.append(_info(folder.name[len(_PREFIX) :], folder, "shipped"))
    for name, path in sorted(_read_registry(registry).items()):
        folder = Path(path)
        if (folder / "config.json").is_file():
            out.append(_info(name, folder, "user"))
        else:
            logger.warning("registered model %s: %s has no config.json", name, folder)
    if models_dir is not None and models_dir.is_dir():
        for folder in sorted(p for p in models_dir.iterdir() if (p / "config.json").is_file()):
            out.append(_info(folder.name, folder, "user"))
    return out


def load_tissue_model(
    name_or_dir: str | Path = "default",
    device: str | torch.device = "cpu",
    *,
    registry: Path | None = None,
) -> PatchClassifier:
    """Load a tissue classifier by registry name or folder.

    Parameters
    ----------
    name_or_dir : str or Path
        ``"default"``, a shipped name (``lung-lc25000``, ``colon-glas``, ``tumour-pan``), a
        user-registered name, or a model folder (ours, or WSInfer config.json + TorchScript).
    device : str or torch.device
    registry : Path, optional
        User registry JSON file.

    Raises
    ------
    ConfigError
        Unknown name / invalid config.
    WeightsError
        Missing or corrupt weights.

    Examples
    --------
    >>> model = load_tissue_model("default")
    >>> model.spec.class_names
    ('non_tumour', 'tumour')
    """
    key = str(name_or_dir)
    shipped = shipped_model_dir(key)
    if shipped is not None:
        return load_model_dir(shipped, device=device, allow_torchscript=False)
    user = _read_registry(registry).get(key)
    if user is not None:
        return load_model_dir(Path(user), device=device, allow_torchscript=True)
    folder = Path(name_or_dir)
    if folder.is_dir():
        return load_model_dir(folder, device=device, allow_torchscript=True)
    names = sorted(m.name for m in list_tissue_models(registry=registry))
    raise ConfigError(
        f"tissue model {key!r} is neither a known name {['default', *names]} nor a folder; "
        "pass --model NAME_OR_DIR"
    )
