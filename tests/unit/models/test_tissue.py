"""Tissue classification: spec round-trip, TorchScript bring-your-own, training, shipped models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from slidestream.cli import cli
from slidestream.errors import ConfigError, WeightsError
from slidestream.models.tissue import (
    ModelSpec,
    TrainConfig,
    TransformStep,
    classify_image,
    image_patches,
    load_model_dir,
    load_tissue_model,
    read_spec,
    train_tissue,
    write_spec,
)
from slidestream.models.tissue._data import group_kfold


def _spec() -> ModelSpec:
    return ModelSpec(
        architecture="resnet34",
        class_names=("tumor", "stroma", "other"),
        patch_size_pixels=64,
        spacing_um_px=0.5,
        transform=(
            TransformStep(name="Resize", arguments={"size": 64}),
            TransformStep(name="ToTensor"),
            TransformStep(name="Normalize", arguments={"mean": [0.5] * 3, "std": [0.25] * 3}),
        ),
        name="demo",
        display_name="Demo model",
        class_colors=((255, 0, 0), (0, 255, 0), (0, 0, 255)),
        slidestream={"default_input_mpp": 0.25, "arch_args": {"x": [1, 2]}},
    )


def test_spec_round_trip_identical(tmp_path: Path) -> None:
    spec = _spec()
    path = write_spec(spec, tmp_path / "config.json")
    first = path.read_text()
    again = read_spec(tmp_path)
    assert again == spec
    write_spec(again, tmp_path / "b.json")
    assert (tmp_path / "b.json").read_text() == first
    data = json.loads(first)
    assert data["num_classes"] == 3 and data["spacing_um_px"] == 0.5
    assert list(data)[:7] == [
        "spec_version",
        "architecture",
        "num_classes",
        "class_names",
        "patch_size_pixels",
        "spacing_um_px",
        "transform",
    ]


def test_spec_rejects_inconsistent_config(tmp_path: Path) -> None:
    data = _spec().to_json()
    data["num_classes"] = 5
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="num_classes"):
        read_spec(tmp_path)


class _TinyScript(torch.nn.Module):
    """Logits from the mean red and green of a normalised batch: red -> tumor, green -> stroma."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(2, 3))
        return torch.stack([m[:, 0] * 10, m[:, 1] * 10, torch.zeros_like(m[:, 0])], dim=1)


