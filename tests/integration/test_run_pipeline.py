"""End-to-end tests of ``slidestream run`` on generated and real slides."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from slidestream.cli import cli
from slidestream.config import RunConfig
from slidestream.demo_slide import DemoSlideSpec, write_demo_slide

SMALL = DemoSlideSpec(width_px=1792, height_px=1408, mpp=0.5, seed=7)


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_slide(tmp_path_factory.mktemp("slides") / "small-demo.svs", SMALL)


@pytest.fixture(scope="module")
def run_result(small_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(
        cli, ["run", str(small_slide), "--out", str(out), "--no-progress", "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    return out


def _geojson_features(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        data = json.load(fh)
    assert data["type"] == "FeatureCollection"
    features: list[dict[str, Any]] = data["features"]
    return features


def test_all_outputs_present_and_consistent(run_result: Path) -> None:
    slide_out = run_result / "small-demo"
    for name in (
        "nuclei.geojson.gz",
        "tissue.geojson",
        "nuclei.parquet",
        "overlay.png",
        "tissue_mask.png",
        "summary.json",
    ):
        assert (slide_out / name).is_file(), name
    assert not list(run_result.glob(".*partial")), "staging folder left behind"
    summary = json.loads((slide_out / "summary.json").read_text())
    stats = summary["statistics"]
    nuclei = _geojson_features(slide_out / "nuclei.geojson.gz")
    table = pq.read_table(slide_out / "nuclei.parquet")
    assert stats["nucleus_count"] == len(nuclei) == table.num_rows > 50
    # ids agree between GeoJSON and parquet and are unique
    ids = [f["id"] for f in nuclei]
    assert len(set(ids)) == len(ids)
    assert ids == table.column("id").to_pylist()
    # per-class areas add up to the tissue area; per-class counts add up to the total
    classes = stats["classes"]
    assert sum(c["area_mm2"] for c in classes.values()) == pytest.approx(
        stats["tissue_area_mm2"], rel=1e-3
    )
    assert sum(c["nucleus_count"] for c in classes.values()) == stats["nucleus_count"]
    assert stats["nuclei_per_mm2"] == pytest.approx(
        stats["nucleus_count"] / stats["tissue_area_mm2"]
    )
    # every nucleus carries a class that is one of the model's
    names = {f["properties"]["classification"]["name"] for f in nuclei}
    assert names <= set(classes)
    prov = summary["provenance"]
    assert prov["models"]["nuclei"]["sha256"] and prov["models"]["tissue"]["sha256"]
    assert summary["slide"]["fingerprint"]


def test_nuclei_found_where_the_demo_has_them(run_result: Path) -> None:
    """The demo slide's ground truth: nuclei per mm² within a factor of the truth."""
    from slidestream.demo_slide import render_demo_image

    _, labels = render_demo_image(SMALL)
    truth = int(labels.max())
    summary = json.loads((run_result / "small-demo" / "summary.json").read_text())
    found = summary["statistics"]["nucleus_count"]
    assert 0.6 * truth <= found <= 1.4 * truth, (found, truth)


