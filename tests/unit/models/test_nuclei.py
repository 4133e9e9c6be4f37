"""Tests of slidestream.models.nuclei: post-processing, metrics, measurements, weights, training."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slidestream.errors import ConfigError, WeightsError
from slidestream.models.nuclei import (
    SHIPPED_WEIGHTS,
    ClassicalSegmenter,
    NetworkConfig,
    NucleusModel,
    PostprocessConfig,
    TrainConfig,
    list_nuclei_models,
    load_nuclei_model,
    make_targets,
    measure_nuclei,
    postprocess_maps,
    score_instances,
    train_nuclei,
)

TINY = NetworkConfig(features=(4, 4, 8, 8, 16, 4))


#: The retired wide U-Net (outside the package since issue 19): a second architecture to load.
RETIRED_WIDE = (
    Path(__file__).resolve().parents[3] / "research" / "weights" / "nuclei-unet-wide.safetensors"
)


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(yy - cy, xx - cx) <= r


# --- post-processing ---------------------------------------------------------------------------


def test_postprocess_splits_two_touching_discs() -> None:
    shape = (64, 96)
    labels = np.zeros(shape, np.int32)
    labels[_disc(shape, 32, 30, 14)] = 1
    labels[_disc(shape, 32, 56, 14) & (labels == 0)] = 2  # overlapping discs touch along a chord
    maps = make_targets(labels)
    maps[1] = 0.0  # no boundary help: the distance map alone must split them
    pred = postprocess_maps(maps)
    assert pred.dtype == np.int32 and pred.shape == shape
    assert pred.max() == 2
    scores = score_instances(labels, pred)
    assert scores.n_matched == 2 and scores.aji > 0.9


def test_postprocess_is_picklable_and_removes_small() -> None:
    model_pp = pickle.loads(pickle.dumps(postprocess_maps))
    maps = np.zeros((3, 32, 32), np.float32)
    maps[:, 2:4, 2:4] = 1.0  # 4 px: below min_size_px
    assert model_pp(maps).max() == 0


def test_upsampled_postprocess_splits_discs_at_twice_the_resolution() -> None:
    shape = (64, 96)
    labels = np.zeros(shape, np.int32)
    labels[_disc(shape, 32, 30, 14)] = 1
    labels[_disc(shape, 32, 56, 14) & (labels == 0)] = 2
    maps = make_targets(labels)
    maps[1] = 0.0
    config = PostprocessConfig(fg_threshold=0.5, marker_threshold=0.4, upsample=2)
    pred = postprocess_maps(maps, config=config)
    assert pred.shape == (128, 192) and pred.max() == 2
    # Each instance at 2x covers about 4x its working-resolution area (bicubic edges).
    fine_true = np.kron(labels, np.ones((2, 2), np.int32))
    scores = score_instances(fine_true, pred)
    assert scores.n_matched == 2 and scores.aji > 0.85
    # Minimum sizes stay in working pixels: a 3 x 3 px blob (9 px < 12) is removed at 2x too.
    small = np.zeros((3, 32, 32), np.float32)
    small[:, 10:13, 10:13] = 1.0
    cfg = PostprocessConfig(min_size_px=12, min_marker_px=1, upsample=2)
    assert postprocess_maps(small, config=cfg).max() == 0
    assert postprocess_maps(small, config=dataclasses.replace(cfg, min_size_px=4)).max() == 1


def test_upsample_must_be_a_small_integer() -> None:
    with pytest.raises(ConfigError, match="upsample"):
        PostprocessConfig(upsample=0)
    with pytest.raises(ConfigError, match="upsample"):
        PostprocessConfig(upsample=1.5)  # type: ignore[arg-type]


# --- metrics (hand-computed) --------------------------------------------------------------------


def _sq(a: np.ndarray, y: slice, x: slice, v: int) -> None:
    a[y, x] = v


def test_metrics_perfect_and_partial() -> None:
    t = np.zeros((8, 8), np.int32)
    _sq(t, slice(0, 4), slice(0, 4), 5)
    s = score_instances(t, t)
    assert (s.aji, s.pq, s.f1, s.dice) == (1.0, 1.0, 1.0, 1.0)
    p = np.zeros_like(t)
    _sq(p, slice(0, 4), slice(0, 3), 1)  # 12 of 16 px
    s = score_instances(t, p)
    assert s.aji == pytest.approx(0.75) and s.pq == pytest.approx(0.75)
    assert s.dq == 1.0 and s.dice == pytest.approx(24 / 28)


def test_metrics_split() -> None:
    t = np.zeros((8, 8), np.int32)
    _sq(t, slice(0, 4), slice(0, 4), 1)
    p = np.zeros_like(t)
    _sq(p, slice(0, 4), slice(0, 2), 1)
    _sq(p, slice(0, 4), slice(2, 4), 2)
    s = score_instances(t, p)
    assert s.aji == pytest.approx(8 / 24)  # best half: I=8, U=16; other half adds 8
    assert s.pq == 0.0 and s.n_matched == 0 and s.dice == 1.0


def test_metrics_merged() -> None:
    t = np.zeros((8, 8), np.int32)
    _sq(t, slice(0, 4), slice(0, 4), 1)
    _sq(t, slice(0, 4), slice(4, 8), 2)
    p = (t > 0).astype(np.int32)
    s = score_instances(t, p)
    assert s.aji == pytest.approx(32 / 64)
    assert s.pq == 0.0 and s.dq == 0.0


def test_metrics_missed_and_spurious() -> None:
    t = np.zeros((10, 10), np.int32)
    _sq(t, slice(0, 4), slice(0, 4), 1)
    _sq(t, slice(6, 10), slice(6, 10), 2)
    p = np.zeros_like(t)
    _sq(p, slice(0, 4), slice(0, 4), 3)
    s = score_instances(t, p)  # one missed
    assert s.aji == pytest.approx(16 / 32)
    assert s.dq == pytest.approx(2 / 3) and s.sq == 1.0 and s.pq == pytest.approx(2 / 3)
    t2 = np.where(t == 1, 1, 0)
    p2 = p.copy()
    _sq(p2, slice(7, 9), slice(7, 9), 4)  # one spurious, 4 px
    s = score_instances(t2, p2)
    assert s.aji == pytest.approx(16 / 20)
    assert s.pq == pytest.approx(2 / 3) and s.n_pred == 2


# --- measurements -------------------------------------------------------------------------------


def test_measure_ellipses_match_analytic_values() -> None:
    shape = (200, 260)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    labels = np.zeros(shape, np.int32)
    specs = [(60.0, 70.0, 40.0, 20.0, 0.0), (140.0, 180.0, 36.0, 24.0, np.pi / 5)]
    for i, (cy, cx, a, b, th) in enumerate(specs, start=1):
        dx, dy = xx - cx, yy - cy
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        labels[(u / a) ** 2 + (v / b) ** 2 <= 1.0] = i
    rgb = np.full((*shape, 3), 200, np.uint8)
    rgb[labels > 0] = (80, 40, 140)
    mpp = 0.25
    m = measure_nuclei(labels, rgb, mpp)
    assert list(m["label"]) == [1, 2]
    for k, (cy, cx, a, b, _th) in enumerate(specs):
        assert m["area_um2"][k] == pytest.approx(np.pi * a * b * mpp**2, rel=0.02)
        assert m["major_axis_um"][k] == pytest.approx(2 * a * mpp, rel=0.02)
        assert m["minor_axis_um"][k] == pytest.approx(2 * b * mpp, rel=0.02)
        assert m["eccentricity"][k] == pytest.approx(np.sqrt(1 - (b / a) ** 2), rel=0.02)
        assert m["centroid_x"][k] == pytest.approx(cx, abs=0.5)
        assert m["centroid_y"][k] == pytest.approx(cy, abs=0.5)
        assert m["solidity"][k] > 0.97
        assert m["mean_r"][k] == pytest.approx(80.0)
    assert np.all(m["hematoxylin_od"] > 0)
    assert m["bbox_x0"][0] == pytest.approx(70 - 40, abs=1)
    assert m["bbox_x1"][0] == pytest.approx(70 + 41, abs=1)


def test_measure_keys_exact_and_empty() -> None:
    keys = [
        "label",
        "centroid_x",
        "centroid_y",
        "bbox_x0",
        "bbox_y0",
        "bbox_x1",
        "bbox_y1",
        "area_um2",
        "perimeter_um",
        "equivalent_diameter_um",
        "major_axis_um",
        "minor_axis_um",
        "eccentricity",
        "solidity",
        "circularity",
        "mean_r",
        "mean_g",
        "mean_b",
        "hematoxylin_od",
        "eosin_od",
    ]
    m = measure_nuclei(np.zeros((8, 8), np.int32), np.zeros((8, 8, 3), np.uint8), 0.5)
    assert list(m) == keys and all(v.shape == (0,) for v in m.values())


# --- shipped weights ----------------------------------------------------------------------------


def test_shipped_weights_load_and_forward_fast() -> None:
    t0 = time.perf_counter()
    model = load_nuclei_model("default")
    assert isinstance(model, NucleusModel)
    assert len(model.weights_sha256) == 64 and model.mpp > 0
    maps = model.predict(torch.randint(0, 255, (2, 3, 70, 90), dtype=torch.uint8))
    # the default (fast) preset types nuclei: 3 segmentation maps, then 4 type probabilities
    assert model.type_names == ("other", "inflammatory", "epithelial", "spindle")
    assert maps.shape == (2, 3 + 4, 70, 90) and maps.dtype == np.float32
    assert np.all((maps >= 0) & (maps <= 1))
    assert np.allclose(maps[:, 3:].sum(axis=1), 1.0, atol=1e-3)
    labels = model.segment(np.full((77, 131, 3), 230, np.uint8), 0.25)
    assert labels.shape == (77, 131) and labels.dtype == np.int32
    pickle.dumps(model.postprocess)
    assert time.perf_counter() - t0 < 20
    names = {row["name"] for row in list_nuclei_models()}
    assert {"classical", "nuclei-unet-fast", "nuclei-unet-accurate"} <= names
    assert sum(row["default"] for row in list_nuclei_models()) == 1


def test_accurate_preset_is_the_fine_network_with_tta() -> None:
    fast = load_nuclei_model("fast")
    accurate = load_nuclei_model("nuclei-unet-accurate")
    assert isinstance(fast, NucleusModel) and isinstance(accurate, NucleusModel)
    assert accurate.name == "nuclei-unet-accurate" and accurate.tta and not fast.tta
    fine = SHIPPED_WEIGHTS.with_name("nuclei-unet-fine.safetensors")
    assert accurate.weights_sha256 == hashlib.sha256(fine.read_bytes()).hexdigest()
    assert accurate.weights_sha256 != fast.weights_sha256
    assert accurate.mpp == pytest.approx(0.35) and fast.mpp == pytest.approx(0.5)
    assert accurate.postprocess_config.upsample == 2 and fast.postprocess_config.upsample == 1
    # The watershed grid is refined by the smallest factor that makes it at least as fine as
    # the input, up to the preset's own factor.
    probe = np.zeros((3, 40, 40), np.float32)
    assert accurate.upsample_for(0.25) == 2  # 0.35 -> 0.175 µm/px for a 40x input
    assert accurate.postprocess_for(0.25)(probe).shape == (80, 80)
    assert accurate.upsample_for(0.5) == 1  # 20x input: the 0.35 µm/px grid is finer already
    assert accurate.postprocess_for(0.5)(probe).shape == (40, 40)
    assert fast.postprocess_for(0.25)(probe).shape == (40, 40)
    wide = load_nuclei_model(RETIRED_WIDE)
    assert isinstance(wide, NucleusModel)  # a 0.5 µm/px network
    wide.postprocess_config = dataclasses.replace(wide.postprocess_config, upsample=2)
    assert [wide.upsample_for(m) for m in (0.25, 0.3, 0.5, 1.0)] == [2, 2, 1, 1]
    maps = accurate.predict(torch.randint(0, 255, (1, 3, 48, 64), dtype=torch.uint8))
    # Since accurate v2 both presets have the type head: 3 maps + 4 type probabilities.
    assert (
        accurate.type_names == fast.type_names == ("other", "inflammatory", "epithelial", "spindle")
    )
    assert maps.shape == (1, accurate.n_outputs, 48, 64) == (1, 7, 48, 64)
    labels = accurate.segment(np.full((77, 131, 3), 230, np.uint8), 0.25)
    assert labels.shape == (77, 131) and labels.dtype == np.int32


def test_tta_maps_are_equivariant_to_the_symmetries_of_the_square() -> None:
    """Averaging over all 8 dihedral views makes rotated input give rotated maps."""
    accurate = load_nuclei_model("accurate", precision="fp32")
    fast = load_nuclei_model("fast", precision="fp32")
    assert isinstance(accurate, NucleusModel) and isinstance(fast, NucleusModel)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8, generator=gen)
    for model, equivariant in ((accurate, True), (fast, False)):
        maps = model.predict(x)
        for k in (1, 2, 3):
            rotated = model.predict(torch.rot90(x, k, (2, 3)).contiguous())
            back = np.rot90(rotated, -k, axes=(2, 3))
            close = np.allclose(back, maps, atol=1e-4)
            assert close == equivariant
        flipped = model.predict(x.flip(2).contiguous())
        assert np.allclose(flipped[:, :, ::-1], maps, atol=1e-4) == equivariant


def test_a_preset_may_name_its_own_weights_and_architecture(tmp_path: Path) -> None:
    import json
    import shutil

    wide = RETIRED_WIDE
    shutil.copy(SHIPPED_WEIGHTS, tmp_path / "mine.safetensors")
    shutil.copy(wide, tmp_path / "other.safetensors")
    side = json.loads(SHIPPED_WEIGHTS.with_suffix(".json").read_text())
    wide_arch = json.loads(wide.with_suffix(".json").read_text())["architecture"]
    side["presets"] = {
        "default": {"mpp": 0.5, "weights": "other.safetensors", "architecture": wide_arch}
    }
    side["default"] = "default"
    (tmp_path / "mine.json").write_text(json.dumps(side))
    model = load_nuclei_model(tmp_path / "mine.safetensors")
    own = load_nuclei_model("fast")
    assert isinstance(model, NucleusModel) and isinstance(own, NucleusModel)
    assert model.n_parameters > 3 * own.n_parameters
    assert model.weights_sha256 != own.weights_sha256


def test_batchnorm_folding_keeps_the_outputs() -> None:
    from slidestream.models.nuclei._network import fold_batchnorm
    from slidestream.models.nuclei._weights import load_network

    side = json.loads(SHIPPED_WEIGHTS.with_suffix(".json").read_text())
    net, _ = load_network(SHIPPED_WEIGHTS, NetworkConfig.from_dict(side["architecture"]))
    net.eval()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    x = torch.randint(0, 255, (2, 3, 64, 48)).float()
    with torch.inference_mode():
        ref = net(x)
        with pytest.raises(ConfigError):
            fold_batchnorm(net.train())
        net.eval()
        assert fold_batchnorm(net) == n_bn == 18 + 1  # the type head's BatchNorm too
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        assert torch.allclose(net(x), ref, atol=1e-3)
        assert fold_batchnorm(net) == 0


def _copy_weights(tmp_path: Path) -> Path:
    dst = tmp_path / "w.safetensors"
    shutil.copy(SHIPPED_WEIGHTS, dst)
    side = json.loads(SHIPPED_WEIGHTS.with_suffix(".json").read_text())
    side["weights"] = dst.name
    dst.with_suffix(".json").write_text(json.dumps(side))
    return dst


def test_corrupt_weights_raise_weights_error(tmp_path: Path) -> None:
    dst = _copy_weights(tmp_path)
    data = dst.read_bytes()
    dst.write_bytes(data[:100] + b"\x00garbage" + data[-50:])
    with pytest.raises(WeightsError, match=r"w\.safetensors.*corrupt"):
        load_nuclei_model(dst)


def test_mismatched_weights_raise_weights_error(tmp_path: Path) -> None:
    dst = _copy_weights(tmp_path)
    side = json.loads(dst.with_suffix(".json").read_text())
    side["architecture"]["features"] = [8, 8, 16, 16, 32, 8]
    dst.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(WeightsError, match="do not fit"):
        load_nuclei_model(dst)
    with pytest.raises(ConfigError):
        load_nuclei_model("no-such-model")


# --- training -----------------------------------------------------------------------------------


def _synthetic_dataset(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        labels = np.zeros((96, 96), np.uint16)
        for k in range(1, 9):
            cy, cx = rng.uniform(8, 88, 2)
            labels[_disc(labels.shape, cy, cx, rng.uniform(4, 7)) & (labels == 0)] = k
        rgb = np.empty((96, 96, 3), np.uint8)
        rgb[...] = (235, 180, 210)
        rgb[labels > 0] = (90, 50, 150)
        Image.fromarray(rgb).save(root / "images" / f"s{i}.png")
        Image.fromarray(labels).save(root / "masks" / f"s{i}.png")
    return root


def test_few_step_training_reduces_loss_and_loads(tmp_path: Path) -> None:
    data = _synthetic_dataset(tmp_path / "synth", 4, seed=1)
    out = tmp_path / "tiny.safetensors"
    cfg = TrainConfig(
        mpp=0.5,
        network=TINY,
        crop_px=64,
        batch_size=4,
        epochs=36,
        lr=1e-2,
        val_every_steps=12,
        seed=3,
        num_threads=1,
    )
    res = train_nuclei([f"{data}:0.5"], out, config=cfg)
    assert res.steps == 36 and len(res.losses) == 3
    assert res.losses[-1] < res.losses[0]
    model = load_nuclei_model(out)
    assert isinstance(model, NucleusModel) and model.mpp == 0.5
    assert model.segment(np.zeros((50, 40, 3), np.uint8), 0.5).shape == (50, 40)


def test_init_weights_start_from_the_given_weights(tmp_path: Path) -> None:
    from slidestream.models.nuclei._network import build_network
    from slidestream.models.nuclei._weights import load_network

    data = _synthetic_dataset(tmp_path / "synth", 3, seed=2)
    base = TrainConfig(
        mpp=0.5, network=TINY, crop_px=64, batch_size=2, epochs=4, lr=1e-2, num_threads=1, seed=5
    )
    first = tmp_path / "first.safetensors"
    train_nuclei([f"{data}:0.5"], first, config=base)
    # A near-zero LR keeps the parameters where they started: the result must be the init.
    cont = tmp_path / "cont.safetensors"
    cfg = dataclasses.replace(base, epochs=1, lr=1e-12, weight_decay=0.0, init_weights=first)
    res = train_nuclei([f"{data}:0.5"], cont, config=cfg)
    assert res.steps >= 1 and math.isnan(res.losses[0])  # validated before the first step
    a, _ = load_network(first, TINY)
    b, _ = load_network(cont, TINY)
    fresh = build_network(TINY)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), name
    assert any(
        not torch.allclose(pa, pf)
        for pa, pf in zip(a.parameters(), fresh.parameters(), strict=True)
    )


def test_loader_workers_stream_is_seeded_and_trains(tmp_path: Path) -> None:
    from slidestream.models.nuclei._data import load_sources, parse_data_arg
    from slidestream.models.nuclei._train import _batches

    data = _synthetic_dataset(tmp_path / "synth", 3, seed=4)
    items = load_sources([parse_data_arg(f"{data}:0.5")], 0.5)
    weights = np.full(len(items), 1.0 / len(items))
    cfg = TrainConfig(mpp=0.5, network=TINY, crop_px=64, batch_size=2, workers=1, seed=7)
    firsts = []
    for _ in range(2):
        stream = _batches(items, weights, np.random.default_rng(0), cfg, pin=False)
        imgs, tgts = next(stream)
        stream.close()
        assert imgs.dtype == torch.uint8 and imgs.shape == (2, 3, 64, 64)
        assert tgts.shape == (2, 5, 64, 64)
        firsts.append(imgs)
    assert torch.equal(firsts[0], firsts[1])  # worker streams are seeded (seed, worker id)
    res = train_nuclei(
        [f"{data}:0.5"],
        tmp_path / "w.safetensors",
        config=dataclasses.replace(cfg, epochs=4, num_threads=1),
    )
    assert res.steps >= 1 and math.isfinite(res.losses[-1])


# --- real data ----------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_tile_reaches_sane_aji(shared_data: Path) -> None:
    # A held-out (validation) MoNuSeg image: never seen in training.
    root = shared_data / "nuclei" / "monuseg_kumar"
    name = "Kidney_TCGA-HE-7130-01Z-00-DX1.png"
    with Image.open(root / "images" / name) as im:
        rgb = np.asarray(im.convert("RGB"))[:384, :384].copy()
    with Image.open(root / "masks" / name) as im:
        true = np.asarray(im, dtype=np.int32)[:384, :384].copy()
    model = load_nuclei_model("default")
    pred = model.segment(rgb, 0.25)
    assert score_instances(true, pred).aji > 0.5
    classical = ClassicalSegmenter().segment(rgb, 0.25)
    assert score_instances(true, classical).aji > 0.2


def test_bf16_cpu_maps_match_fp32_and_batches_match_tiles() -> None:
    fp32 = load_nuclei_model("fast", precision="fp32")
    bf16 = load_nuclei_model("fast", precision="bf16")
    assert isinstance(fp32, NucleusModel) and isinstance(bf16, NucleusModel)
    assert next(bf16.net.parameters()).dtype == torch.bfloat16
    x = torch.randint(0, 255, (3, 3, 64, 80), dtype=torch.uint8)
    ref = fp32.predict(x)
    got = bf16.predict(x)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).mean() < 0.01 and np.abs(got - ref).max() < 0.15
    one_by_one = np.concatenate([fp32.predict(x[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(ref, one_by_one, atol=1e-5)