def _save_png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> None:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = rgb
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_wsinfer_torchscript_runs_through_classify_cli(tmp_path: Path) -> None:
    model_dir = tmp_path / "wsinfer-model"
    model_dir.mkdir()
    spec = _spec()
    data = spec.to_json()
    for key in ("name", "display_name", "class_colors", "slidestream"):
        data.pop(key)  # a plain WSInfer config.json
    (model_dir / "config.json").write_text(json.dumps(data))
    torch.jit.save(torch.jit.script(_TinyScript()), str(model_dir / "torchscript_model.pt"))
    _save_png(tmp_path / "in" / "red.png", (250, 10, 10))
    _save_png(tmp_path / "in" / "green.png", (10, 250, 10))
    _save_png(tmp_path / "big_red.png", (250, 10, 10), size=(400, 300))  # tiled (> 1.5 patches)
    out = tmp_path / "preds.csv"
    res = CliRunner().invoke(
        cli,
        [
            "classify",
            str(tmp_path / "in"),
            str(tmp_path / "big_red.png"),
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--mpp",
            "0.5",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "prob_tumor", "prob_stroma", "prob_other"]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["red.png"]["label"] == "tumor"
    assert by_name["green.png"]["label"] == "stroma"
    assert by_name["big_red.png"]["label"] == "tumor"
    assert (
        abs(sum(float(v) for k, v in by_name["red.png"].items() if k.startswith("prob_")) - 1)
        < 1e-4
    )


def test_image_patches_whole_vs_tiled() -> None:
    spec = _spec()  # 64 px at 0.5 µm/px
    small = np.zeros((90, 70, 3), np.uint8)
    assert image_patches(small, 0.5, spec).shape == (1, 3, 64, 64)  # 90 <= 1.5 * 64: whole
    big = np.zeros((300, 200, 3), np.uint8)
    assert image_patches(big, 0.5, spec).shape == (5 * 4, 3, 64, 64)
    # at 0.15 µm/px it spans 90 x 60 model px: one patch again
    assert image_patches(big, 0.15, spec).shape == (1, 3, 64, 64)
    assert image_patches(big, 1.0, spec).shape == (10 * 7, 3, 64, 64)


def test_dihedral_tta_views_and_spec_switch() -> None:
    spec = _spec()
    assert spec.tta == "none"  # absent: off (WSInfer models)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    views = image_patches(img, 0.5, spec, tta=True)
    assert views.shape == (8, 3, 64, 64)
    base = views[0]
    expected = [
        base,
        base[:, :, ::-1],
        base[:, ::-1, :],
        base[:, ::-1, ::-1],
        base.transpose(0, 2, 1),
        base.transpose(0, 2, 1)[:, :, ::-1],
        base.transpose(0, 2, 1)[:, ::-1, :],
        base.transpose(0, 2, 1)[:, ::-1, ::-1],
    ]
    for got, want in zip(views, expected, strict=True):
        assert np.array_equal(got, want)
    # the 8 views are distinct and each is a symmetry of the square of the first
    assert len({v.tobytes() for v in views}) == 8
    on = ModelSpec.from_json({**spec.to_json(), "slidestream": {"tta": "dihedral"}})
    assert on.tta == "dihedral" and image_patches(img, 0.5, on).shape == (8, 3, 64, 64)
    assert image_patches(img, 0.5, on, tta=False).shape == (1, 3, 64, 64)
    with pytest.raises(ConfigError, match="tta"):
        _ = ModelSpec.from_json({**spec.to_json(), "slidestream": {"tta": "rot"}}).tta


def test_tta_probabilities_are_the_mean_over_views() -> None:
    model = load_tissue_model("lung-lc25000", "cpu")
    assert model.spec.tta == "dihedral"
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    views = image_patches(img, 0.75, model.spec)
    per_view = model.predict_proba(torch.from_numpy(views))
    assert np.allclose(classify_image(img, 0.75, model), per_view.mean(0), atol=1e-5)
    assert np.allclose(classify_image(img, 0.75, model, tta=False), per_view[0], atol=1e-5)


def test_group_kfold_is_group_disjoint() -> None:
    groups = [f"g{i // 3}" for i in range(30)]
    labels = np.array([i % 2 for i in range(30)], dtype=np.int64)
    folds = group_kfold(groups, labels, 4, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(30))
    seen = [{groups[i] for i in f} for f in folds]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not seen[a] & seen[b]


def _synthetic_classes(root: Path, rng: np.random.Generator) -> None:
    """Pink (eosin-rich) vs purple (haematoxylin-rich) noisy textures, 12 images each."""
    base = {"pinkish": (235, 150, 200), "purplish": (120, 80, 170)}
    for cls, rgb in base.items():
        for i in range(12):
            arr = np.clip(rng.normal(rgb, 18, size=(72, 72, 3)), 0, 255).astype(np.uint8)
            _save_png(root / cls / f"{i}.png", (0, 0, 0))
            Image.fromarray(arr).save(root / cls / f"{i}.png")


@pytest.mark.parametrize("cnn", [(), (8, 8)])
def test_training_loop_learns_synthetic_colour_classes(
    tmp_path: Path, cnn: tuple[int, ...]
) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    _synthetic_classes(tmp_path / "data", rng)
    cfg = TrainConfig(
        epochs=3,
        batch_size=16,
        samples_per_epoch=64,
        patch_size_pixels=48,
        spacing_um_px=1.0,
        views_per_image=4,
        val_fraction=0.25,
        cnn_channels=cnn,
        lr=1e-2,
        device="cpu",
        tta=bool(cnn),  # the written spec carries the setting
    )
    seen: list[tuple[int, int, dict[str, float]]] = []
    result = train_tissue(
        tmp_path / "data",
        tmp_path / "model",
        mpp=1.0,
        config=cfg,
        on_epoch=lambda e, n, stats: seen.append((e, n, dict(stats))),
    )
    assert result.val_report is not None and result.val_report.accuracy == 1.0
    assert [(e, n) for e, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert all({"loss", "val_balanced_accuracy"} <= stats.keys() for _, _, stats in seen)
    best = max(stats["val_balanced_accuracy"] for _, _, stats in seen)
    assert result.best_epoch == max(e for e, _, s in seen if s["val_balanced_accuracy"] == best)
    model = load_model_dir(tmp_path / "model")
    assert model.spec.tta == ("dihedral" if cnn else "none")
    assert model.class_names == ("pinkish", "purplish")
    probe = np.clip(rng.normal((120, 80, 170), 18, size=(60, 60, 3)), 0, 255).astype(np.uint8)
    assert classify_image(probe, 1.0, model).argmax() == 1
    batch = torch.from_numpy(probe.transpose(2, 0, 1)[None].copy())
    assert model.predict_proba(batch).shape == (1, 2)


def test_corrupt_weights_raise_weights_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    _synthetic_classes(tmp_path / "data", rng)
    cfg = TrainConfig(
        epochs=1,
        batch_size=8,
        samples_per_epoch=8,
        patch_size_pixels=32,
        spacing_um_px=1.0,
        views_per_image=2,
        val_fraction=0.0,
        device="cpu",
    )
    train_tissue(tmp_path / "data", tmp_path / "m", config=cfg)
    weights = tmp_path / "m" / "weights.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsError, match=r"weights\.safetensors.*re-"):
        load_model_dir(tmp_path / "m")
    # a valid file of the wrong shape (hash check off) also fails cleanly
    cfg_path = tmp_path / "m" / "config.json"
    conf = json.loads(cfg_path.read_text())
    conf["slidestream"].pop("weights_sha256")
    cfg_path.write_text(json.dumps(conf))
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(3, 3)}, str(weights))
    with pytest.raises(WeightsError) as info:
        load_model_dir(tmp_path / "m")
    assert "\n" not in str(info.value)


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("model_name", "rel_path", "expected"),
    [
        ("lung-lc25000", "tissue/lc25000_lung/lung_scc", "lung_squamous"),
        ("lung-lc25000", "tissue/lc25000_lung/lung_n", "lung_benign"),
        ("colon-glas", "tissue/glas/malignant", "malignant"),
        ("default", "tissue/lc25000_lung/lung_aca", "tumour"),
        ("tumour-pan-sn", "tissue/glas/malignant", "tumour"),
        ("colon-glas", "tissue/glas/benign", "benign"),
    ],
)
def test_shipped_models_classify_real_tiles(
    shared_data: Path, model_name: str, rel_path: str, expected: str
) -> None:
    model = load_tissue_model(model_name)
    files = sorted((shared_data / rel_path).iterdir())[:3]
    labels = []
    for f in files:
        rgb = np.asarray(Image.open(f).convert("RGB"))
        labels.append(model.class_names[int(classify_image(rgb, None, model).argmax())])
    assert labels.count(expected) >= 2, labels


