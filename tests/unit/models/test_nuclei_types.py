"""Tests of the nucleus type head: data, loss, per-instance types, HoVer-Net F1, resume, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from slidestream.errors import ConfigError
from slidestream.models.nuclei import NetworkConfig, NucleusModel, TrainConfig, load_nuclei_model
from slidestream.models.nuclei._data import load_sources, parse_data_arg, sample_batch
from slidestream.models.nuclei._network import (
    TYPE_NAMES,
    build_network,
    load_segmentation_weights,
)
from slidestream.models.nuclei._train import _loss, train_nuclei, truth_points
from slidestream.models.nuclei._type_metrics import TypedCounts, TypedPoints, pair_coordinates
from slidestream.models.nuclei._types import instance_types

TINY_T = NetworkConfig(features=(4, 4, 8, 8, 16, 4), n_types=4, type_head_width=8)
# Nucleus colours by type, so that the type head has something to learn.
_COLOURS = {1: (150, 120, 60), 2: (40, 20, 110), 3: (120, 60, 170), 4: (170, 90, 190)}


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(yy - cy, xx - cx) <= r


def _typed_dataset(root: Path, n: int, seed: int) -> Path:
    """CoNSeP layout: images/, masks/, types/ and types.csv."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "types"):
        (root / sub).mkdir(parents=True)
    rows = []
    for i in range(n):
        labels = np.zeros((96, 96), np.uint16)
        types = np.zeros((96, 96), np.uint8)
        rgb = np.empty((96, 96, 3), np.uint8)
        rgb[...] = (235, 190, 215)
        for k in range(1, 9):
            cy, cx = rng.uniform(10, 86, 2)
            disc = _disc(labels.shape, cy, cx, rng.uniform(4, 7)) & (labels == 0)
            if not disc.any():
                continue
            t = 1 + (k % 4)
            labels[disc], types[disc] = k, t
            rgb[disc] = _COLOURS[t]
            yy, xx = np.nonzero(disc)
            rows.append([f"s{i}", k, t, TYPE_NAMES[t - 1], xx.mean(), yy.mean()])
        Image.fromarray(rgb).save(root / "images" / f"s{i}.png")
        Image.fromarray(labels).save(root / "masks" / f"s{i}.png")
        Image.fromarray(types).save(root / "types" / f"s{i}.png")
    with (root / "types.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "instance", "type", "type_name", "centroid_x", "centroid_y"])
        w.writerows(rows)
    return root


def _points_dataset(root: Path, seed: int) -> Path:
    """CRCHisto layout: images/ and points.csv, no masks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rgb = np.full((80, 80, 3), (235, 190, 215), np.uint8)
    rows = []
    for name in ("epithelial", "fibroblast", "inflammatory", "others"):
        cy, cx = rng.uniform(10, 70, 2)
        rgb[_disc((80, 80), cy, cx, 5)] = (90, 50, 150)
        rows.append(["p0", cx, cy, name])
    Image.fromarray(rgb).save(root / "images" / "p0.png")
    with (root / "points.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "x", "y", "type"])
        w.writerows(rows)
    return root


# --- per-instance types -------------------------------------------------------------------------


def test_instance_types_mean_probabilities_and_refined_labels() -> None:
    probs = np.zeros((4, 4, 4), np.float32)
    probs[2] = 1.0  # epithelial everywhere ...
    probs[:, :, 2:] = 0.0
    probs[1, :, 2:] = 1.0  # ... but inflammatory on the right half
    labels = np.zeros((4, 4), np.int32)
    labels[:, :2], labels[:, 2:] = 3, 7
    t = instance_types(labels, probs, TYPE_NAMES)
    assert t.ids.tolist() == [3, 7] and t.type_of() == ["epithelial", "inflammatory"]
    np.testing.assert_allclose(t.probabilities.sum(axis=1), 1.0, rtol=1e-6)
    # Labels refined 2x: each label pixel takes its map pixel's probabilities.
    fine = labels.repeat(2, 0).repeat(2, 1)
    t2 = instance_types(fine, probs, TYPE_NAMES)
    np.testing.assert_allclose(t2.probabilities, t.probabilities, atol=1e-6)
    with pytest.raises(ConfigError):
        instance_types(np.zeros((5, 4), np.int32), probs, TYPE_NAMES)


# --- HoVer-Net type F1 --------------------------------------------------------------------------


def test_pairing_is_one_to_one_within_radius() -> None:
    true = np.array([[0.0, 0.0], [10.0, 0.0], [50.0, 50.0]])
    pred = np.array([[1.0, 0.0], [9.0, 0.0], [80.0, 80.0]])
    pairs, un_t, un_p = pair_coordinates(true, pred, radius=3.0)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (1, 1)]
    assert un_t.tolist() == [2] and un_p.tolist() == [2]


def test_type_f1_follows_hovernet_formula() -> None:
    names = ("a", "b")
    # 3 pairs: (a->a), (a->b), (b->b); one unpaired true b, one unpaired predicted a.
    true = TypedPoints(
        xy=np.array([[0, 0], [20, 0], [40, 0], [100, 100.0]]), types=np.array([0, 0, 1, 1])
    )
    pred = TypedPoints(
        xy=np.array([[0, 0], [20, 0], [40, 0], [200, 200.0]]), types=np.array([0, 1, 1, 0])
    )
    c = TypedCounts(names=names)
    c.add(true, pred, radius=2.0)
    s = c.scores()
    assert s["det_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    # type a: TP 1, FP 0, FN 1 (a->b), FP_d 1, FN_d 0 -> 2 / (2 + 2 + 1)
    assert s["f1_a"] == pytest.approx(2 * 1 / (2 * 1 + 2 * 0 + 2 * 1 + 1 + 0))
    # type b: TP 1, FP 1 (a->b), FN 0, FP_d 0, FN_d 1 -> 2 / (2 + 2 + 1)
    assert s["f1_b"] == pytest.approx(2 * 1 / (2 * 1 + 2 * 1 + 0 + 0 + 1))
    assert s["type_accuracy"] == pytest.approx(2 / 3)


# --- data and loss ------------------------------------------------------------------------------


def test_typed_masks_and_points_load_with_type_targets(tmp_path: Path) -> None:
    typed = _typed_dataset(tmp_path / "typed", 2, seed=0)
    pts = _points_dataset(tmp_path / "pts", seed=1)
    items = load_sources([parse_data_arg(f"{typed}:0.5"), parse_data_arg(f"{pts}:0.5")], 0.5)
    by_key = {it.key: it for it in items}
    masked, points = by_key["typed/s0"], by_key["pts/p0"]
    assert masked.has_masks and masked.types is not None
    assert set(np.unique(masked.types[masked.labels > 0]).tolist()) <= {1, 2, 3, 4}
    assert not points.has_masks and points.labels.max() == 0
    assert points.types is not None and set(np.unique(points.types).tolist()) == {0, 1, 2, 3, 4}
    truth = truth_points(points)
    assert truth is not None and sorted(truth.types.tolist()) == [0, 1, 2, 3]
    _imgs, tgts = sample_batch(
        items,
        np.full(len(items), 1 / len(items)),
        np.random.default_rng(0),
        batch_size=6,
        crop_px=64,
    )
    assert tgts.shape == (6, 5, 64, 64)
    assert set(np.unique(tgts[:, 4]).tolist()) <= {0.0, 1.0}
    # Crops of points images carry no segmentation supervision.
    for b in range(6):
        if tgts[b, 4].max() == 0:
            assert tgts[b, :3].max() == 0


def test_bad_points_file_names_the_line(tmp_path: Path) -> None:
    pts = _points_dataset(tmp_path / "pts", seed=1)
    text = (pts / "points.csv").read_text().replace("others", "platelet")
    (pts / "points.csv").write_text(text)
    with pytest.raises(ConfigError, match=r"points.csv:5: unknown nucleus type 'platelet'"):
        load_sources([parse_data_arg(f"{pts}:0.5")], 0.5)


def test_loss_masks_segmentation_and_ignores_untyped_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 16, 16, requires_grad=True)
    target = torch.zeros(2, 5, 16, 16)
    target[:, 0, 4:8, 4:8] = 1
    loss = _loss(logits, target)  # no seg validity, no types: nothing to learn
    assert float(loss) == 0.0
    target[0, 3, 4:8, 4:8] = 2  # inflammatory pixels on sample 0
    loss = _loss(logits, target)
    loss.backward()
    assert logits.grad is not None
    assert float(logits.grad[:, :3].abs().sum()) == 0.0  # seg maps untouched
    assert float(logits.grad[0, 3:, 4:8, 4:8].abs().sum()) > 0
    assert float(logits.grad[0, 3:, 10:, 10:].abs().sum()) == 0.0  # untyped pixels ignored


def test_segmentation_weights_load_into_a_typed_network() -> None:
    seg_only = build_network(dataclasses.replace(TINY_T, n_types=0)).eval()
    typed = build_network(TINY_T).eval()
    new = load_segmentation_weights(typed, seg_only.state_dict())
    assert new and all("final_conv.types" in k for k in new)
    x = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        torch.testing.assert_close(typed(x)[:, :3], seg_only(x))
        assert typed(x).shape == (1, 7, 32, 32)


# --- training, resume, CLI ---------------------------------------------------------------------


def _cfg(**kw: object) -> TrainConfig:
    base = TrainConfig(
        mpp=0.5,
        network=TINY_T,
        crop_px=64,
        batch_size=4,
        steps=6,
        lr=1e-2,
        val_every_steps=3,
        seed=3,
        num_threads=1,
        checkpoint="last",
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_training_resumes_after_interruption(tmp_path: Path) -> None:
    data = [f"{_typed_dataset(tmp_path / 'typed', 3, seed=2)}:0.5"]
    out = tmp_path / "typed.safetensors"

    def stop_at_4(step: int, total: int, info: dict[str, float]) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_nuclei(data, out, config=_cfg(resume=True), progress=stop_at_4)
    state = torch.load(out.with_name("typed.resume.pt"), weights_only=True)
    assert state["step"] == 3
    res = train_nuclei(data, out, config=_cfg(resume=True))
    assert res.steps == 6
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["architecture"]["n_types"] == 4 and side["train"]["checkpoint"] == "last"
    assert {"det_f1", "f1_epithelial"} <= set(res.val)
    # Other options are another run: refuse to mix them with the checkpoint.
    with pytest.raises(ConfigError, match="belongs to a run with other"):
        train_nuclei(data, out, config=_cfg(resume=True, steps=9))
    # The test images are never loaded for training.
    res2 = train_nuclei(
        data, tmp_path / "t2.safetensors", config=_cfg(test_keys=("typed/s0",), steps=2)
    )
    assert "typed/s0" not in json.dumps(side["train"]["val_keys"])
    assert res2.steps == 2


def test_segment_writes_types_csv_and_evaluate_scores_types(tmp_path: Path) -> None:
    from slidestream.cli import cli

    data = _typed_dataset(tmp_path / "typed", 3, seed=4)
    out = tmp_path / "m.safetensors"
    train_nuclei([f"{data}:0.5"], out, config=_cfg(steps=3))
    model = load_nuclei_model(out)
    assert isinstance(model, NucleusModel) and model.type_names == TYPE_NAMES
    runner = CliRunner()
    seg_out = tmp_path / "seg"
    r = runner.invoke(
        cli,
        [
            "segment",
            str(data / "images"),
            "--mpp",
            "0.5",
            "--out",
            str(seg_out),
            "--model",
            str(out),
            "--geojson",
        ],
    )
    assert r.exit_code == 0, r.output
    with (seg_out / "s0.types.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["id", "type", "p_other", "p_inflammatory", "p_epithelial", "p_spindle"]
    labels = np.asarray(Image.open(seg_out / "s0.png"))
    assert {int(r["id"]) for r in rows} == set(np.unique(labels).tolist()) - {0}
    assert all(r["type"] in TYPE_NAMES for r in rows)
    gj = json.loads((seg_out / "s0.geojson").read_text())
    feats = gj["features"] if isinstance(gj, dict) else gj
    assert feats and {f["properties"]["classification"]["name"] for f in feats} <= {
        "Other",
        "Inflammatory",
        "Epithelial",
        "Spindle",
    }
    r = runner.invoke(
        cli,
        [
            "evaluate",
            "nuclei",
            "--images",
            str(data / "images"),
            "--masks",
            str(data / "masks"),
            "--types",
            str(data / "types.csv"),
            "--mpp",
            "0.5",
            "--model",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert {"det_f1", "f1_inflammatory", "f1_spindle"} <= set(report["types"])
    assert report["pair_radius_px"] == pytest.approx(6.0)


def test_pairing_never_gives_up_a_near_pair_for_far_ones() -> None:
    """A (0, 0) and its prediction 5 px away pair, although the assignment over all distances
    (HoVer-Net's) would rather pair the far points crosswise (480 + 495 < 5 + 980)."""
    from slidestream.models.nuclei._type_metrics import pair_coordinates

    true = np.array([[0.0, 0.0], [500.0, 0.0]])
    pred = np.array([[5.0, 0.0], [-480.0, 0.0]])
    pairs, un_t, un_p = pair_coordinates(true, pred, 12.0)
    assert pairs.tolist() == [[0, 0]] and un_t.tolist() == [1] and un_p.tolist() == [1]