def test_outputs_pass_qupath_validator(run_result: Path, shared_tools: Path) -> None:
    for name in ("nuclei.geojson.gz", "tissue.geojson"):
        proc = subprocess.run(
            [
                sys.executable,
                str(shared_tools / "check_qupath_geojson.py"),
                str(run_result / "small-demo" / name),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rerun_is_skipped_and_force_recomputes(small_slide: Path, run_result: Path) -> None:
    from slidestream.pipeline import run_batch

    config = RunConfig(out_dir=run_result, workers=0, show_progress=False, db_url=None)
    first = run_batch([small_slide], config.with_options(postprocess_workers=0))
    assert [o.status for o in first] == ["skipped"]
    changed = config.with_options(min_tissue_fraction=0.03, postprocess_workers=0)
    again = run_batch([small_slide], changed)
    assert [o.status for o in again] == ["succeeded"]


def test_batch_with_corrupt_slide_goes_on_and_exits_1(small_slide: Path, tmp_path: Path) -> None:
    bad = tmp_path / "in" / "broken.svs"
    bad.parent.mkdir()
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    good = tmp_path / "in" / "good.svs"
    shutil.copy(small_slide, good)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(tmp_path / "in"),
            "--out",
            str(out),
            "--no-progress",
            "--workers",
            "0",
            "--nuclei-model",
            "classical",
            "--postprocess-workers",
            "0",
        ],
    )
    assert result.exit_code == 1, result.output
    assert (out / "good" / "summary.json").is_file()
    with (out / "failures.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(r["path"]).name for r in rows] == ["broken.svs"]
    assert "broken.svs" in rows[0]["error"]
    assert not (out / "broken").exists()


def test_interrupted_run_leaves_no_partial_outputs(
    small_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slidestream.overlays as overlays
    from slidestream.pipeline import run_batch

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    config = RunConfig(
        out_dir=tmp_path,
        workers=0,
        postprocess_workers=0,
        nuclei_model="classical",
        show_progress=False,
        db_url=None,
    )
    monkeypatch.setattr(overlays, "render_overlay_png", boom)
    with pytest.raises(KeyboardInterrupt):
        run_batch([small_slide], config)
    assert not (tmp_path / "small-demo").exists()
    monkeypatch.undo()
    outcomes = run_batch([small_slide], config)
    assert [o.status for o in outcomes] == ["succeeded"]
    assert not list(tmp_path.glob(".*partial"))
    assert (tmp_path / "small-demo" / "summary.json").is_file()


def test_nucleus_count_independent_of_tile_size(small_slide: Path, tmp_path: Path) -> None:
    from slidestream.pipeline import run_batch

    counts = []
    for size in (256, 640):
        config = RunConfig(
            out_dir=tmp_path / str(size),
            workers=0,
            show_progress=False,
            db_url=None,
            nuclei_tile_size_px=size,
        )
        (outcome,) = run_batch([small_slide], config)
        assert outcome.summary is not None
        counts.append(outcome.summary["statistics"]["nucleus_count"])
    assert abs(counts[0] - counts[1]) <= max(1, 0.005 * counts[1]), counts


def test_run_records_statistics_in_database(small_slide: Path, tmp_path: Path) -> None:
    from slidestream.db import connect, list_slides
    from slidestream.pipeline import run_batch

    url = f"sqlite:///{tmp_path / 'stats.db'}"
    config = RunConfig(
        out_dir=tmp_path,
        workers=0,
        postprocess_workers=0,
        nuclei_model="classical",
        show_progress=False,
        db_url=url,
    )
    run_batch([small_slide], config)
    run_batch([small_slide], config.with_options(force=True))  # idempotent
    engine = connect(url)
    try:
        rows = list_slides(engine)
    finally:
        engine.dispose()
    assert len(rows) == 1
    assert rows[0]["nucleus_count"] > 0


def test_stain_normalised_tissue_model_gets_one_gain_pair_per_slide(
    small_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slidestream.models.tissue import PatchClassifier
    from slidestream.models.tissue._stain_norm import GAIN_RANGE
    from slidestream.pipeline import run_batch

    seen: list[Any] = []
    real = PatchClassifier.predict_proba

    def spy(self: PatchClassifier, batch: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("stain_gains"))
        return real(self, batch, **kwargs)

    monkeypatch.setattr(PatchClassifier, "predict_proba", spy)
    config = RunConfig(
        out_dir=tmp_path,
        workers=0,
        postprocess_workers=0,
        nuclei_model="classical",
        tissue_model="tumour-pan-sn",
        show_progress=False,
        db_url=None,
    )
    (outcome,) = run_batch([small_slide], config)
    assert outcome.status == "succeeded", outcome.error
    assert seen and all(g is not None for g in seen)
    assert all(bool((g == seen[0]).all()) for g in seen)  # one pair for the whole slide
    assert GAIN_RANGE[0] <= float(seen[0].min()) and float(seen[0].max()) <= GAIN_RANGE[1]
    assert outcome.summary is not None
    classes = outcome.summary["statistics"]["classes"]
    assert {"tumour", "non_tumour"} <= set(classes)
    recorded = outcome.summary["provenance"]["tissue_stain_gains"]
    np.testing.assert_allclose(recorded, seen[0].tolist(), atol=1e-4)


@pytest.mark.realdata
def test_real_cmu_small_region_runs_through(shared_data: Path, tmp_path: Path) -> None:
    from slidestream.pipeline import run_batch

    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    config = RunConfig(out_dir=tmp_path, workers=0, show_progress=False, db_url=None)
    (outcome,) = run_batch([slide], config)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.summary is not None
    stats = outcome.summary["statistics"]
    assert stats["tissue_area_mm2"] > 0.3
    assert stats["nucleus_count"] > 500
    assert np.isfinite(stats["nuclei_per_mm2"])


def test_dask_distributed_batch(small_slide: Path, tmp_path: Path) -> None:
    from distributed import Client

    from slidestream.distributed import run_batch_dask

    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide")
    config = RunConfig(
        out_dir=tmp_path / "out",
        nuclei_model="classical",
        workers=0,
        show_progress=False,
        db_url=f"sqlite:///{tmp_path / 'stats.db'}",
    )
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as c:
        outcomes = run_batch_dask([small_slide, bad], config, scheduler=c)
    assert [o.status for o in outcomes] == ["succeeded", "failed"]
    assert (tmp_path / "out" / "small-demo" / "summary.json").is_file()
    assert "broken.svs" in (tmp_path / "out" / "failures.csv").read_text()
