"""Patch-classifier runner: loading (safetensors or user TorchScript), preprocessing, inference.

Our own models are ``config.json`` + ``weights.safetensors`` (no pickle). A folder a user passes
explicitly may instead hold a WSInfer-compatible TorchScript file (``model.pt`` or
``torchscript_model.pt``); only that case calls :func:`torch.jit.load`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from slidestream._atomic import atomic_path
from slidestream.errors import ConfigError, WeightsError

from ._ensemble import ENSEMBLE_ARCHITECTURE, build_ensemble
from ._network import ARCHITECTURE, build_network
from ._spec import ModelSpec, read_spec, write_spec
from ._stain_norm import he_gains, image_stain_reference, pooled_he_levels, rescale_he

__all__ = [
    "TORCHSCRIPT_NAMES",
    "WEIGHTS_NAME",
    "PatchClassifier",
    "classify_image",
    "dihedral_views",
    "file_sha256",
    "load_model_dir",
    "save_model",
    "tile_origins",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "weights.safetensors"
TORCHSCRIPT_NAMES = ("torchscript_model.pt", "model.pt")
#: An image up to this many patch extents (per side, at the model µm/px) is classified whole.
WHOLE_IMAGE_FACTOR = 1.5


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class _RunOptions:
    batch_size: int = 64
    bf16: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


class PatchClassifier:
    """A loaded patch classifier (ours or a user's TorchScript model).

    Parameters
    ----------
    spec : ModelSpec
    module : torch.nn.Module
        Maps the transformed float batch ``(N, 3, S, S)`` to logits ``(N, K)``.
    device : str or torch.device
    weights_sha256 : str
        Hash of the weights file ("" when built in memory).
    source : Path or None
        The model folder.
    bf16 : bool
        Run under bfloat16 autocast (CPU or CUDA).
    channels_last : bool
        Use the channels-last memory format.
    """

    def __init__(
        self,
        *,
        spec: ModelSpec,
        module: nn.Module,
        device: str | torch.device = "cpu",
        weights_sha256: str = "",
        source: Path | None = None,
        bf16: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.weights_sha256 = weights_sha256
        self.source = source
        self.options = _RunOptions(bf16=bf16, channels_last=channels_last)
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @property
    def name(self) -> str:
        """Registry name, else the folder name, else the architecture."""
        if self.spec.name:
            return self.spec.name
        return self.source.name if self.source is not None else self.spec.architecture

    @property
    def class_names(self) -> tuple[str, ...]:
        """Output classes in probability-column order."""
        return self.spec.class_names

    @property
    def mpp(self) -> float:
        """Working resolution, µm/px."""
        return self.spec.spacing_um_px

    def preprocess(self, batch: torch.Tensor) -> torch.Tensor:
        """Apply the spec's transform to a uint8 ``(N, 3, H, W)`` batch -> float tensor."""
        x = batch.to(self.device)
        if x.dtype == torch.uint8:
            x = x.float()
            scaled = False
        else:
            x = x.float()
            scaled = True
        for step in self.spec.transform:
            if step.name == "Resize":
                size = int(step.arguments["size"])
                if x.shape[-2:] != (size, size):
                    h, w = x.shape[-2:]
                    short = min(h, w)
                    out = (round(h * size / short), round(w * size / short))
                    x = F.interpolate(x, size=out, mode="bilinear", antialias=True)
            elif step.name == "CenterCrop":
                size = int(step.arguments["size"])
                h, w = x.shape[-2:]
                top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
                x = x[..., top : top + size, left : left + size]
            elif step.name == "ToTensor":
                if not scaled:
                    x = x / 255.0
                    scaled = True
            elif step.name == "Normalize":
                mean = torch.tensor(step.arguments["mean"], device=x.device).view(1, 3, 1, 1)
                std = torch.tensor(step.arguments["std"], device=x.device).view(1, 3, 1, 1)
                x = (x - mean) / std
        if not scaled:
            x = x / 255.0
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @property
    def stain_reference(self) -> torch.Tensor | None:
        """The image-level H&E reference ``(2,)`` of the spec, or None (no image-level
        normalisation; see :mod:`~slidestream.models.tissue._stain_norm`)."""
        return image_stain_reference(self.spec.slidestream)

    def stain_gains(self, patches: torch.Tensor | npt.NDArray[np.uint8]) -> torch.Tensor | None:
        """H and E gains ``(2,)`` for an image or slide from uint8 ``(P, 3, S, S)`` patches of
        it at the model's µm/px; None when the model has no image-level normalisation."""
        reference = self.stain_reference
        if reference is None:
            return None
        return he_gains(pooled_he_levels(patches), reference)

    @torch.inference_mode()
    def predict_proba(
        self,
        batch: torch.Tensor | npt.NDArray[np.uint8],
        *,
        batch_size: int | None = None,
        stain_gains: torch.Tensor | None = None,
    ) -> npt.NDArray[np.float32]:
        """Class probabilities of patches.

        Parameters
        ----------
        batch : torch.Tensor or ndarray, uint8, (N, 3, H, W)
            RGB patches at the model's µm/px; resized to ``patch_size_pixels`` if needed.
        batch_size : int, optional
            Split into chunks of this many patches (default 64).
        stain_gains : Tensor, optional
            H and E gains ``(2,)`` of the image or slide the patches come from
            (:meth:`stain_gains`), applied to every patch before the transform.

        Returns
        -------
        ndarray, float32, (N, K)
            Softmax probabilities, columns in ``spec.class_names`` order.
        """
        t = torch.as_tensor(batch)
        if t.ndim != 4 or t.shape[1] != 3:
            raise ConfigError(f"predict_proba needs a (N, 3, H, W) batch, got {tuple(t.shape)}")
        chunk = batch_size or self.options.batch_size
        outs: list[npt.NDArray[np.float32]] = []
        for start in range(0, t.shape[0], chunk):
            part = t[start : start + chunk]
            if stain_gains is not None:
                part = rescale_he(part.to(self.device), stain_gains)
            x = self.preprocess(part)
            with self._autocast():
                logits = self.module(x)
            outs.append(torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float32))
        if not outs:
            return np.zeros((0, self.spec.num_classes), dtype=np.float32)
        return np.concatenate(outs)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.options.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def configure(
        self,
        *,
        batch_size: int | None = None,
        bf16: bool | None = None,
        channels_last: bool | None = None,
    ) -> None:
        """Change run options (batch size, bf16 autocast, channels-last)."""
        opts = self.options
        self.options = _RunOptions(
            batch_size=opts.batch_size if batch_size is None else batch_size,
            bf16=opts.bf16 if bf16 is None else bf16,
            channels_last=opts.channels_last if channels_last is None else channels_last,
        )
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def tile_origins(length_px: int, patch_px: int) -> list[int]:
    """Evenly spread patch starts covering ``[0, length_px)`` with the last patch flush.

    >>> tile_origins(320, 112)
    [0, 104, 208]
    >>> tile_origins(100, 112)
    [0]
    """
    if length_px <= patch_px:
        return [0]
    n = math.ceil(length_px / patch_px)
    return [round(i * (length_px - patch_px) / (n - 1)) for i in range(n)]


