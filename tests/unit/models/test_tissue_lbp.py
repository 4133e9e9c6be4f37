"""TissueNet's local-binary-pattern features equal scikit-image's uniform LBP histograms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.feature import local_binary_pattern

from slidestream.models.tissue._network import _LBP_SCALES, TissueNet


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lbp_histograms_match_scikit_image() -> None:
    rng = np.random.default_rng(3)
    h_od = gaussian_filter(rng.random((48, 56)), 1.0)
    e_od = gaussian_filter(rng.random((48, 56)), 2.0)
    st = torch.zeros(1, 4, 48, 56, dtype=torch.float64)
    st[0, 0], st[0, 1] = torch.from_numpy(h_od), torch.from_numpy(e_od)
    net = TissueNet(num_classes=2, cnn_channels=(), lbp=True).double()
    got = net.lbp_features(st)[0].numpy()
    expected = []
    for points, radius in _LBP_SCALES:
        r = int(np.ceil(radius))
        for image in (h_od, e_od):
            codes = local_binary_pattern(image, points, radius, method="uniform")[r:-r, r:-r]
            codes = codes[::2, ::2]  # the features use every second centre
            hist = np.bincount(codes.astype(int).ravel(), minlength=points + 2) / codes.size
            expected.append(np.sqrt(hist))
    # equal up to a pixel or two whose neighbour ties the centre within float rounding
    np.testing.assert_allclose(got**2, np.concatenate(expected) ** 2, atol=2.5 / (21 * 25))


def test_lbp_adds_its_features_and_changes_nothing_else() -> None:
    plain = TissueNet(num_classes=3, cnn_channels=(), textons=0)
    with_lbp = TissueNet(num_classes=3, cnn_channels=(), textons=0, lbp=True)
    assert with_lbp.fixed_feature_count() == plain.fixed_feature_count() + 76
    rgb = torch.rand(2, 3, 64, 64)
    a = plain.fixed_features(rgb, plain.stains(rgb))
    b = with_lbp.fixed_features(rgb, with_lbp.stains(rgb))
    assert b.shape == (2, with_lbp.fixed_feature_count())
    torch.testing.assert_close(b[:, : a.shape[1]], a)
    assert not any(k.startswith("lbp") for k in with_lbp.state_dict())  # nothing new to store
