"""Declarative patch-classifier spec in the WSInfer model-zoo ``config.json`` format.

The file holds WSInfer's keys (``spec_version``, ``architecture``, ``num_classes``,
``class_names``, ``patch_size_pixels``, ``spacing_um_px``, ``transform``) so a WSInfer-compatible
TorchScript model dropped into a folder loads as is; our optional keys (``name``,
``display_name``, ``class_colors`` and the ``slidestream`` block with architecture arguments) are
ignored by WSInfer.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slidestream._atomic import write_text_atomic
from slidestream.errors import ConfigError

__all__ = [
    "KNOWN_TRANSFORMS",
    "TTA_MODES",
    "ModelSpec",
    "TransformStep",
    "read_spec",
    "write_spec",
]

logger = logging.getLogger(__name__)

#: Test-time augmentation modes of whole-image classification (``slidestream.tta``).
TTA_MODES = ("none", "dihedral")

#: Transform names the runner applies (WSInfer's vocabulary, torchvision names).
KNOWN_TRANSFORMS = frozenset({"Resize", "ToTensor", "Normalize", "CenterCrop"})

_WSINFER_KEYS = (
    "spec_version",
    "architecture",
    "num_classes",
    "class_names",
    "patch_size_pixels",
    "spacing_um_px",
    "transform",
)

# Distinct default colours (RGB) for classes without ``class_colors``.
_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (128, 128, 0),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TransformStep:
    """One preprocessing step of a spec (WSInfer ``transform`` list entry).

    Attributes
    ----------
    name : str
        ``Resize`` (``size``: int, px), ``CenterCrop`` (``size``), ``ToTensor`` (uint8 ->
        float in [0, 1]) or ``Normalize`` (``mean``, ``std``: 3 floats each).
    arguments : dict of str to Any
        Keyword arguments of the step, JSON-serialisable.
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in KNOWN_TRANSFORMS:
            raise ConfigError(
                f"transform {self.name!r} is not supported; use one of {sorted(KNOWN_TRANSFORMS)}"
            )
        if self.name in ("Resize", "CenterCrop"):
            size = self.arguments.get("size")
            if not isinstance(size, int) or size <= 0:
                raise ConfigError(f"{self.name} needs an int 'size' > 0, got {size!r}")
        if self.name == "Normalize":
            for key in ("mean", "std"):
                val = self.arguments.get(key)
                if not isinstance(val, list) or len(val) != 3:
                    raise ConfigError(f"Normalize needs '{key}' as a list of 3 floats, got {val!r}")
            if any(float(s) <= 0 for s in self.arguments["std"]):
                raise ConfigError(f"Normalize 'std' must be > 0, got {self.arguments['std']!r}")

    def to_json(self) -> dict[str, Any]:
        """Return the WSInfer JSON form (``arguments`` omitted when empty)."""
        out: dict[str, Any] = {"name": self.name}
        if self.arguments:
            out["arguments"] = dict(self.arguments)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """A patch classifier's declarative spec (``config.json``).

    Attributes
    ----------
    architecture : str
        Network name; ``"slidestream-tissuenet"`` for ours, anything for TorchScript models.
    class_names : tuple of str
        Output classes in logit order.
    patch_size_pixels : int
        Input patch side in px at ``spacing_um_px``.
    spacing_um_px : float
        Working resolution of the model, µm per pixel.
    transform : tuple of TransformStep
        Preprocessing applied to each uint8 patch before the network.
    spec_version : str
        WSInfer spec version string.
    name : str or None
        Registry name (``lung-lc25000``); ``None`` for anonymous user models.
    display_name : str or None
        Human-readable title.
    class_colors : tuple of (int, int, int) or None
        One RGB display colour per class; ``None`` uses a default palette.
    slidestream : dict of str to Any
        Our extra block: ``arch_args`` (network arguments), ``default_input_mpp`` (µm/px assumed
        for inputs whose resolution is unknown), ``tta`` (see :attr:`tta`), ``weights_sha256``
        and free-form notes.
    """

    architecture: str
    class_names: tuple[str, ...]
    patch_size_pixels: int
    spacing_um_px: float
    transform: tuple[TransformStep, ...] = ()
    spec_version: str = "1.0"
    name: str | None = None
    display_name: str | None = None
    class_colors: tuple[tuple[int, int, int], ...] | None = None
    slidestream: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"class_names must be non-empty and unique, got {self.class_names!r}")
        if self.patch_size_pixels <= 0:
            raise ConfigError(f"patch_size_pixels must be > 0, got {self.patch_size_pixels}")
        if not (math.isfinite(self.spacing_um_px) and self.spacing_um_px > 0):
            raise ConfigError(f"spacing_um_px must be > 0, got {self.spacing_um_px}")
        if self.class_colors is not None:
            if len(self.class_colors) != len(self.class_names):
                raise ConfigError(
                    f"class_colors has {len(self.class_colors)} entries for "
                    f"{len(self.class_names)} classes; give one [r, g, b] per class"
                )
            for rgb in self.class_colors:
                if len(rgb) != 3 or any(not 0 <= c <= 255 for c in rgb):
                    raise ConfigError(f"class colour {rgb!r} is not [r, g, b] in 0..255")
        tta = str(self.slidestream.get("tta", "none"))
        if tta not in TTA_MODES:
            raise ConfigError(f"slidestream.tta {tta!r}: expected one of {list(TTA_MODES)}")

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return len(self.class_names)

    @property
    def colors(self) -> tuple[tuple[int, int, int], ...]:
        """Display colours, one RGB triple per class (``class_colors`` or a default palette)."""
        if self.class_colors is not None:
            return self.class_colors
        return tuple(_PALETTE[i % len(_PALETTE)] for i in range(self.num_classes))

    @property
    def default_input_mpp(self) -> float | None:
        """µm/px assumed for inputs of unknown resolution (``None``: the model's own)."""
        val = self.slidestream.get("default_input_mpp")
        return None if val is None else float(val)

    @property
    def tta(self) -> str:
        """Test-time augmentation of whole-image classification: ``"none"`` or ``"dihedral"``.

        ``"dihedral"`` averages the probabilities of every patch over the 8 symmetries of the
        square (flips x transposition); stored as ``slidestream.tta``, ``"none"`` when absent.
        """
        return str(self.slidestream.get("tta", "none"))  # checked in __post_init__

    @property
    def patch_extent_um(self) -> float:
        """Side of one patch in µm."""
        return self.patch_size_pixels * self.spacing_um_px

    def to_json(self) -> dict[str, Any]:
        """Return the ``config.json`` mapping (WSInfer keys first, then ours)."""
        out: dict[str, Any] = {
            "spec_version": self.spec_version,
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "patch_size_pixels": self.patch_size_pixels,
            "spacing_um_px": self.spacing_um_px,
            "transform": [t.to_json() for t in self.transform],
        }
        if self.name is not None:
            out["name"] = self.name
        if self.display_name is not None:
            out["display_name"] = self.display_name
        if self.class_colors is not None:
            out["class_colors"] = [list(c) for c in self.class_colors]
        if self.slidestream:
            out["slidestream"] = self.slidestream
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "config.json") -> ModelSpec:
        """Build a spec from a parsed ``config.json`` mapping.

        Raises
        ------
        ConfigError
            A key is missing or has the wrong type; the message names ``source``.
        """
        missing = [k for k in _WSINFER_KEYS if k not in data and k != "transform"]
        if missing:
            raise ConfigError(
                f"{source}: model config lacks {missing}; a WSInfer config.json needs "
                f"{list(_WSINFER_KEYS)}"
            )
        try:
            steps = tuple(
                TransformStep(name=str(t["name"]), arguments=dict(t.get("arguments") or {}))
                for t in data.get("transform", [])
            )
            colors_raw = data.get("class_colors")
            colors: tuple[tuple[int, int, int], ...] | None = None
            if colors_raw is not None:
                colors = tuple((int(c[0]), int(c[1]), int(c[2])) for c in colors_raw)
            spec = cls(
                spec_version=str(data["spec_version"]),
                architecture=str(data["architecture"]),
                class_names=tuple(str(c) for c in data["class_names"]),
                patch_size_pixels=int(data["patch_size_pixels"]),
                spacing_um_px=float(data["spacing_um_px"]),
                transform=steps,
                name=None if data.get("name") is None else str(data["name"]),
                display_name=(
                    None if data.get("display_name") is None else str(data["display_name"])
                ),
                class_colors=colors,
                slidestream=dict(data.get("slidestream") or {}),
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"{source}: malformed model config ({exc!r}); fix the JSON") from exc
        if int(data["num_classes"]) != spec.num_classes:
            raise ConfigError(
                f"{source}: num_classes={data['num_classes']} but {spec.num_classes} class_names;"
                " make them agree"
            )
        return spec

    def replace(self, **changes: Any) -> ModelSpec:
        """Return a copy with some fields changed (validated again)."""
        values: dict[str, Any] = {
            k: getattr(self, k)
            for k in (
                "architecture",
                "class_names",
                "patch_size_pixels",
                "spacing_um_px",
                "transform",
                "spec_version",
                "name",
                "display_name",
                "class_colors",
                "slidestream",
            )
        }
        values.update(changes)
        return ModelSpec(**values)