def iter_patches(
    image: npt.NDArray[np.uint8], scale: float, patch_px: int
) -> Iterator[npt.NDArray[np.uint8]]:
    """Yield ``(patch_px, patch_px, 3)`` tiles of ``image`` resampled by ``scale``."""
    h, w = image.shape[:2]
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    t_img = cv2.resize(image, (tw, th), interpolation=interp) if (th, tw) != (h, w) else image
    if th < patch_px or tw < patch_px:
        pad = ((0, max(0, patch_px - th)), (0, max(0, patch_px - tw)), (0, 0))
        t_img = np.pad(t_img, pad, mode="reflect" if min(th, tw) > 1 else "edge")
    tiles: npt.NDArray[np.uint8] = np.asarray(t_img, dtype=np.uint8)
    for y in tile_origins(tiles.shape[0], patch_px):
        for x in tile_origins(tiles.shape[1], patch_px):
            yield tiles[y : y + patch_px, x : x + patch_px]


def dihedral_views(patches: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The 8 symmetries of the square of ``(P, 3, S, S)`` patches, ``(8 P, 3, S, S)``.

    Order: identity, horizontal flip, vertical flip, both, then the same four of the
    transposed patches.
    """
    views = []
    for transpose in (False, True):
        base = patches.transpose(0, 1, 3, 2) if transpose else patches
        for axes in ((), (3,), (2,), (2, 3)):
            views.append(np.flip(base, axes) if axes else base)
    return np.ascontiguousarray(np.concatenate(views))


def image_patches(
    image: npt.NDArray[np.uint8], mpp: float | None, spec: ModelSpec, *, tta: bool | None = None
) -> npt.NDArray[np.uint8]:
    """The patches ``classify_image`` uses, ``(P, 3, S, S)`` uint8 at the model resolution.

    An image whose longer side at the model µm/px is at most 1.5 patch sides is resized whole
    to the patch; a larger one is tiled (patches spread evenly, last one flush with the edge).
    With test-time augmentation (``tta``; ``None`` follows ``spec.tta``) every patch comes in
    its 8 dihedral views (:func:`dihedral_views`), ``(8 P, 3, S, S)``.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ConfigError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    in_mpp = mpp or spec.default_input_mpp or spec.spacing_um_px
    if not in_mpp > 0:
        raise ConfigError(f"image µm/px must be > 0, got {in_mpp}; pass --mpp")
    scale = in_mpp / spec.spacing_um_px
    s = spec.patch_size_pixels
    h, w = image.shape[:2]
    if max(h, w) * scale <= WHOLE_IMAGE_FACTOR * s:
        interp = cv2.INTER_AREA if max(h, w) > s else cv2.INTER_LINEAR
        patches = [cv2.resize(image, (s, s), interpolation=interp)]
    else:
        patches = list(iter_patches(image, scale, s))
    out: npt.NDArray[np.uint8] = np.ascontiguousarray(
        np.stack(patches).transpose(0, 3, 1, 2), dtype=np.uint8
    )
    return dihedral_views(out) if _use_tta(spec, tta) else out


def _use_tta(spec: ModelSpec, tta: bool | None) -> bool:
    """Whether to classify over the 8 dihedral views: ``tta``, or the spec's setting if None."""
    return spec.tta == "dihedral" if tta is None else tta


def classify_image(
    image: npt.NDArray[np.uint8],
    mpp: float | None,
    model: PatchClassifier,
    *,
    tta: bool | None = None,
) -> npt.NDArray[np.float32]:
    """Class probabilities of a whole image (patch probabilities averaged).

    Parameters
    ----------
    image : ndarray, uint8, (H, W, 3)
        RGB image.
    mpp : float or None
        Its µm/px; ``None`` assumes the spec's ``slidestream.default_input_mpp`` (the training
        data's resolution) or else the model's own.
    model : PatchClassifier
    tta : bool, optional
        Average over the 8 dihedral views of every patch (8x the cost); ``None`` follows the
        model's spec (``slidestream.tta``: on for lung-lc25000 and tumour-pan, off for
        colon-glas and for WSInfer models, whose config has no such key).

    Returns
    -------
    ndarray, float32, (K,)
        Mean softmax probability per class (over patches, and views with ``tta``).

    Notes
    -----
    A model with image-level stain normalisation rescales H and E of all patches by gains
    from the image's pooled tissue pixels (:meth:`PatchClassifier.stain_gains`).
    """
    patches = image_patches(image, mpp, model.spec, tta=False)
    gains = model.stain_gains(patches)
    if _use_tta(model.spec, tta):
        patches = dihedral_views(patches)
    batch = torch.from_numpy(patches)
    probs: npt.NDArray[np.float32] = model.predict_proba(batch, stain_gains=gains).mean(axis=0)
    return probs.astype(np.float32)


def save_model(net: nn.Module, spec: ModelSpec, out_dir: Path) -> ModelSpec:
    """Write ``weights.safetensors`` then ``config.json`` (with the weights' sha256).

    The inverse of :func:`load_model_dir` for our own networks: ``net``'s state dict goes to
    safetensors (temporary name, then rename), ``spec`` gets ``slidestream.weights_sha256``.
    Returns the written spec.
    """
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp))
    block = dict(spec.slidestream)
    block["weights_sha256"] = file_sha256(out_dir / WEIGHTS_NAME)
    spec = spec.replace(slidestream=block)
    write_spec(spec, out_dir)
    return spec


