"""Classical nucleus segmentation (no weights): colour deconvolution + Otsu + distance watershed."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from slidestream.errors import ConfigError
from slidestream.models.nuclei._data import resample_image, resample_labels
from slidestream.models.nuclei._postprocess import relabel_sequential, remove_small

__all__ = ["ClassicalSegmenter"]


class ClassicalSegmenter:
    """Haematoxylin threshold + distance-transform watershed, behind ``segment(image, mpp)``.

    Parameters
    ----------
    mpp : float
        Working µm/px (inputs are resampled to it, labels back).
    min_area_um2 : float
        Smallest nucleus kept, µm².
    seed_h_um : float
        h-maxima height of the distance map for seeds, µm (suppresses over-splitting).
    """

    name = "classical"
    weights_sha256 = ""
    type_names: tuple[str, ...] = ()
    """No nucleus types (no type head)."""

    def __init__(
        self, *, mpp: float = 0.5, min_area_um2: float = 6.0, seed_h_um: float = 0.6
    ) -> None:
        if not mpp > 0 or min_area_um2 < 0 or seed_h_um < 0:
            raise ConfigError("ClassicalSegmenter: mpp must be > 0, areas/heights >= 0")
        self.mpp = float(mpp)
        self.min_area_um2 = float(min_area_um2)
        self.seed_h_um = float(seed_h_um)

    def segment_working(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.int32]:
        """Segment an (H, W, 3) uint8 image already at :attr:`mpp`; int32 labels, same frame."""
        from skimage.color import rgb2hed
        from skimage.morphology import h_maxima
        from skimage.segmentation import watershed

        hema = rgb2hed(image)[..., 0].astype(np.float32)
        hema = cv2.GaussianBlur(hema, (0, 0), sigmaX=1.0 * 0.5 / self.mpp)
        lo, hi = float(hema.min()), float(hema.max())
        scaled = ((hema - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
        _, fg = cv2.threshold(scaled, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        fg = ndi.binary_fill_holes(fg > 0)
        dist = ndi.distance_transform_edt(fg).astype(np.float32) * self.mpp  # µm
        dist = np.asarray(cv2.GaussianBlur(dist, (0, 0), sigmaX=1.0), np.float32)
        peaks = h_maxima(dist, self.seed_h_um)  # type: ignore[no-untyped-call]
        seeds = np.asarray(peaks, bool) & fg
        _, markers = cv2.connectedComponents(seeds.astype(np.uint8), connectivity=8)
        ws = watershed(-dist, markers.astype(np.int32), mask=fg)  # type: ignore[no-untyped-call]
        labels = np.asarray(ws, np.int32)
        min_px = round(self.min_area_um2 / self.mpp**2)
        return relabel_sequential(remove_small(labels, min_px))

    def segment(self, image: npt.NDArray[np.uint8], mpp: float) -> npt.NDArray[np.int32]:
        """Segment nuclei; see :meth:`slidestream.models.nuclei.NucleusModel.segment`."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ConfigError(f"image {image.shape} {image.dtype}: expected (H, W, 3) uint8 RGB")
        if not mpp > 0:
            raise ConfigError(f"input µm/px {mpp}: must be > 0; pass --mpp")
        t_img = resample_image(image, mpp / self.mpp)
        t_lab = self.segment_working(t_img)
        return resample_labels(t_lab, (image.shape[1], image.shape[0]))

    def __repr__(self) -> str:
        kw: dict[str, Any] = {"mpp": self.mpp, "min_area_um2": self.min_area_um2}
        return f"ClassicalSegmenter({kw})"
