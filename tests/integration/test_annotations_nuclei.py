"""evaluate nuclei --slides/--annotations: detection and per-type F1 against annotated nuclei."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from click.testing import CliRunner

from slidestream import _cli_annotations
from slidestream.annotated_mosaic import qupath_feature, write_qupath_geojson
from slidestream.errors import AnnotationError
from slidestream.models.nuclei._types import InstanceTypes
from slidestream.wsi.synthetic import write_pyramidal_tiff

NAMES = ("other", "inflammatory", "epithelial", "spindle")


class _Oracle:
    """A 'model' that segments the dark discs of the test slide and types them by colour."""

    name = "oracle"
    type_names = NAMES

    def segment_typed(self, rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, InstanceTypes]:
        from scipy import ndimage as ndi

        dark = rgb.sum(axis=2) < 400
        labels, n = ndi.label(dark)
        ids = np.arange(1, n + 1, dtype=np.int32)
        # type from the red channel: 40 * k + 20 for type k
        red = ndi.mean(rgb[..., 0], labels, ids) if n else np.zeros(0)
        index = np.clip(np.round((np.asarray(red) - 20) / 40), 0, 3).astype(np.int8)
        probs = np.eye(4, dtype=np.float32)[index]
        return labels.astype(np.int32), InstanceTypes(
            names=NAMES, ids=ids, index=index, probabilities=probs
        )


def _slide(tmp: Path) -> tuple[Path, list[tuple[float, float, int]]]:
    rng = np.random.default_rng(0)
    rgb = np.full((1400, 2300, 3), (235, 200, 220), np.uint8)
    yy, xx = np.mgrid[:1400, :2300]
    truth = []
    for _ in range(60):
        cx, cy = rng.uniform(20, 2280), rng.uniform(20, 1380)
        if any(np.hypot(cx - x, cy - y) < 30 for x, y, _ in truth):
            continue
        k = int(rng.integers(0, 4))
        rgb[np.hypot(xx - cx, yy - cy) <= 6] = (40 * k + 20, 30, 90)
        truth.append((cx, cy, k))
    path = write_pyramidal_tiff(tmp / "nuc.tiff", rgb, mpp=0.5, compression="deflate")
    return path, truth


def test_evaluate_nuclei_on_annotated_slide(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slide, truth = _slide(tmp_path)
    feats = [
        qupath_feature(
            shapely.Point(x, y),
            object_id=f"0b9f8f0e-3a6f-4b7e-9a59-{i:012d}",
            class_name="Lymphocyte" if k == 1 else NAMES[k],
            object_type="detection",
        )
        for i, (x, y, k) in enumerate(truth)
    ]
    write_qupath_geojson(tmp_path / "nuc.geojson", feats)
    args = dict(
        slide_inputs=(slide,),
        annotation_inputs=(str(tmp_path),),
        slide_mpp=None,
        seg=_Oracle(),
        pair_radius_um=3.0,
        as_json=True,
    )
    with pytest.raises(AnnotationError, match=r"nucleus classes \['Lymphocyte'\]"):
        _cli_annotations.run_evaluate_nuclei(class_map={}, **args)  # type: ignore[arg-type]
    _cli_annotations.run_evaluate_nuclei(class_map={"Lymphocyte": "inflammatory"}, **args)  # type: ignore[arg-type]
    out = json.loads(capsys.readouterr().out)
    assert out["slides"]["nuc.tiff"]["n_true"] == len(truth)
    assert out["types"]["det_f1"] == pytest.approx(1.0)
    assert out["types"]["type_accuracy"] == pytest.approx(1.0)
    # a nucleus annotated with the wrong type is a type error, one missed is a detection error
    wrong = [(x, y, (k + 1) % 4) if i == 0 else (x, y, k) for i, (x, y, k) in enumerate(truth)]
    feats = [
        qupath_feature(shapely.Point(x, y), object_id=f"0b9f8f0e-3a6f-4b7e-9a59-{i:012d}",
                       class_name=NAMES[k], object_type="detection")
        for i, (x, y, k) in enumerate(wrong[:-1])
    ]  # fmt: skip
    write_qupath_geojson(tmp_path / "nuc.geojson", feats)
    _cli_annotations.run_evaluate_nuclei(class_map={}, **args)  # type: ignore[arg-type]
    out = json.loads(capsys.readouterr().out)
    n = len(truth)
    assert out["types"]["det_f1"] == pytest.approx(2 * (n - 1) / (2 * (n - 1) + 1))
    assert out["types"]["type_accuracy"] == pytest.approx((n - 2) / (n - 1))


def test_evaluate_nuclei_cli_needs_inputs() -> None:
    from slidestream.cli import cli

    res = CliRunner().invoke(cli, ["evaluate", "nuclei", "--model", "classical"])
    assert res.exit_code == 2 and "--slides" in res.output