def load_model_dir(
    model_dir: str | Path, *, device: str | torch.device = "cpu", allow_torchscript: bool = True
) -> PatchClassifier:
    """Load a model folder: ``config.json`` + ``weights.safetensors`` (ours) or TorchScript.

    Parameters
    ----------
    model_dir : str or Path
    device : str or torch.device
    allow_torchscript : bool
        Accept ``model.pt`` / ``torchscript_model.pt`` (only for folders a user supplied).

    Raises
    ------
    ConfigError
        Missing/invalid ``config.json``.
    WeightsError
        Missing, corrupt or mismatched weights.
    """
    folder = Path(model_dir)
    spec = read_spec(folder)
    weights = folder / WEIGHTS_NAME
    if weights.is_file() or spec.architecture in (ARCHITECTURE, ENSEMBLE_ARCHITECTURE):
        return _load_safetensors(folder, spec, device)
    for name in TORCHSCRIPT_NAMES:
        ts = folder / name
        if ts.is_file():
            if not allow_torchscript:
                raise WeightsError(f"{ts}: TorchScript is only loaded from a user-supplied folder")
            try:
                module = torch.jit.load(  # type: ignore[no-untyped-call]
                    str(ts), map_location=torch.device(device)
                )
            except (RuntimeError, ValueError, OSError) as exc:
                raise WeightsError(
                    f"{ts}: cannot load TorchScript model ({type(exc).__name__}); re-export it "
                    "with torch.jit.save"
                ) from exc
            return PatchClassifier(
                spec=spec,
                module=module,
                device=device,
                weights_sha256=file_sha256(ts),
                source=folder,
            )
    raise WeightsError(
        f"{folder}: no {WEIGHTS_NAME} or {' / '.join(TORCHSCRIPT_NAMES)}; add the weights file"
    )


def _load_safetensors(folder: Path, spec: ModelSpec, device: str | torch.device) -> PatchClassifier:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise WeightsError(f"{path}: weights file missing; re-train or re-install the model")
    sha = file_sha256(path)
    expected = spec.slidestream.get("weights_sha256")
    if expected and expected != sha:
        raise WeightsError(
            f"{path}: sha256 {sha[:12]}… differs from config.json ({str(expected)[:12]}…); the "
            "file is corrupt or replaced — re-install or re-train the model"
        )
    arch_args = spec.slidestream.get("arch_args", {})
    if spec.architecture == ENSEMBLE_ARCHITECTURE:
        net: nn.Module = build_ensemble(spec.num_classes, arch_args)
    else:
        net = build_network(spec.architecture, spec.num_classes, arch_args)
    try:
        state = load_file(str(path))
        net.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: weights do not load ({first[:160]}); re-train or re-install the model"
        ) from exc
    return PatchClassifier(spec=spec, module=net, device=device, weights_sha256=sha, source=folder)
