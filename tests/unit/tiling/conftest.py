"""Fixtures for the tiling tests: an in-memory fake slide and a generated pyramidal TIFF."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest


class FakeSlide:
    """A single-level, array-backed :class:`slidestream.tiling.SlideLike` (white padding)."""

    def __init__(
        self,
        image: npt.NDArray[np.uint8],
        *,
        mpp: float,
        path: str = "fake.tif",
        background: tuple[int, int, int] = (255, 255, 255),
    ) -> None:
        self.image = image
        self.path = Path(path)
        self.mpp = mpp
        self.dimensions = (int(image.shape[1]), int(image.shape[0]))
        self.level_downsamples = (1.0,)
        self.background = background
        self.reads: list[tuple[float, float, float, float]] = []  # level-0 boxes read

    def best_level_for_mpp(self, mpp: float) -> int:
        return 0

    def read_region(
        self, location: tuple[int, int], size: tuple[int, int], *, level: int = 0
    ) -> npt.NDArray[np.uint8]:
        x, y = int(location[0]), int(location[1])
        w, h = size
        self.reads.append((x, y, w, h))
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[:] = self.background
        img_h, img_w = self.image.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, img_w), min(y + h, img_h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.image[y0:y1, x0:x1]
        return out

    def read_at_mpp(
        self, location: tuple[float, float], size: tuple[int, int], mpp: float
    ) -> npt.NDArray[np.uint8]:
        scale = mpp / self.mpp
        w, h = size
        ix0, iy0 = round(location[0]), round(location[1])
        ix1 = max(ix0 + 1, round(location[0] + w * scale))
        iy1 = max(iy0 + 1, round(location[1] + h * scale))
        region = self.read_region((ix0, iy0), (ix1 - ix0, iy1 - iy0))
        if region.shape[:2] == (h, w):
            return region
        return np.ascontiguousarray(cv2.resize(region, (w, h), interpolation=cv2.INTER_AREA))


def draw_disk(
    img: npt.NDArray[np.uint8], cx: int, cy: int, r: int, colour: tuple[int, int, int]
) -> None:
    cv2.circle(img, (cx, cy), r, colour, thickness=-1)


def he_slide_image(width: int = 1024, height: int = 768, seed: int = 0) -> npt.NDArray[np.uint8]:
    """White background with two H&E-like blobs (pink stroma with purple nuclei)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 244, dtype=np.uint8)
    img = np.clip(img.astype(np.int16) + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
    for cx, cy, r in ((300, 300, 200), (760, 480, 180)):
        draw_disk(img, cx, cy, r, (225, 140, 190))
        for _ in range(r):
            ang, rad = rng.uniform(0, 2 * math.pi), r * math.sqrt(rng.uniform(0, 0.9))
            draw_disk(
                img, int(cx + rad * math.cos(ang)), int(cy + rad * math.sin(ang)), 5, (90, 50, 140)
            )
    return img


@pytest.fixture(scope="session")
def he_image() -> npt.NDArray[np.uint8]:
    return he_slide_image()


@pytest.fixture(scope="session")
def generated_slide(
    tmp_path_factory: pytest.TempPathFactory, he_image: npt.NDArray[np.uint8]
) -> Path:
    """A 1024 x 768 px, 0.5 µm/px, 2-level lossless generic TIFF of :func:`he_slide_image`."""
    from slidestream.wsi.synthetic import write_pyramidal_tiff

    path = tmp_path_factory.mktemp("tiling") / "generated.tif"
    return write_pyramidal_tiff(
        path, he_image, mpp=0.5, tile_size=128, compression="deflate", levels=3
    )
