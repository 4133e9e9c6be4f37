"""Plain PNG/JPEG images as single-level slides (µm/px must be given)."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from slidestream.errors import SlideOpenError

__all__ = ["ImageReader", "load_image_rgb"]

logger = logging.getLogger(__name__)


def load_image_rgb(path: Path, background: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
    """Decode a PNG/JPEG to RGB uint8 ``(H, W, 3)``; alpha is composited on ``background``.

    Raises
    ------
    SlideOpenError
        If the file cannot be decoded as an 8/16-bit image.
    """
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise SlideOpenError(f"{path.name}: cannot decode the image; check it is a PNG or JPEG")
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    if image.dtype != np.uint8:
        raise SlideOpenError(f"{path.name}: {image.dtype} pixels; expected 8-bit RGB(A) or grey")
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    if image.shape[2] == 4:
        rgba = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        bg = np.asarray(background, dtype=np.float32)
        mixed = rgba[..., :3].astype(np.float32) * alpha + bg * (1.0 - alpha)
        composited: npt.NDArray[np.uint8] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
        return composited
    rgb: npt.NDArray[np.uint8] = np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return rgb


class ImageReader:
    """In-memory single-level reader for a decoded image."""

    name = "image"

    def __init__(self, pixels: npt.NDArray[np.uint8], background: tuple[int, int, int]) -> None:
        self._pixels: npt.NDArray[np.uint8] | None = pixels
        self._bg = np.asarray(background, dtype=np.uint8)

    def read_l0(
        self, l0_x: int, l0_y: int, level: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]:
        """RGB ``(height, width, 3)`` at level 0 (the only level), padded with background."""
        return self.read_level(level, l0_x, l0_y, width, height)

    def read_level(
        self, level: int, lv_x: int, lv_y: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]:
        """RGB ``(height, width, 3)``; top-left ``(lv_x, lv_y)`` px; padded with background."""
        pixels = self._pixels
        if pixels is None:
            raise SlideOpenError("image slide is closed; reopen it with open_slide")
        img_h, img_w = pixels.shape[:2]
        out = np.empty((height, width, 3), dtype=np.uint8)
        x0, y0 = max(lv_x, 0), max(lv_y, 0)
        x1, y1 = min(lv_x + width, img_w), min(lv_y + height, img_h)
        if (x0, y0, x1, y1) != (lv_x, lv_y, lv_x + width, lv_y + height):
            out[...] = self._bg
        if x1 > x0 and y1 > y0:
            out[y0 - lv_y : y1 - lv_y, x0 - lv_x : x1 - lv_x] = pixels[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        """Drop the pixels (idempotent)."""
        self._pixels = None
