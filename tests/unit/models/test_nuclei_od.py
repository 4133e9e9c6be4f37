"""Stain optical densities of nucleus measurements are decadic ODs (not rgb2hed's OD / 6)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb_from_hed

from slidestream.models import measure_nuclei


@pytest.mark.parametrize("od_h", [0.3, 1.0])
def test_pure_hematoxylin_od(od_h: float) -> None:
    pixel = np.round(255.0 * 10.0 ** (-od_h * rgb_from_hed[0])).astype(np.uint8)
    rgb = np.broadcast_to(pixel, (24, 24, 3)).copy()
    labels = np.zeros((24, 24), np.int32)
    labels[4:20, 4:20] = 1
    out = measure_nuclei(labels, rgb, 0.5)
    assert out["hematoxylin_od"][0] == pytest.approx(od_h, abs=0.02)
    assert abs(out["eosin_od"][0]) < 0.05
