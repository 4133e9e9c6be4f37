"""Per-nucleus-type statistics in the database: record_run fills them, queries read them
(``query --type``), the slide list shows them, superseded runs drop out (both backends)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select

from slidestream.cli import cli
from slidestream.db import (
    TypeStatistics,
    import_metadata,
    list_slides,
    query_cohort,
    record_run,
)
from slidestream.errors import ConfigError

# slide -> tumour inflammatory / epithelial density (nuclei per mm² of tumour)
TILS = {"s1": (100.0, 400.0), "s2": (300.0, 300.0), "s3": (50.0, 500.0), "s4": (600.0, 200.0)}
DIAGNOSIS = {"s1": "LUAD", "s2": "LUAD", "s3": "LUSC", "s4": "LUSC"}


def _types(inflammatory: float, epithelial: float) -> dict[str, dict[str, float]]:
    return {
        "": {"inflammatory": inflammatory / 2, "epithelial": epithelial / 2, "spindle": 80.0},
        "tumour": {"inflammatory": inflammatory, "epithelial": epithelial, "spindle": 10.0},
        "stroma": {"inflammatory": 20.0, "epithelial": 0.0, "spindle": 150.0},
    }


@pytest.fixture
def typed_cohort(engine: Engine, make_summary) -> Engine:
    for name, (inf, epi) in TILS.items():
        record_run(engine, make_summary(name, types=_types(inf, epi)))
    # s1 rerun (other parameters): its latest run counts, the first one's type rows drop out
    record_run(engine, make_summary("s1", parameters_hash="f" * 64, types=_types(200.0, 400.0)))
    # an untyped slide (a model without a type head): no type rows, no group
    record_run(engine, make_summary("s5"))
    import_metadata(engine, [{"slide": n, "diagnosis": d} for n, d in DIAGNOSIS.items()])
    return engine


def test_record_run_writes_one_row_per_region_and_type(typed_cohort: Engine) -> None:
    with typed_cohort.connect() as conn:
        total = conn.execute(select(func.count()).select_from(TypeStatistics)).scalar_one()
        latest = conn.execute(
            select(func.count()).select_from(TypeStatistics).where(TypeStatistics.latest)
        ).scalar_one()
    assert total == 5 * 9  # 5 typed runs x (tissue + 2 classes) x 3 types
    assert latest == 4 * 9  # s1's first run is superseded


def test_query_til_density_by_diagnosis(typed_cohort: Engine) -> None:
    rows = query_cohort(
        typed_cohort,
        by=["diagnosis"],
        tissue_class="tumour",
        nucleus_type="inflammatory",
        metrics=["nuclei_per_mm2"],
    )
    got = {r["diagnosis"]: (r["n"], r["mean"], r["median"]) for r in rows}
    assert got == {"LUAD": (2, 250.0, 250.0), "LUSC": (2, 325.0, 325.0)}
    assert rows[0]["tissue_class"] == "tumour" and rows[0]["nucleus_type"] == "inflammatory"
    # over the whole tissue (no --class)
    whole = query_cohort(typed_cohort, nucleus_type="inflammatory", metrics=["nuclei_per_mm2"])
    assert whole[0]["n"] == 4 and whole[0]["mean"] == pytest.approx((100 + 150 + 25 + 300) / 4)
    # the ratio of inflammatory to epithelial nuclei in tumour, per slide, summarised
    ratio = query_cohort(
        typed_cohort, tissue_class="tumour", metrics=["inflammatory_epithelial_ratio"]
    )
    assert ratio[0]["n"] == 4  # the untyped slide s5 has no ratio
    assert ratio[0]["median"] == pytest.approx((0.5 + 1.0) / 2)


def test_type_metric_errors_name_the_scope(typed_cohort: Engine) -> None:
    message = "'area_mm2' does not exist for nucleus type 'inflammatory' in the whole tissue"
    with pytest.raises(ConfigError, match=message):
        query_cohort(typed_cohort, nucleus_type="inflammatory", metrics=["area_mm2"])


def test_slide_list_has_per_type_columns(typed_cohort: Engine) -> None:
    rows = {r["name"]: r for r in list_slides(typed_cohort)}
    assert rows["s4"]["inflammatory_per_mm2"] == pytest.approx(300.0)
    assert rows["s1"]["inflammatory_per_mm2"] == pytest.approx(100.0)  # latest run
    assert rows["s5"]["inflammatory_per_mm2"] is None
    assert rows["s2"]["epithelial_fraction"] == pytest.approx(3000 / (3000 + 3000 + 1600))


def test_query_cli_type_in_table_csv_and_json(typed_cohort: Engine, db_url: str) -> None:
    runner = CliRunner()
    args = ["query", "--db", db_url, "--by", "diagnosis", "--class", "tumour"]
    args += ["--type", "inflammatory", "--metric", "nuclei_per_mm2"]
    result = runner.invoke(cli, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["diagnosis"], r["nucleus_type"], r["mean"]) for r in rows] == [
        ("LUAD", "inflammatory", 250.0),
        ("LUSC", "inflammatory", 325.0),
    ]
    csv_out = runner.invoke(cli, [*args, "--format", "csv"])
    assert csv_out.exit_code == 0 and csv_out.output.splitlines()[0].startswith(
        "diagnosis,tissue_class,nucleus_type,metric,n,"
    )
    table = runner.invoke(cli, args)
    assert table.exit_code == 0 and "inflammatory" in table.output
    listing = runner.invoke(cli, ["query", "--db", db_url, "--slides", "--format", "csv"])
    assert listing.exit_code == 0 and "inflammatory_per_mm2" in listing.output.splitlines()[0]
    bad = runner.invoke(cli, ["query", "--db", db_url, "--slides", "--type", "inflammatory"])
    assert bad.exit_code == 2


def test_slide_list_shows_a_user_vocabulary(
    typed_cohort: Engine, make_summary, db_url: str
) -> None:
    """Slides typed by a ``train nuclei-types`` model get their own ``<type>_per_mm2`` columns
    (after the shipped four), in CSV and table output, empty for the other slides."""
    from slidestream.db import recorded_type_names

    user = {"": {"Immune cells": 120.0, "Tumor": 480.0}, "tumour": {"Immune cells": 90.0}}
    record_run(typed_cohort, make_summary("s6", types=user))
    names = recorded_type_names(typed_cohort)
    assert names == ("epithelial", "inflammatory", "spindle", "other", "Immune cells", "Tumor")
    listing = CliRunner().invoke(cli, ["query", "--db", db_url, "--slides", "--format", "csv"])
    assert listing.exit_code == 0, listing.output
    header, *rows = listing.output.splitlines()
    columns = header.split(",")
    assert columns.index("Immune cells_per_mm2") > columns.index("other_per_mm2")
    cells = {r.split(",")[0]: r.split(",") for r in rows}
    assert float(cells["s6"][columns.index("Immune cells_per_mm2")]) == pytest.approx(120.0)
    assert cells["s4"][columns.index("Tumor_per_mm2")] == ""
