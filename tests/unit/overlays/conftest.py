"""Fixtures for overlays tests: a fake ``measure_nuclei`` and a synthetic nucleus label image."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from skimage.measure import regionprops_table

MEASURE_KEYS = (
    "label", "centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
    "area_um2", "perimeter_um", "equivalent_diameter_um", "major_axis_um", "minor_axis_um",
    "eccentricity", "solidity", "circularity", "mean_r", "mean_g", "mean_b",
    "hematoxylin_od", "eosin_od",
)  # fmt: skip


def fake_measure(
    labels: npt.NDArray[np.int32], rgb: npt.NDArray[np.uint8], mpp: float
) -> dict[str, npt.NDArray[Any]]:
    """Stand-in for ``slidestream.models.measure_nuclei`` with the agreed keys (cheap subset)."""
    p = regionprops_table(labels, properties=("label", "centroid", "bbox", "area"))
    n = len(p["label"])
    area_um2 = p["area"].astype(np.float64) * mpp * mpp
    rng = np.random.default_rng(n)
    out: dict[str, npt.NDArray[Any]] = {
        "label": p["label"].astype(np.int32),
        "centroid_x": p["centroid-1"],
        "centroid_y": p["centroid-0"],
        "bbox_x0": p["bbox-1"].astype(np.float64),
        "bbox_y0": p["bbox-0"].astype(np.float64),
        "bbox_x1": p["bbox-3"].astype(np.float64),
        "bbox_y1": p["bbox-2"].astype(np.float64),
        "area_um2": area_um2,
    }
    for key in MEASURE_KEYS[8:]:
        out[key] = rng.uniform(0.1, 1.0, n)
    out["equivalent_diameter_um"] = 2 * np.sqrt(area_um2 / np.pi)
    return out


def synthetic_labels(
    shape: tuple[int, int], n: int, seed: int = 0, max_radius: int = 9
) -> npt.NDArray[np.int32]:
    """Non-overlapping random ellipses, labels 1..k (k <= n), drawn with OpenCV."""
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, np.int32)
    k = 0
    for _ in range(n):
        a, b = rng.integers(3, max_radius + 1, 2)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        mask = np.zeros(shape, np.uint8)
        cv2.ellipse(mask, (int(cx), int(cy)), (int(a), int(b)), float(rng.uniform(0, 180)),
                    0, 360, 1, -1)  # fmt: skip
        mask_b = mask.astype(bool)
        if mask_b.any() and not (labels[mask_b] > 0).any():
            k += 1
            labels[mask_b] = k
    return labels


@pytest.fixture(scope="session")
def slide_labels() -> npt.NDArray[np.int32]:
    """A 480 x 400 label image with a few hundred nuclei straddling every tile seam."""
    return synthetic_labels((400, 480), 700, seed=1)


@pytest.fixture(scope="session")
def measure() -> Any:
    """The fake ``measure_nuclei``."""
    return fake_measure


@pytest.fixture(scope="session")
def make_labels() -> Any:
    """``synthetic_labels(shape, n, seed=0, max_radius=9)``."""
    return synthetic_labels
