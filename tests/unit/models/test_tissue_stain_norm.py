"""Image-level H&E intensity normalisation: stain invariance, the spec entry, training, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from slidestream.cli import cli
from slidestream.errors import ConfigError
from slidestream.models.tissue import TrainConfig, classify_image, load_model_dir, train_tissue
from slidestream.models.tissue._runner import image_patches
from slidestream.models.tissue._stain_norm import (
    GAIN_RANGE,
    RGB_FROM_HED,
    he_gains,
    image_stain_reference,
    pooled_he_levels,
    rescale_he,
)

_RGB_FROM_HED_UNIT = (RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)).double().numpy()


def _nuclei_od(
    rng: np.random.Generator, size: int, n: int, radii: tuple[float, float]
) -> npt.NDArray[np.float64]:
    """Haematoxylin OD ``(size, size)``: ``n`` round Gaussian 'nuclei' (peak <= 1) on a faint
    background."""
    yy, xx = np.mgrid[:size, :size]
    h = np.full((size, size), 0.05)
    for _ in range(n):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(*radii)
        h += 0.9 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    return np.minimum(h, 1.0)  # overlapping nuclei do not stack up


def _rgb_of(h: npt.NDArray[np.float64], e: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """uint8 RGB ``(H, W, 3)`` of H and E concentrations (Ruifrok vectors, no residual)."""
    od = np.stack([h, e, np.zeros_like(h)], axis=-1) @ _RGB_FROM_HED_UNIT
    return np.clip(256.0 * np.exp(-od) - 1.0, 0, 255).round().astype(np.uint8)


def _he_patches(seed: int, h_gain: float = 1.0, e_gain: float = 1.0, n: int = 3) -> torch.Tensor:
    """``n`` synthetic H&E patches ``(n, 3, 64, 64)`` uint8 of one 'image': round nuclei (H) on
    an eosin background, both stain concentrations multiplied by the given gains."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h = _nuclei_od(rng, 64, 12, (3.0, 6.0))
        e = 0.35 + 0.15 * rng.random((64, 64))
        out.append(_rgb_of(h * h_gain, e * e_gain).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def test_one_gain_per_image_brings_differently_stained_copies_together() -> None:
    reference = torch.tensor([0.8, 0.4])
    copies = [_he_patches(0), _he_patches(0, 1.6, 0.7), _he_patches(0, 0.6, 1.3)]
    levels = torch.stack([pooled_he_levels(c) for c in copies])
    assert levels[:, 0].max() / levels[:, 0].min() > 2.0  # H differs 2.7x between the copies
    out = [rescale_he(c, he_gains(lv, reference)) for c, lv in zip(copies, levels, strict=True)]
    assert all(o.dtype == torch.uint8 and o.shape == copies[0].shape for o in out)
    after = torch.stack([pooled_he_levels(o) for o in out])
    torch.testing.assert_close(after, reference.expand(3, 2), atol=0.03, rtol=0.0)
    for o in out[1:]:  # the three differently stained copies become (nearly) the same image
        assert (o.float() - out[0].float()).abs().mean() < 3.0
    assert (copies[1].float() - copies[0].float()).abs().mean() > 12.0
    # every patch of an image gets the same gains: a nucleus-free patch is not brightened alone
    pale = copies[0].clone()
    nucleus_free = _rgb_of(np.full((64, 64), 0.05), np.full((64, 64), 0.4))
    pale[0] = torch.from_numpy(nucleus_free.transpose(2, 0, 1).copy())
    gains = he_gains(pooled_he_levels(pale), reference)
    rescaled = rescale_he(pale[:1], gains)
    assert pooled_he_levels(rescaled)[0] < 0.5 * reference[0]


def test_levels_use_tissue_pixels_and_gains_are_bounded() -> None:
    patch = _he_patches(1, n=1)
    with_background = patch.clone()
    with_background[..., :32] = 255  # half the patch is white background
    torch.testing.assert_close(
        pooled_he_levels(with_background), pooled_he_levels(patch[..., 32:]), atol=0.02, rtol=0.0
    )
    gains = he_gains(torch.tensor([0.01, 10.0]), torch.tensor([5.0, 0.1]))
    torch.testing.assert_close(gains, torch.tensor([GAIN_RANGE[1], GAIN_RANGE[0]]))


def test_spec_entry_is_validated() -> None:
    assert image_stain_reference({}) is None
    ref = image_stain_reference({"stain_norm": {"scope": "image", "reference": [1.2, 0.9]}})
    assert ref is not None
    torch.testing.assert_close(ref, torch.tensor([1.2, 0.9]))
    for bad in ({"scope": "patch", "reference": [1, 1]}, {"scope": "image"}, [1.0, 1.0]):
        with pytest.raises(ConfigError, match=r"stain_norm.*fix or remove"):
            image_stain_reference({"stain_norm": bad})


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
def test_trained_stain_norm_model_normalises_every_image(
    tmp_path: Path, cnn: tuple[int, ...]
) -> None:
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
    entry = result.spec.slidestream["stain_norm"]
    assert entry["scope"] == "image" and all(v > 0 for v in entry["reference"])
    model = load_model_dir(tmp_path / "m")
    reference = model.stain_reference
    assert reference is not None
    image = np.asarray(Image.open(tmp_path / "data" / "large_nuclei" / "0.png"))
    patches = image_patches(image, 1.0, model.spec, tta=False)
    gains = model.stain_gains(patches)
    assert gains is not None
    torch.testing.assert_close(gains, he_gains(pooled_he_levels(patches), reference))
    # classify_image = the mean over the image's patches, all rescaled with the image's gains
    expected = model.predict_proba(rescale_he(torch.from_numpy(patches), gains)).mean(axis=0)
    np.testing.assert_allclose(classify_image(image, 1.0, model, tta=False), expected, atol=1e-6)
    # the same image stained twice as dark is classified (almost) the same
    hed = -np.log((image.astype(np.float64) + 1.0) / 256.0) @ np.linalg.inv(_RGB_FROM_HED_UNIT)
    darker = _rgb_of(2.0 * hed[..., 0], 2.0 * hed[..., 1])
    np.testing.assert_allclose(
        classify_image(darker, 1.0, model), classify_image(image, 1.0, model), atol=0.05
    )


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
    assert config["slidestream"]["stain_norm"]["scope"] == "image"
