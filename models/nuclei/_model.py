"""Inference wrapper: :class:`NucleusModel` (predict maps, post-process, segment at any µm/px)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from slidestream.errors import ConfigError
from slidestream.models.nuclei._data import resample_image, resample_labels
from slidestream.models.nuclei._network import (
    N_OUTPUTS,
    PAD_MULTIPLE,
    NucleusNet,
    fold_batchnorm,
)
from slidestream.models.nuclei._postprocess import PostprocessConfig, postprocess_maps
from slidestream.models.nuclei._types import InstanceTypes, instance_types

__all__ = ["NucleusModel", "Precision", "pad_to_multiple"]

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]

_MAX_TILE_PX = 1024
_TILE_MARGIN_PX = 32


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> tuple[torch.Tensor, int, int]:
    """Reflect-pad (N, C, H, W) at the bottom/right to multiples of ``multiple``.

    Returns the padded tensor and the original height and width (px).
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if (ph < h and pw < w) else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


def _cpu_bf16_fast() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class NucleusModel:
    """A trained nucleus network plus its post-processing, at a declared working µm/px.

    Parameters
    ----------
    net : NucleusNet
        The network (weights loaded).
    name : str
        Registry name or file stem.
    mpp : float
        Working resolution in µm/px; :meth:`segment` resamples inputs to it.
    weights_sha256 : str
        SHA-256 of the weights file.
    postprocess_config : PostprocessConfig
        Watershed thresholds (in working pixels).
    device : str or torch.device
        ``"cpu"`` or ``"cuda[:i]"``.
    precision : {"auto", "fp32", "bf16", "fp16"}
        Compute dtype. ``"auto"``: fp16 autocast on CUDA; bf16 on CPUs with native bf16
        (AVX512-BF16/AMX), else fp32 (bf16 is emulated and slower on AVX2-only CPUs). On a CPU,
        bf16 casts the network's weights and activations (no autocast).
    channels_last : bool
        Use the channels-last memory format.
    tta : bool
        Average the logits over the 8 symmetries of the square (flips and transposition,
        8 forward passes): slower, slightly more accurate.
    type_colors : mapping of str to (r, g, b), optional
        Display colour of some of the type names (a model trained on the user's annotations
        keeps the annotation file's class colours).
    """

    def __init__(
        self,
        net: NucleusNet,
        *,
        name: str,
        mpp: float,
        weights_sha256: str,
        postprocess_config: PostprocessConfig,
        device: str | torch.device = "cpu",
        precision: Precision = "auto",
        channels_last: bool = True,
        tta: bool = False,
        type_colors: Mapping[str, tuple[int, int, int]] | None = None,
    ) -> None:
        if not mpp > 0:
            raise ConfigError(f"model {name}: working µm/px {mpp} must be > 0")
        self.device = torch.device(device)
        self._n_parameters = sum(p.numel() for p in net.parameters())
        self.net = net.to(self.device).eval()
        fold_batchnorm(self.net)  # inference only: BatchNorm merged into the convolutions
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.name = name
        self.mpp = float(mpp)
        self.weights_sha256 = weights_sha256
        self.postprocess_config = postprocess_config
        self.tta = tta
        self.type_colors: dict[str, tuple[int, int, int]] = dict(type_colors or {})
        if precision == "auto":
            if self.device.type == "cuda":
                precision = "fp16"
            else:
                precision = "bf16" if _cpu_bf16_fast() else "fp32"
        self.precision: Precision = precision
        # On a CPU, bf16 runs as bf16 weights and activations rather than under autocast: the
        # concatenations, paddings and ReLUs of the U-Net then move half the bytes and no weight
        # is re-cast per call (1.6x the forward throughput of autocast on a 2-core AVX512-BF16
        # CPU; same held-out AJI, see the model card).
        self._cast: torch.dtype | None = None
        if self.device.type == "cpu" and precision == "bf16":
            self.net = self.net.to(torch.bfloat16)
            self._cast = torch.bfloat16
        self.postprocess: Callable[[npt.NDArray[np.floating[Any]]], npt.NDArray[np.int32]] = (
            functools.partial(postprocess_maps, config=postprocess_config)
        )

    def upsample_for(self, input_mpp: float) -> int:
        """Watershed refinement factor for an input at ``input_mpp`` µm/px.

        The preset's ``PostprocessConfig.upsample``, limited to the smallest factor that makes
        the watershed grid at least as fine as the input (``ceil(mpp / input_mpp)``): a
        0.5 µm/px model refines 2x for a 0.25 µm/px (40x) input and not at all for a
        0.5 µm/px (20x) one, where finer labels would only interpolate between its pixels; a
        0.35 µm/px model refines 2x (0.175 µm/px) for a 40x input, whose labels are then
        resampled to the input's 0.25 µm/px.
        """
        needed = max(1, math.ceil(self.mpp / input_mpp - 1e-6))
        return min(self.postprocess_config.upsample, needed)

    def postprocess_for(
        self, input_mpp: float
    ) -> Callable[[npt.NDArray[np.floating[Any]]], npt.NDArray[np.int32]]:
        """Post-processing for maps of an input at ``input_mpp`` µm/px (:meth:`upsample_for`)."""
        u = self.upsample_for(input_mpp)
        if u == self.postprocess_config.upsample:
            return self.postprocess
        config = dataclasses.replace(self.postprocess_config, upsample=u)
        return functools.partial(postprocess_maps, config=config)

    @property
    def n_types(self) -> int:
        """Nucleus types of the type head (0 without one)."""
        return int(self.net.config.n_types)

    @property
    def type_names(self) -> tuple[str, ...]:
        """Names of the type channels (empty without a type head)."""
        return tuple(self.net.config.type_names)

    @property
    def n_outputs(self) -> int:
        """Channels of :meth:`predict`'s maps."""
        return N_OUTPUTS + self.n_types

    @property
    def n_parameters(self) -> int:
        """Number of parameters of the network as trained (before BatchNorm folding)."""
        return self._n_parameters

    def _autocast(self) -> Any:
        if self.precision == "fp32" or self._cast is not None:
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = pad_to_multiple(x)
        if self._cast is not None:
            x = x.to(self._cast)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self.net(x) if not self.tta else self._dihedral_mean(x)
        out = out.float()[..., :h, :w]
        if self.n_types == 0:
            return torch.sigmoid(out)
        return torch.cat(
            [torch.sigmoid(out[:, :N_OUTPUTS]), torch.softmax(out[:, N_OUTPUTS:], dim=1)], dim=1
        )

    def _dihedral_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean logits over the 8 symmetries of the square (flips x transposition).

        Each view's output is mapped back to the input frame before averaging; the network is
        fully convolutional and the padded ``(H, W)`` are multiples of 16, so transposed views
        (``(W, H)``) need no further padding.
        """
        out: torch.Tensor | None = None
        for transpose in (False, True):
            xt = x.transpose(-1, -2) if transpose else x
            for dims in ((), (-1,), (-2,), (-2, -1)):
                view = self.net(torch.flip(xt, dims) if dims else xt)
                view = torch.flip(view, dims) if dims else view
                view = view.transpose(-1, -2) if transpose else view
                out = view if out is None else out + view
        assert out is not None
        return out / 8.0

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> npt.NDArray[np.float32]:
        """Probability maps of a batch of tiles at the working µm/px.

        Parameters
        ----------
        batch : torch.Tensor, uint8, shape (N, 3, H, W)
            RGB tiles at ``self.mpp`` (any H, W; padded internally).

        Returns
        -------
        ndarray, float32, shape (N, C, H, W)
            Foreground, boundary and normalised-distance probabilities, same pixel frame; with a
            type head (``C = 3 + n_types``) then the type probabilities (softmax over
            :attr:`type_names`, summing to 1 at every pixel).
        """
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ConfigError(f"batch of shape {tuple(batch.shape)}: expected (N, 3, H, W) uint8")
        x = batch.to(self.device, non_blocking=True).float()
        n, _, h, w = x.shape
        if h <= _MAX_TILE_PX and w <= _MAX_TILE_PX:
            if self.device.type == "cpu" and n > 1:
                # One tile at a time on a CPU: a 512² tile's activations stay in cache, which
                # gave 1.4-1.9x the throughput of batches of 8 on a 2-core CPU.
                out = np.empty((n, self.n_outputs, h, w), np.float32)
                for i in range(n):
                    out[i] = self._forward(x[i : i + 1])[0].numpy()
                return out
            return self._forward(x).cpu().numpy().astype(np.float32, copy=False)
        out = np.zeros((n, self.n_outputs, h, w), np.float32)
        step = _MAX_TILE_PX - 2 * _TILE_MARGIN_PX
        for y0 in range(0, h, step):
            for x0 in range(0, w, step):
                ya, xa = max(0, y0 - _TILE_MARGIN_PX), max(0, x0 - _TILE_MARGIN_PX)
                yb, xb = min(h, y0 + step + _TILE_MARGIN_PX), min(w, x0 + step + _TILE_MARGIN_PX)
                tile = self._forward(x[:, :, ya:yb, xa:xb]).cpu().numpy()
                y1, x1 = min(h, y0 + step), min(w, x0 + step)
                out[:, :, y0:y1, x0:x1] = tile[:, :, y0 - ya : y1 - ya, x0 - xa : x1 - xa]
        return out

    def segment(self, image: npt.NDArray[np.uint8], mpp: float) -> npt.NDArray[np.int32]:
        """Segment the nuclei of one RGB image.

        Parameters
        ----------
        image : ndarray, uint8, shape (H, W, 3)
            RGB image.
        mpp : float
            µm/px of ``image``; it is resampled to :attr:`mpp` and the labels back.

        Returns
        -------
        ndarray, int32, shape (H, W)
            Instance ids ``1..n`` in the input's pixel frame (0 background).
        """
        return self.segment_typed(image, mpp)[0]

    def segment_typed(
        self, image: npt.NDArray[np.uint8], mpp: float
    ) -> tuple[npt.NDArray[np.int32], InstanceTypes | None]:
        """Segment the nuclei of one RGB image and type each of them.

        Parameters
        ----------
        image : ndarray, uint8, shape (H, W, 3)
            RGB image.
        mpp : float
            µm/px of ``image``.

        Returns
        -------
        labels : ndarray, int32, shape (H, W)
            Instance ids ``1..n`` in the input's pixel frame (0 background).
        types : InstanceTypes or None
            Per-instance type and mean type probabilities (``None`` without a type head). An
            instance that vanished in the resampling to the input frame keeps no row.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ConfigError(f"image {image.shape} {image.dtype}: expected (H, W, 3) uint8 RGB")
        if not mpp > 0:
            raise ConfigError(f"input µm/px {mpp}: must be > 0; pass --mpp")
        t_img = resample_image(image, mpp / self.mpp)
        batch = torch.from_numpy(np.ascontiguousarray(t_img.transpose(2, 0, 1)))[None]
        maps = self.predict(batch)[0]
        t_labels = self.postprocess_for(mpp)(maps)
        labels = resample_labels(t_labels, (image.shape[1], image.shape[0]))
        if self.n_types == 0:
            return labels, None
        return labels, instance_types(t_labels, maps[N_OUTPUTS:], self.type_names)