def test_models_list_cli_shows_shipped_models() -> None:
    res = CliRunner().invoke(cli, ["models", "list", "--json", "--registry", "/nonexistent.json"])
    assert res.exit_code == 0, res.output
    names = [r["name"] for r in json.loads(res.output) if r["kind"] == "tissue"]
    assert "lung-lc25000" in names and "colon-glas" in names


def test_register_then_classify_and_evaluate_by_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    _synthetic_classes(tmp_path / "data", rng)
    cfg = TrainConfig(
        epochs=2,
        batch_size=8,
        samples_per_epoch=16,
        patch_size_pixels=32,
        spacing_um_px=1.0,
        views_per_image=2,
        val_fraction=0.0,
        device="cpu",
    )
    train_tissue(tmp_path / "data", tmp_path / "m", mpp=1.0, config=cfg)
    reg = tmp_path / "registry.json"
    runner = CliRunner()
    res = runner.invoke(
        cli, ["models", "register", str(tmp_path / "m"), "--name", "mine", "--registry", str(reg)]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["models", "list", "--json", "--registry", str(reg)])
    assert any(r["name"] == "mine" and r["origin"] == "user" for r in json.loads(res.output))
    res = runner.invoke(
        cli,
        [
            "evaluate",
            "tissue",
            "--data",
            str(tmp_path / "data"),
            "--model",
            "mine",
            "--json",
            "--registry",
            str(reg),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["n"] == 24 and report["accuracy"] >= 0.9
    assert set(report["per_class"]) == {"pinkish", "purplish"}
    res = runner.invoke(
        cli,
        [
            "classify",
            str(tmp_path / "data" / "pinkish"),
            "--model",
            "nope",
            "--out",
            str(tmp_path / "p.csv"),
            "--registry",
            str(reg),
        ],
    )
    assert res.exit_code == 1 and "nope" in res.output
