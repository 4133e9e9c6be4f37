"""CLI tests: ``slidestream segment`` (masks + QuPath GeoJSON) and ``evaluate nuclei``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from slidestream.cli import cli


def _tile(tmp: Path) -> tuple[Path, Path]:
    images, masks = tmp / "images", tmp / "masks"
    images.mkdir()
    masks.mkdir()
    labels = np.zeros((120, 100), np.uint16)
    yy, xx = np.mgrid[:120, :100]
    for k, (cy, cx) in enumerate([(30, 30), (30, 70), (80, 50)], start=1):
        labels[np.hypot(yy - cy, xx - cx) <= 12] = k
    rgb = np.empty((120, 100, 3), np.uint8)
    rgb[...] = (236, 190, 220)
    rgb[labels > 0] = (70, 40, 130)
    Image.fromarray(rgb).save(images / "t1.png")
    Image.fromarray(labels).save(masks / "t1.png")
    return images, masks


def test_segment_writes_masks_and_valid_geojson(tmp_path: Path, shared_tools: Path) -> None:
    images, _ = _tile(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli, ["segment", str(images), "--mpp", "0.5", "--out", str(out), "--geojson"]
    )
    assert res.exit_code == 0, res.output
    mask = np.asarray(Image.open(out / "t1.png"))
    assert mask.dtype == np.uint16 and mask.shape == (120, 100) and mask.max() >= 2
    check = subprocess.run(
        [sys.executable, str(shared_tools / "check_qupath_geojson.py"), str(out / "t1.geojson")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    feats = json.loads((out / "t1.geojson").read_text())["features"]
    assert len(feats) == int(mask.max())
    assert feats[0]["properties"]["objectType"] == "detection"


def test_evaluate_json(tmp_path: Path) -> None:
    images, masks = _tile(tmp_path)
    res = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "nuclei",
            "--images",
            str(images),
            "--masks",
            str(masks),
            "--mpp",
            "0.5",
            "--model",
            "classical",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["mean"]["aji"] > 0.8 and data["images"][0]["n_true"] == 3


def test_per_image_commands_default_to_the_accurate_preset(tmp_path: Path) -> None:
    images, masks = _tile(tmp_path)
    args = ["evaluate", "nuclei", "--images", str(images), "--masks", str(masks), "--mpp", "0.5"]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["model"] == "nuclei-unet-accurate"
    fast = CliRunner().invoke(cli, [*args, "--model", "default", "--json"])
    assert json.loads(fast.output)["model"] == "nuclei-unet-fast"
