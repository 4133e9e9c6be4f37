"""Unit tests of the application layer: config, inputs, publishing, statistics, CLI frame."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from slidestream.cli import cli
from slidestream.config import RunConfig, load_config_file
from slidestream.errors import ConfigError
from slidestream.inputs import discover_slides
from slidestream.pipeline.write import publish, staging_dir
from slidestream.statistics import StatisticsAccumulator
from slidestream.summary import SUMMARY_NAME


def test_help_is_fast_and_imports_no_torch() -> None:
    code = (
        "import sys; from slidestream.cli import cli; "
        "from click.testing import CliRunner; "
        "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'openslide', 'monai', 'cv2') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"--help imported {out}"


def test_version_and_usage_exit_codes() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and "slidestream" in result.output
    assert runner.invoke(cli, ["no-such-command"]).exit_code == 2
    assert runner.invoke(cli, ["run"]).exit_code == 2  # missing inputs


def test_library_error_is_one_line_exit_1(tmp_path: Path) -> None:
    missing_mpp = tmp_path / "tile.png"
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(missing_mpp)
    result = CliRunner().invoke(cli, ["tissue", str(missing_mpp), "--out", str(tmp_path / "m.png")])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "tile.png" in lines[0] and "--mpp" in lines[0]


def test_info_on_a_slide_without_mpp_shows_everything_else(tmp_path: Path) -> None:
    """Regression: ``info`` failed on a slide without µm/px (e.g. a reduced TCGA SVS)."""
    import tifffile

    path = tmp_path / "no-mpp.tif"
    rgb = np.full((512, 768, 3), 230, np.uint8)
    with tifffile.TiffWriter(path) as tif:  # tiled, two levels, no resolution tags
        tif.write(rgb, tile=(256, 256), photometric="rgb", subifds=0)
        tif.write(rgb[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)
    human = CliRunner().invoke(cli, ["info", str(path)])
    assert human.exit_code == 0, human.output
    assert "768 x 512 px" in human.output and "fingerprint" in human.output
    assert "µm/px             unknown" in human.output and "--mpp" in human.output
    as_json = CliRunner().invoke(cli, ["info", "--json", str(path)])
    record = json.loads(as_json.output)
    assert record["mpp_x"] is None and record["levels"][0]["mpp"] is None
    assert record["width"] == 768 and len(record["fingerprint"]) == 64
    given = json.loads(
        CliRunner().invoke(cli, ["info", "--json", str(path), "--mpp", "0.5"]).output
    )
    assert given["mpp_x"] == 0.5 and given["levels"][-1]["mpp"] == pytest.approx(1.0)


def test_config_validation_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--mpp"):
        RunConfig(out_dir=tmp_path, mpp_override=0.0)
    with pytest.raises(ConfigError, match="--device"):
        RunConfig(out_dir=tmp_path, device="tpu")
    with pytest.raises(ConfigError, match="points"):
        RunConfig(out_dir=tmp_path, nuclei_as="dots")  # type: ignore[arg-type]


def test_parameters_hash_tracks_results_not_speed(tmp_path: Path) -> None:
    base = RunConfig(out_dir=tmp_path)
    models = {"nuclei": "a", "tissue": "b"}
    assert base.parameters_hash(models) == base.with_options(batch_size=64).parameters_hash(models)
    assert base.parameters_hash(models) != base.with_options(
        min_tissue_fraction=0.5
    ).parameters_hash(models)
    assert base.parameters_hash(models) != base.parameters_hash({"nuclei": "c", "tissue": "b"})


def test_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text("[resources]\nbatch_size = 4\n[nuclei]\nas = 'points'\n")
    assert load_config_file(cfg) == {"batch_size": 4, "nuclei_as": "points"}
    cfg.write_text("[resources]\nbatch_sise = 4\n")
    with pytest.raises(ConfigError, match=r"run\.toml.*batch_sise"):
        load_config_file(cfg)


def test_discover_slides_folders_manifest_dicom(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.svs").write_bytes(b"x")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / "tile.png").write_bytes(b"x")  # images are slides only when named
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "two.ome.tif").write_bytes(b"x")
    (tmp_path / "a" / "dcm").mkdir()
    for i in range(2):
        (tmp_path / "a" / "dcm" / f"f{i}.dcm").write_bytes(b"x")
    found = discover_slides([tmp_path / "a"])
    assert [p.name for p in found] == ["one.svs", "two.ome.tif", "dcm"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,diagnosis\na/one.svs,x\na/one.svs,x\nmissing.svs,y\n")
    from_manifest = discover_slides([manifest, tmp_path / "a" / "one.svs"])
    assert [p.name for p in from_manifest] == ["one.svs", "missing.svs"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.svs\n")
    with pytest.raises(ConfigError, match="'path' column"):
        discover_slides([bad])


def test_publish_moves_everything_summary_last(tmp_path: Path) -> None:
    final = tmp_path / "slide"
    final.mkdir()
    (final / "old.txt").write_text("keep")
    (final / SUMMARY_NAME).write_text(json.dumps({"v": 1}))
    stage = staging_dir(final)
    assert stage.parent == tmp_path and stage.name == ".slide.partial"
    (stage / "nuclei.parquet").write_text("new")
    (stage / SUMMARY_NAME).write_text(json.dumps({"v": 2}))
    publish(stage, final)
    assert not stage.exists()
    assert (final / "nuclei.parquet").read_text() == "new"
    assert (final / "old.txt").read_text() == "keep"
    assert json.loads((final / SUMMARY_NAME).read_text()) == {"v": 2}


def test_stale_staging_is_replaced(tmp_path: Path) -> None:
    stage = staging_dir(tmp_path / "s")
    (stage / "half.geojson").write_text("partial")
    again = staging_dir(tmp_path / "s")
    assert again == stage and list(again.iterdir()) == []


def test_statistics_accumulator() -> None:
    acc = StatisticsAccumulator(("tumour", "stroma"))
    acc.add(area_um2=[10, 20, 30], hematoxylin_od=[1.0, 1.0, 0.5], class_index=[0, 0, 1])
    acc.add(area_um2=[40], hematoxylin_od=[0.5], class_index=[1])
    res = acc.result(tissue_area_mm2=2.0, class_area_mm2={"tumour": 0.5, "stroma": 1.5})
    assert res.nucleus_count == 4
    assert res.nuclei_per_mm2 == pytest.approx(2.0)
    assert res.nucleus_area_um2.median == pytest.approx(25.0)
    assert res.mean_hematoxylin_od == pytest.approx(0.75)
    tumour = res.classes["tumour"]
    assert tumour.nucleus_count == 2 and tumour.nuclei_per_mm2 == pytest.approx(4.0)
    assert tumour.fraction == pytest.approx(0.25)
    empty = StatisticsAccumulator(("a",)).result(tissue_area_mm2=0.0, class_area_mm2={})
    assert empty.nuclei_per_mm2 is None and empty.nucleus_area_um2.mean is None
    dropped = StatisticsAccumulator(("a", "b")).result(
        tissue_area_mm2=1.0, class_area_mm2={"a": 1.0}, drop_empty=("b",)
    )
    assert set(dropped.classes) == {"a"}


@pytest.mark.parametrize(
    ("cpus", "device", "fp32_cpu_model", "expected_post"),
    [
        (1, "cpu", True, 0),
        (2, "cpu", True, 0),
        (2, "cpu", False, 1),  # bf16 network or the classical model: keep the worker
        (8, "cpu", True, 4),
        (2, "cuda", False, 1),
        (16, "cuda:0", False, 11),
    ],
)
def test_worker_counts_post_process_inline_only_for_fp32_models_on_small_cpus(
    tmp_path: Path,
    cpus: int,
    device: str,
    fp32_cpu_model: bool,
    expected_post: int,
) -> None:
    from types import SimpleNamespace

    from slidestream import pipeline

    # stand-in nucleus models: a torch network (``net``) in fp32, or one in bf16
    nuclei = SimpleNamespace(net=object(), precision="fp32" if fp32_cpu_model else "bf16")
    models = pipeline.LoadedModels(nuclei=nuclei, tissue=None, device=device)
    assert pipeline.is_fp32_cpu_model(models) == (fp32_cpu_model and device == "cpu")
    readers, post = pipeline.worker_counts(RunConfig(out_dir=tmp_path), models, cpus=cpus)
    assert post == expected_post
    assert readers >= 1
    # an explicit setting always wins
    explicit = RunConfig(out_dir=tmp_path, postprocess_workers=3)
    assert pipeline.worker_counts(explicit, models, cpus=cpus)[1] == 3


def test_only_a_torch_network_in_fp32_on_the_cpu_counts_as_fp32_cpu_model() -> None:
    from slidestream.models.nuclei import ClassicalSegmenter, load_nuclei_model
    from slidestream.pipeline import LoadedModels
    from slidestream.pipeline import is_fp32_cpu_model as _is_fp32_cpu_model

    fp32 = load_nuclei_model("fast", precision="fp32")
    bf16 = load_nuclei_model("fast", precision="bf16")
    assert _is_fp32_cpu_model(LoadedModels(nuclei=fp32, tissue=None, device="cpu"))
    assert not _is_fp32_cpu_model(LoadedModels(nuclei=bf16, tissue=None, device="cpu"))
    classical = ClassicalSegmenter()
    assert not _is_fp32_cpu_model(LoadedModels(nuclei=classical, tissue=None, device="cpu"))


def test_upsampled_post_processing_keeps_nuclei_in_the_same_level0_frame() -> None:
    import functools

    from slidestream.models.nuclei import PostprocessConfig, make_targets, postprocess_maps
    from slidestream.pipeline import process_nucleus_tile as _process_nucleus_tile

    # A 96 x 96 px tile at 0.5 µm/px on a 0.25 µm/px slide, with 9 discs of radius 6-8 px.
    yy, xx = np.mgrid[:96, :96]
    labels = np.zeros((96, 96), np.int32)
    for i, (cy, cx) in enumerate([(y, x) for y in (20, 48, 76) for x in (20, 48, 76)], start=1):
        labels[np.hypot(yy - cy, xx - cx) <= 6 + (i % 3)] = i
    maps = make_targets(labels)
    rgb = np.full((96, 96, 3), 200, np.uint8)
    rgb[labels > 0] = (90, 60, 140)
    tables = {}
    for u in (1, 2):
        config = PostprocessConfig(fg_threshold=0.5, marker_threshold=0.4, upsample=u)
        post = functools.partial(postprocess_maps, config=config)
        tables[u] = _process_nucleus_tile(
            post, maps, rgb, (8, 8, 88, 88), (1000.0, 2000.0), 2.0, 0.5
        )
    one, two = tables[1], tables[2]
    assert len(one) == len(two) == 9
    order1, order2 = (
        np.argsort(one.centroid_x * 1e4 + one.centroid_y),
        np.argsort(two.centroid_x * 1e4 + two.centroid_y),
    )
    # Same nuclei, same level-0 places (within a working pixel = 2 level-0 px) and areas.
    assert np.allclose(one.centroid_x[order1], two.centroid_x[order2], atol=2.0)
    assert np.allclose(one.centroid_y[order1], two.centroid_y[order2], atol=2.0)
    area1 = np.asarray(one.measurements["area_um2"])[order1]
    area2 = np.asarray(two.measurements["area_um2"])[order2]
    assert np.allclose(area1, area2, rtol=0.12)
    true_total = float((labels > 0).sum()) * 0.5**2  # µm²
    assert abs(area2.sum() / true_total - 1) < 0.1
    # Colour and optical density are means of the tile's own pixels at both resolutions.
    assert np.allclose(np.asarray(two.measurements["mean_r"]), 90, atol=8)
    od1 = np.asarray(one.measurements["hematoxylin_od"])[order1]
    od2 = np.asarray(two.measurements["hematoxylin_od"])[order2]
    assert np.allclose(od1, od2, rtol=0.02)


def test_classical_tiles_of_any_shape_keep_their_frame() -> None:
    from slidestream.models.nuclei import ClassicalSegmenter
    from slidestream.pipeline import process_nucleus_tile as _process_nucleus_tile

    # The classical model's "maps" are the RGB tile itself (channels last), here not square.
    yy, xx = np.mgrid[:160, :64]  # taller than wide
    rgb = np.full((160, 64, 3), 235, np.uint8)
    for cy in (30, 80, 130):
        rgb[np.hypot(yy - cy, xx - 32) <= 8] = (70, 40, 130)
    seg = ClassicalSegmenter()
    table = _process_nucleus_tile(
        seg.segment_working, rgb, rgb, (0, 0, 64, 160), (0.0, 0.0), 2.0, seg.mpp
    )
    assert len(table) == 3
    assert np.allclose(np.sort(table.centroid_y), [61, 161, 261], atol=3)  # level-0 = 2 x tile


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[resources]\nbatch_size = "8"\n', r"\[resources\] batch_size = '8': expected an integer"),
        ('[slides]\nmpp = "x"\n', r"\[slides\] mpp = 'x': expected a number"),
        ("[resources]\nbatch_size = 0\n", r"batch_size = 0: 0 is not in the range 1<=x<=1024"),
        ("[slides]\nmpp = 500.0\n", r"mpp = 500.0: 500.0 is not in the range 0.01<=x<=100"),
        ('[resources]\ndevice = "tpu"\n', r"device = 'tpu'.*auto, cpu or cuda"),
        ('[nuclei]\nas = "dots"\n', r"'dots' is not one of 'polygons', 'points'"),
        ("[run]\nforce = 1\n", r"force = 1: expected true/false"),
        ("[resources]\nbatch_size = 4\nbatch_size = 8\n", r"line 3: \[resources\] batch_size is"),
        ("[tissue]\nmask_mpp = 8.0\n[tissue]\nmodel = 'x'\n", r"line 3: \[tissue\] is given"),
        ("[tiling]\nsize = 4\n", r"unknown table 'tiling'"),
        ("batch_size = 4\n", r"unknown key 'batch_size'"),
        ("[resources\n", r"not valid TOML"),
    ],
)
def test_config_file_errors_name_the_file_and_key_like_the_cli(
    tmp_path: Path, text: str, message: str
) -> None:
    """Regression: wrong-typed config values ended in a TypeError traceback."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config_file(cfg)
    assert str(cfg) in str(info.value) and "\n" not in str(info.value)
    # the command line says the same (one line, exit 1), no traceback
    result = CliRunner().invoke(
        cli, ["run", str(cfg), "--out", str(tmp_path / "o"), "--config", str(cfg), "--no-db"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "bad.toml" in result.output


def test_cli_range_and_config_range_are_the_same(tmp_path: Path) -> None:
    """One definition per option: the flag refuses what the config file refuses."""
    result = CliRunner().invoke(
        cli, ["run", str(tmp_path), "--out", str(tmp_path / "o"), "--batch-size", "0"]
    )
    assert result.exit_code == 2 and "0 is not in the range 1<=x<=1024" in result.output
    for command in (["info", "x"], ["tissue", "x", "--out", "m.png"], ["segment", "x"]):
        bad = CliRunner().invoke(cli, [*command, "--mpp", "500"])
        assert bad.exit_code == 2 and "500.0 is not in the range 0.01<=x<=100" in bad.output


def test_config_tree_round_trip_and_single_defaults(tmp_path: Path) -> None:
    from slidestream.config import DEFAULTS, OPTIONS
    from slidestream.tiling import TissueDetectionConfig

    cfg = tmp_path / "good.toml"
    cfg.write_text(
        "[slides]\nmpp = 0.25\n[tissue]\nmin_area_um2 = 5000\n[resources]\nworkers = 0\n"
    )
    config = RunConfig(out_dir=tmp_path, **load_config_file(cfg))
    assert config.mpp_override == 0.25 and config.min_tissue_area_um2 == 5000.0
    tree = config.tree()
    assert tree["slides"]["mpp"] == 0.25 and tree["resources"]["workers"] == 0
    assert {(o.section, o.key) for o in OPTIONS} == {(s, k) for s, t in tree.items() for k in t}
    # `tissue` and `run` share one default minimum tissue area (was 10,000 vs 20,000)
    assert RunConfig(out_dir=tmp_path).min_tissue_area_um2 == DEFAULTS.min_tissue_area_um2
    assert TissueDetectionConfig().min_tissue_area_um2 == DEFAULTS.min_tissue_area_um2


def test_summary_schema_is_documented_field_by_field() -> None:
    """docs/summary.md lists exactly the fields of the schema module."""
    import dataclasses
    import re

    from slidestream import summary as schema

    doc = (Path(__file__).resolve().parents[3] / "docs" / "summary.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_0-9.<>]+)` \|", doc, flags=re.M))
    fields: set[str] = set()
    for block, cls in (
        ("slide", schema.SlideRecord),
        ("statistics", schema.SlideStatistics),
        ("statistics.classes.<class>", schema.ClassStatistics),
        ("statistics.types.<type>", schema.TypeStatistics),
        ("statistics.classes.<class>.types.<type>", schema.TypeStatistics),
        ("provenance", schema.Provenance),
        ("provenance.models.<role>", schema.ModelRecord),
    ):
        fields |= {f"{block}.{f.name}".replace("<class>", "x").replace("<role>", "r")
                   .replace("<type>", "t") for f in dataclasses.fields(cls)}  # fmt: skip
    fields |= {"schema", "outputs"}
    documented = {
        d.replace("<class>", "x").replace("<role>", "r").replace("<type>", "t") for d in documented
    }
    assert documented == fields, (sorted(fields - documented), sorted(documented - fields))