def default_transform(patch_size_pixels: int) -> tuple[TransformStep, ...]:
    """Transform of our own models: resize to the patch, then uint8 -> [0, 1] float."""
    return (
        TransformStep(name="Resize", arguments={"size": patch_size_pixels}),
        TransformStep(name="ToTensor"),
    )


def read_spec(path: str | Path) -> ModelSpec:
    """Read a ``config.json`` (or a model folder holding one).

    Parameters
    ----------
    path : str or Path
        The JSON file or its folder.

    Returns
    -------
    ModelSpec

    Raises
    ------
    ConfigError
        Missing file, invalid JSON or an invalid spec.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: model config not found; a model folder needs config.json") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: cannot parse model config ({exc}); fix or replace it") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: model config must be a JSON object; fix or replace it")
    return ModelSpec.from_json(data, source=str(p))


def write_spec(spec: ModelSpec, path: str | Path) -> Path:
    """Write ``spec`` as ``config.json`` atomically (temp file + rename).

    Parameters
    ----------
    spec : ModelSpec
    path : str or Path
        Target file, or a folder (``config.json`` inside it).

    Returns
    -------
    Path
        The written file.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    text = json.dumps(spec.to_json(), indent=2, sort_keys=False) + "\n"
    atomic_write_text(p, text)
    return p


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, creating its folder (:mod:`slidestream._atomic`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
