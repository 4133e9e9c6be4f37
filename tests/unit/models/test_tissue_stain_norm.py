"""Per-patch H&E intensity normalisation: stain invariance, storage, training and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from slidestream.cli import cli
from slidestream.models.tissue import TrainConfig, classify_image, load_model_dir, train_tissue
from slidestream.models.tissue._network import _RGB_FROM_HED, TissueNet
from slidestream.models.tissue._stain_norm import PERCENTILE, he_percentiles, normalise_he

_RGB_FROM_HED_UNIT = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED_UNIT)


def _nuclei_od(
    rng: np.random.Generator, size: int, n: int, radii: tuple[float, float]
) -> npt.NDArray[np.float64]:
    """Haematoxylin OD ``(size, size)``: ``n`` round Gaussian 'nuclei' on a faint background."""
    yy, xx = np.mgrid[:size, :size]
    h = np.full((size, size), 0.05)
    for _ in range(n):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(*radii)
        h += 0.9 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    return h


def _rgb_of(h: npt.NDArray[np.float64], e: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """uint8 RGB ``(H, W, 3)`` of H and E concentrations (Ruifrok vectors, no residual)."""
    od = np.stack([h, e, np.zeros_like(h)], axis=-1) @ _RGB_FROM_HED_UNIT.double().numpy()
    return np.clip(256.0 * np.exp(-od) - 1.0, 0, 255).round().astype(np.uint8)


def _he_patch(seed: int, h_gain: float = 1.0, e_gain: float = 1.0, size: int = 64) -> torch.Tensor:
    """Synthetic H&E patch ``(1, 3, size, size)`` in [0, 1]: round 'nuclei' (H) on an eosin
    background, with both stain concentrations multiplied by the given gains."""
    rng = np.random.default_rng(seed)
    h = _nuclei_od(rng, size, 12, (3.0, 6.0))
    e = 0.35 + 0.15 * rng.random((size, size))
    rgb = _rgb_of(h * h_gain, e * e_gain) / 255.0
    return torch.from_numpy(rgb.transpose(2, 0, 1)[None].copy()).float()


def test_normalised_patches_match_the_reference_whatever_the_staining_strength() -> None:
    reference = torch.tensor([0.8, 0.4])
    patches = torch.cat([_he_patch(0), _he_patch(0, 1.6, 0.7), _he_patch(0, 0.6, 1.3)])
    before = he_percentiles(patches, _HED_FROM_RGB)
    assert before[:, 0].max() / before[:, 0].min() > 2.0  # H differs 2.7x between the copies
    out = normalise_he(patches, _HED_FROM_RGB, reference)
    assert out.shape == patches.shape and out.dtype == torch.float32
    after = he_percentiles(out, _HED_FROM_RGB)
    torch.testing.assert_close(after, reference.expand(3, 2), atol=0.03, rtol=0.0)
    # the three differently stained copies become (nearly) the same image
    assert (out[1] - out[0]).abs().mean() < 0.01 and (out[2] - out[0]).abs().mean() < 0.01
    assert (patches[1] - patches[0]).abs().mean() > 0.05


def test_percentile_uses_tissue_pixels_and_gains_are_bounded() -> None:
    patch = _he_patch(1)
    blank = patch.clone()
    blank[..., :32] = 1.0  # half the patch is white background
    torch.testing.assert_close(
        he_percentiles(blank, _HED_FROM_RGB), he_percentiles(patch[..., 32:], _HED_FROM_RGB)
    )
    pale = _he_patch(1, 0.01, 0.01)  # almost no stain: gains stop at the upper bound (4)
    out = normalise_he(pale, _HED_FROM_RGB, torch.tensor([5.0, 5.0]))
    ratio = he_percentiles(out, _HED_FROM_RGB) / he_percentiles(pale, _HED_FROM_RGB)
    torch.testing.assert_close(ratio, torch.full((1, 2), 4.0), atol=0.2, rtol=0.0)
    assert 0.5 < PERCENTILE < 1.0


def test_stain_norm_network_is_stain_invariant_and_stores_its_reference() -> None:
    torch.manual_seed(0)
    plain = TissueNet(num_classes=2, cnn_channels=(), textons=0)
    normed = TissueNet(num_classes=2, cnn_channels=(), textons=0, stain_norm=True)
    assert "stain_reference" not in plain.state_dict()  # older weight files load strictly
    crops = torch.cat([_he_patch(s) for s in range(4)])
    normed.fit_stain_reference(crops)
    torch.testing.assert_close(
        normed.stain_reference, he_percentiles(crops, _HED_FROM_RGB).median(dim=0).values
    )
    a, b = _he_patch(7), _he_patch(7, 1.5, 0.75)
    gap_plain = (plain.features(a) - plain.features(b)).abs().sum()
    gap_normed = (normed.features(a) - normed.features(b)).abs().sum()
    assert gap_normed < 0.1 * gap_plain
    torch.testing.assert_close(plain.normalise_stains(a), a)  # off: the identity


def _synthetic_he(root: Path, rng: np.random.Generator) -> None:
    """Two classes told apart by nucleus size, each image at a random staining strength."""
    for cls, radius in (("small_nuclei", 2.5), ("large_nuclei", 6.0)):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            h = _nuclei_od(rng, 56, 10, (radius, radius))
            gain = rng.uniform(0.6, 1.6)
            rgb = _rgb_of(h * gain, np.full_like(h, 0.35 * gain))
            Image.fromarray(rgb).save(root / cls / f"{i}.png")


@pytest.mark.parametrize("cnn", [(), (8, 8)])  # feature-bank path and end-to-end (fit_fast) path
def test_trained_stain_norm_model_round_trips(tmp_path: Path, cnn: tuple[int, ...]) -> None:
    torch.set_num_threads(1)
    _synthetic_he(tmp_path / "data", np.random.default_rng(0))
    cfg = TrainConfig(
        epochs=2,
        batch_size=8,
        samples_per_epoch=16,
        patch_size_pixels=48,
        spacing_um_px=1.0,
        views_per_image=2,
        textons=8,
        cnn_channels=cnn,
        val_fraction=0.0,
        device="cpu",
        stain_norm=True,
    )
    result = train_tissue(tmp_path / "data", tmp_path / "m", mpp=1.0, config=cfg)
    assert result.spec.slidestream["arch_args"]["stain_norm"] is True
    model = load_model_dir(tmp_path / "m")
    net = model.module
    assert isinstance(net, TissueNet) and net.stain_norm
    ref = net.stain_reference
    assert bool(torch.isfinite(ref).all()) and bool((ref > 0).all())
    assert not torch.equal(ref, torch.ones(2))  # fitted, not the initial value
    image = np.asarray(Image.open(tmp_path / "data" / "large_nuclei" / "0.png"))
    p1 = classify_image(image, 1.0, model)
    p2 = classify_image(image, 1.0, load_model_dir(tmp_path / "m"))
    np.testing.assert_array_equal(p1, p2)
    assert "stain_norm" not in replace(cfg, stain_norm=False).arch_args()  # off: not stored


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_train_cli_stain_norm_option(tmp_path: Path) -> None:
    _synthetic_he(tmp_path / "data", np.random.default_rng(1))
    args = [
        "train", "tissue", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "m"),
        "--mpp", "1.0", "--model-mpp", "1.0", "--patch-size-px", "48", "--epochs", "1",
        "--batch-size", "8", "--samples-per-epoch", "8", "--views-per-image", "2",
        "--textons", "0", "--val-fraction", "0", "--device", "cpu", "--no-progress",
        "--stain-norm",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["slidestream"]["arch_args"]["stain_norm"] is True
