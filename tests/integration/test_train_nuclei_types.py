"""train nuclei-types: fit the shipped model's type head to a user vocabulary on annotated
slides, then evaluate and run with it."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from click.testing import CliRunner

from slidestream.annotated_mosaic import qupath_feature, write_qupath_geojson
from slidestream.cli import cli
from slidestream.wsi.synthetic import write_pyramidal_tiff

COLOURS = {"Lymphocyte": (160, 90, 160), "Tumor cell": (200, 0, 0)}


def _slide(tmp: Path, seed: int, n: int = 120) -> tuple[Path, Path]:
    """Small dark round nuclei ('Lymphocyte') and large pale oval ones ('Tumor cell') on
    eosin pink, 0.25 µm/px, with a QuPath GeoJSON of classified points (MultiPoint per class,
    as the Points tool stores them)."""
    rng = np.random.default_rng(seed)
    h, w = 1024, 1536
    rgb = np.full((h, w, 3), (236, 196, 218), np.float64)
    rgb = np.clip(rgb + rng.normal(0, 6, (h, w, 1)), 0, 255).astype(np.uint8)
    pts: list[tuple[float, float, str]] = []
    while len(pts) < n:
        x, y = rng.uniform(30, w - 30), rng.uniform(30, h - 30)
        if any(np.hypot(x - a, y - b) < 34 for a, b, _ in pts):
            continue
        if len(pts) % 2 == 0:
            cv2.circle(rgb, (int(x), int(y)), 7, (70, 40, 120), -1)
            pts.append((x, y, "Lymphocyte"))
        else:
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(rgb, (int(x), int(y)), (16, 8), angle, 0, 360, (150, 110, 185), -1)
            pts.append((x, y, "Tumor cell"))
    rgb = cv2.GaussianBlur(rgb, (0, 0), 1.0)
    slide = write_pyramidal_tiff(tmp / f"slide{seed}.tiff", rgb, mpp=0.25, compression="deflate")
    feats = []
    for k, cls in enumerate(sorted(COLOURS)):
        xy = [(x, y) for x, y, c in pts if c == cls]
        feats.append(
            qupath_feature(
                shapely.MultiPoint(np.round(xy, 2)),
                object_id=f"6f1c2a3b-0000-4000-8000-{seed:06d}{k:06d}",
                class_name=cls,
                class_color=COLOURS[cls],
            )
        )
    ann = write_qupath_geojson(tmp / f"slide{seed}.geojson", feats)
    return slide, ann


def test_train_nuclei_types_learns_a_user_vocabulary(tmp_path: Path) -> None:
    a, _ = _slide(tmp_path, 1)
    b, _ = _slide(tmp_path, 2)
    c, ann_c = _slide(tmp_path, 3)
    out = tmp_path / "my-types"
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "train", "nuclei-types", "--slides", str(a), "--slides", str(b),
            "--annotations", str(tmp_path), "--out", str(out), "--steps", "200",
            "--views", "2", "--cv-folds", "2", "--no-progress",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "cv balanced_accuracy" in res.output
    side = json.loads((out / "nuclei-types.json").read_text())
    assert side["architecture"]["type_names"] == ["Lymphocyte", "Tumor cell"]
    assert side["type_colors"] == {k: list(v) for k, v in COLOURS.items()}
    record = side["train_types"]
    assert [s["nuclei"] for s in record["slides"]] == [
        {"Lymphocyte": 60, "Tumor cell": 60},
        {"Lymphocyte": 60, "Tumor cell": 60},
    ]
    assert record["matched_fraction"] > 0.9
    assert record["cv"]["summary"]["balanced_accuracy"]["mean"] > 0.9
    card = (out / "MODEL_CARD.md").read_text()
    assert "Lymphocyte" in card and "Cross-validation" in card and "train nuclei-types" in card
    assert not (out / ".cache").exists()

    from slidestream.models.nuclei import load_nuclei_model

    model = load_nuclei_model(out)
    assert model.type_names == ("Lymphocyte", "Tumor cell")
    assert model.type_colors["Tumor cell"] == (200, 0, 0)

    # A third slide, seen by nothing: the fitted types hold; the shipped model has no such names.
    res = runner.invoke(
        cli,
        [
            "evaluate", "nuclei", "--slides", str(c), "--annotations", f"{c}={ann_c}",
            "--model", str(out), "--json",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    scores = json.loads(res.output)["types"]
    assert scores["det_f1"] > 0.9
    assert scores["type_accuracy"] > 0.9
    res = runner.invoke(
        cli,
        [
            "evaluate", "nuclei", "--slides", str(c), "--annotations", f"{c}={ann_c}",
            "--model", "default", "--json",
        ],
    )  # fmt: skip
    assert res.exit_code != 0
    assert "--class-map" in str(res.exception) + res.output

    # The whole-slide run writes the user's classes in the annotation colours.
    res = runner.invoke(
        cli,
        [
            "run", str(c), "--out", str(tmp_path / "run"), "--nuclei-model", str(out),
            "--overlay-type", "Lymphocyte", "--workers", "0", "--no-progress",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    import gzip

    folder = next((tmp_path / "run").glob("slide3*"))
    geo = json.loads(gzip.decompress((folder / "nuclei.geojson.gz").read_bytes()))
    classes = {f["properties"]["classification"]["name"] for f in geo["features"]}
    assert classes <= {"Lymphocyte", "Tumor cell"} and len(classes) == 2
    colours = {
        f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
        for f in geo["features"]
    }
    assert colours == COLOURS
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["provenance"]["models"]["nuclei"]["details"]["types"] == [
        "Lymphocyte",
        "Tumor cell",
    ]


def test_train_nuclei_types_rejects_a_class_with_too_few_nuclei(tmp_path: Path) -> None:
    a, _ = _slide(tmp_path, 1, n=14)  # 7 per class, below the minimum of 10
    res = CliRunner().invoke(
        cli,
        ["train", "nuclei-types", "--slides", str(a), "--annotations", str(tmp_path),
         "--out", str(tmp_path / "m"), "--no-progress"],
    )  # fmt: skip
    assert res.exit_code != 0
    message = str(res.exception) + res.output
    assert "fewer than 10 annotated nuclei" in message and "Lymphocyte: 7" in message


@pytest.mark.parametrize("base", ["classical"])
def test_train_nuclei_types_needs_a_network(tmp_path: Path, base: str) -> None:
    a, _ = _slide(tmp_path, 1, n=40)
    res = CliRunner().invoke(
        cli,
        ["train", "nuclei-types", "--slides", str(a), "--annotations", str(tmp_path),
         "--out", str(tmp_path / "m"), "--base", base, "--no-progress"],
    )  # fmt: skip
    assert res.exit_code != 0
    assert "no network" in str(res.exception) + res.output
