"""Ensembles of tissue models (combine, load, weighted-mean probabilities, bad members) and the
out-of-fold probabilities they are chosen with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from slidestream.cli import cli
from slidestream.errors import ConfigError, WeightsError
from slidestream.models.tissue import (
    ENSEMBLE_ARCHITECTURE,
    DataSource,
    TissueEnsemble,
    TrainConfig,
    classification_report,
    classify_image,
    combine_models,
    cross_validate_tissue,
    load_model_dir,
    out_of_fold_probabilities,
    train_tissue,
)


def _data(root: Path) -> None:
    """Pink vs purple noisy textures, 8 images each, 64 x 64 px."""
    rng = np.random.default_rng(3)
    for cls, rgb in {"pinkish": (235, 150, 200), "purplish": (120, 80, 170)}.items():
        (root / cls).mkdir(parents=True)
        for i in range(8):
            arr = np.clip(rng.normal(rgb, 18, size=(64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")


def _train(data: Path, out: Path, *, mpp: float, patch: int, cnn: tuple[int, ...]) -> Path:
    cfg = TrainConfig(
        epochs=2,
        batch_size=8,
        samples_per_epoch=16,
        patch_size_pixels=patch,
        spacing_um_px=mpp,
        views_per_image=2,
        textons=0 if cnn else 8,
        cnn_channels=cnn,
        fixed_features=not cnn,
        val_fraction=0.0,
        device="cpu",
        tta=not cnn,
    )
    train_tissue(data, out, mpp=1.0, config=cfg, name=out.name)
    return out


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ens")
    _data(root / "data")
    fine = _train(root / "data", root / "fine", mpp=1.0, patch=64, cnn=())
    coarse = _train(root / "data", root / "coarse", mpp=2.0, patch=32, cnn=(8, 8))
    return fine, coarse


def test_ensemble_is_the_weighted_mean_of_its_members(
    members: tuple[Path, Path], tmp_path: Path
) -> None:
    fine, coarse = members
    spec = combine_models([fine, coarse], [3.0, 1.0], tmp_path / "ens", name="ens")
    assert spec.architecture == ENSEMBLE_ARCHITECTURE
    assert (spec.spacing_um_px, spec.patch_size_pixels) == (1.0, 64)
    assert spec.tta == "dihedral"  # from the finest member
    args = spec.slidestream["arch_args"]["members"]
    assert [m["downsample"] for m in args] == [1, 2]
    model = load_model_dir(tmp_path / "ens")
    assert isinstance(model.module, TissueEnsemble)
    m_fine, m_coarse = load_model_dir(fine), load_model_dir(coarse)
    rng = np.random.default_rng(5)
    batch = rng.integers(0, 256, size=(4, 3, 64, 64), dtype=np.uint8)
    p_fine = m_fine.predict_proba(batch)
    # the coarse member sees the 2x2 area average, as its own resize to 32 px would give it
    pooled = F.avg_pool2d(torch.from_numpy(batch).float(), 2)
    p_coarse = torch.softmax(m_coarse.module(pooled / 255.0), 1).detach().numpy()
    expected = 0.75 * p_fine + 0.25 * p_coarse
    np.testing.assert_allclose(model.predict_proba(batch), expected, atol=1e-5)
    assert model.weights_sha256 == spec.slidestream["weights_sha256"]
    image = np.clip(rng.normal((120, 80, 170), 18, size=(64, 64, 3)), 0, 255).astype(np.uint8)
    assert classify_image(image, 1.0, model).shape == (2,)


def test_ensemble_cli_and_member_checks(members: tuple[Path, Path], tmp_path: Path) -> None:
    fine, coarse = members
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "models",
            "ensemble",
            str(fine),
            str(coarse),
            "--weights",
            "0.6,0.4",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert res.exit_code == 0, res.output
    conf = json.loads((tmp_path / "e" / "config.json").read_text())
    assert [m["weight"] for m in conf["slidestream"]["arch_args"]["members"]] == [0.6, 0.4]
    res = runner.invoke(
        cli, ["models", "ensemble", str(fine), str(coarse), "--weights", "1", "--out", "x"]
    )
    assert res.exit_code != 0 and "1 weights for 2 model folders" in res.output
    # classes must agree
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "weights.safetensors"):
        (bad / name).write_bytes((coarse / name).read_bytes())
    conf = json.loads((bad / "config.json").read_text())
    conf["class_names"] = ["a", "b"]
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="differ from"):
        combine_models([fine, bad], [1, 1], tmp_path / "never")
    # members must expect the same stain normalisation
    conf["class_names"] = ["pinkish", "purplish"]
    conf["slidestream"]["stain_norm"] = {"scope": "image", "reference": [1.0, 1.0]}
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="same --stain-norm"):
        combine_models([fine, bad], [1, 1], tmp_path / "never")
    del conf["slidestream"]["stain_norm"]
    # a member whose patch does not cover the same field of view
    conf["patch_size_pixels"] = 30
    conf["transform"][0]["arguments"]["size"] = 30
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="--patch-size-px 32"):
        combine_models([fine, bad], [1, 1], tmp_path / "never")
    # a member with corrupt weights
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((fine / "config.json").read_bytes())
    raw = (fine / "weights.safetensors").read_bytes()
    (broken / "weights.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsError, match="broken"):
        combine_models([broken, coarse], [1, 1], tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_out_of_fold_probabilities_match_cross_validation(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    _data(tmp_path / "data")
    cfg = TrainConfig(
        epochs=3,
        batch_size=8,
        samples_per_epoch=32,
        patch_size_pixels=64,
        spacing_um_px=1.0,
        views_per_image=2,
        textons=8,
        val_fraction=0.0,
        device="cpu",
    )
    source = DataSource(data_dir=tmp_path / "data", mpp=1.0)
    labels, probs, classes, fold = out_of_fold_probabilities([source], n_folds=4, config=cfg)
    assert classes == ("pinkish", "purplish")
    assert sorted(np.bincount(fold)) == [4, 4, 4, 4]
    assert probs.shape == (16, 2) and labels.shape == (16,)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    pred = probs.argmax(1)
    assert (pred == labels).mean() >= 0.9  # every image classified by a model that never saw it
    cv = cross_validate_tissue([source], n_folds=4, config=cfg)
    assert cv.pooled.balanced_accuracy == pytest.approx(
        classification_report(labels, pred, classes).balanced_accuracy
    )
