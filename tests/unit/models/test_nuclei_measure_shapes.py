"""Vectorised nucleus measurements against scikit-image and hand-computed shapes."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import regionprops_table
from skimage.segmentation import watershed

from slidestream.models import measure_nuclei


def _touching_blobs(seed: int) -> np.ndarray:
    """A label image of touching, irregular blobs (a watershed of random seeds)."""
    rng = np.random.default_rng(seed)
    shape = (120, 150)
    fg = np.zeros(shape, bool)
    markers = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(1, 25):
        cy, cx = rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8)
        a, b = rng.uniform(2, 9, size=2)
        fg |= ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 <= 1.0
        markers[int(cy), int(cx)] = i
    labels = watershed(np.zeros(shape), markers, mask=fg)
    labels[0, :4] = 99  # a nucleus on the image border
    labels[60, 140] = 77  # a one-pixel nucleus
    return labels.astype(np.int32)


@pytest.mark.parametrize("seed", [0, 1])
def test_geometry_equals_scikit_image(seed: int) -> None:
    labels = _touching_blobs(seed)
    rgb = np.random.default_rng(seed).integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    mpp = 0.5
    m = measure_nuclei(labels, rgb, mpp)
    ref = regionprops_table(
        labels,
        intensity_image=rgb,
        properties=(
            "label",
            "centroid",
            "bbox",
            "area",
            "perimeter",
            "axis_major_length",
            "axis_minor_length",
            "eccentricity",
            "intensity_mean",
        ),
    )
    np.testing.assert_array_equal(m["label"], ref["label"])
    np.testing.assert_allclose(m["centroid_x"], ref["centroid-1"], atol=1e-9)
    np.testing.assert_allclose(m["centroid_y"], ref["centroid-0"], atol=1e-9)
    np.testing.assert_array_equal(m["bbox_x0"], ref["bbox-1"])
    np.testing.assert_array_equal(m["bbox_y1"], ref["bbox-2"])
    np.testing.assert_allclose(m["area_um2"], ref["area"] * mpp**2)
    np.testing.assert_allclose(m["perimeter_um"], ref["perimeter"] * mpp, atol=1e-9)
    np.testing.assert_allclose(m["major_axis_um"], ref["axis_major_length"] * mpp, atol=1e-9)
    np.testing.assert_allclose(m["minor_axis_um"], ref["axis_minor_length"] * mpp, atol=1e-9)
    np.testing.assert_allclose(m["eccentricity"], ref["eccentricity"], atol=1e-9)
    np.testing.assert_allclose(m["mean_g"], ref["intensity_mean-1"], atol=1e-9)
    assert np.all((m["solidity"] > 0) & (m["solidity"] <= 1))


def test_solidity_is_pixels_over_digital_convex_hull() -> None:
    labels = np.zeros((10, 12), np.int32)
    # an L: 2 x 4 column plus a 2 x 2 foot = 12 px; its pixel centres' convex hull holds 13
    labels[2:6, 2:4] = 1
    labels[4:6, 4:6] = 1
    labels[1:4, 8:11] = 2  # a square: digitally convex
    labels[7, 1] = 3  # one pixel
    labels[8, 3:9] = 4  # a one-pixel-wide bar: its hull is a segment of 6 pixel centres
    m = measure_nuclei(labels, np.zeros((10, 12, 3), np.uint8), 1.0)
    assert m["solidity"] == pytest.approx([12 / 13, 1.0, 1.0, 1.0])
    assert m["perimeter_um"][2] == 0.0 and m["area_um2"][2] == 1.0
