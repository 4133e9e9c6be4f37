"""Fixtures for slidestream.wsi: small generated pyramidal TIFFs with known content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from slidestream.wsi.synthetic import write_pyramidal_tiff

TINY_MPP = 0.5


def make_pattern(width: int, height: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """Blocky random RGB image (8 px blocks) plus a gradient: every tile distinct."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(-(-height // 8), -(-width // 8), 3), dtype=np.uint8)
    image = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:height, :width]
    image[..., 0] = ((np.arange(width)[None, :] * 255) // max(1, width - 1)).astype(np.uint8)
    return np.ascontiguousarray(image)


def halve(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Reference 2x2 mean (round half up) with floor size, as the writer builds levels."""
    h, w = image.shape[0] // 2, image.shape[1] // 2
    block = image[: 2 * h, : 2 * w].astype(np.uint16)
    total = block[0::2, 0::2] + block[1::2, 0::2] + block[0::2, 1::2] + block[1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_image() -> npt.NDArray[np.uint8]:
    """Level-0 pixels of the tiny slides (333 x 250 px, not a multiple of the tile size)."""
    return make_pattern(333, 250)


@pytest.fixture(scope="session")
def tiny_deflate(
    tmp_path_factory: pytest.TempPathFactory, tiny_image: npt.NDArray[np.uint8]
) -> Path:
    """Lossless generic pyramidal TIFF: 64 px tiles, 3 levels, 0.5 µm/px."""
    path = tmp_path_factory.mktemp("wsi") / "tiny_deflate.tif"
    return write_pyramidal_tiff(
        path, tiny_image, mpp=TINY_MPP, tile_size=64, compression="deflate", levels=3
    )


@pytest.fixture(scope="session")
def tiny_jpeg_aperio(
    tmp_path_factory: pytest.TempPathFactory, tiny_image: npt.NDArray[np.uint8]
) -> Path:
    """JPEG Aperio-style pyramid (OpenSlide vendor ``aperio``)."""
    path = tmp_path_factory.mktemp("wsi") / "tiny_aperio.svs"
    return write_pyramidal_tiff(
        path, tiny_image, mpp=TINY_MPP, tile_size=64, compression="jpeg", vendor_style="aperio"
    )
