"""``slidestream tissue`` and ``slidestream tiles`` on a generated slide."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from slidestream.cli import cli
from slidestream.config import DEFAULTS


def test_tissue_writes_mask_and_geojson(generated_slide: Path, tmp_path: Path) -> None:
    out, gj = tmp_path / "mask.png", tmp_path / "tissue.geojson"
    result = CliRunner().invoke(
        cli, ["tissue", str(generated_slide), "--out", str(out), "--geojson", str(gj)]
    )
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(out))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255} and (mask == 255).any()
    doc = json.loads(gj.read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 1
    feature = doc["features"][0]
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["classification"]["name"] == "Tissue"
    assert feature["geometry"]["type"] == "MultiPolygon"
    # Two blobs of radius 200 and 180 px at 0.5 µm/px.
    area = feature["properties"]["measurements"]["Area µm^2"]
    assert area == pytest.approx(np.pi * (200**2 + 180**2) * 0.25, rel=0.15)
    # Deterministic id: a second run gives the same file.
    gj2 = tmp_path / "again.geojson"
    CliRunner().invoke(
        cli, ["tissue", str(generated_slide), "--out", str(out), "--geojson", str(gj2)]
    )
    assert gj2.read_bytes() == gj.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "again.geojson",
        "mask.png",
        "tissue.geojson",
    ]


def test_tissue_geojson_passes_qupath_validator(
    generated_slide: Path, tmp_path: Path, shared_tools: Path
) -> None:
    gj = tmp_path / "tissue.geojson"
    result = CliRunner().invoke(
        cli,
        ["tissue", str(generated_slide), "--out", str(tmp_path / "m.png"), "--geojson", str(gj)],
    )
    assert result.exit_code == 0, result.output
    check = subprocess.run(
        [
            sys.executable,
            str(shared_tools / "check_qupath_geojson.py"),
            str(gj),
            "--width",
            "1024",
            "--height",
            "768",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_tiles_lists_tissue_tiles(generated_slide: Path, tmp_path: Path) -> None:
    args = ["tiles", str(generated_slide), "--tile-mpp", "1.0", "--size", "128", "--overlap", "16"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    header = "index,col,row,l0_x,l0_y,l0_width,l0_height,tissue_fraction,is_partial"
    assert rows and list(rows[0]) == header.split(",")
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    assert all(float(r["tissue_fraction"]) >= DEFAULTS.min_tissue_fraction for r in rows)
    assert "min tissue 0.02" in result.stderr  # the run's default: one table of defaults
    assert float(rows[0]["l0_width"]) == pytest.approx(256.0)
    assert "tiles kept" in result.stderr
    out = tmp_path / "tiles.csv"
    result = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert result.exit_code == 0 and out.read_text(encoding="utf-8").count("\n") == len(rows) + 1
    bad = CliRunner().invoke(cli, [*args[:-1], "3"])
    assert bad.exit_code == 2 and "overlap_px=3" in bad.output
