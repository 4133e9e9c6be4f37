"""Cohort import and queries on a small hand-built cohort (both backends)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, inspect

from slidestream.db import (
    flag_slide,
    import_metadata,
    import_metadata_csv,
    list_slides,
    query_cohort,
    query_cohort_df,
    record_run,
    unflag_slide,
)
from slidestream.errors import ConfigError

INJECTION = "x'); DROP TABLE slides;--"

DENSITY = {"s1": 1000.0, "s2": 2000.0, "s3": 4000.0, "s4": 500.0, "s5": 1500.0, "s6": 800.0}
DIAGNOSIS = {"s1": "LUAD", "s2": "LUAD", "s3": "LUAD", "s4": "LUSC", "s5": "LUSC"}
SITE = {"s1": "A", "s4": "A", "s2": "B", "s3": "B", "s5": "B", "s6": "B"}


@pytest.fixture
def cohort(engine: Engine, make_summary) -> Engine:
    for name, density in DENSITY.items():
        record_run(
            engine,
            make_summary(
                name, nuclei_per_mm2=density, classes={"tumour": 2 * density, "stroma": 100.0}
            ),
        )
    # s2 rerun with other parameters: its latest run counts (3000 instead of 2000).
    record_run(
        engine,
        make_summary(
            "s2", nuclei_per_mm2=3000.0, parameters_hash="e" * 64, classes={"tumour": 6000.0}
        ),
    )
    rows = [{"slide": n, "diagnosis": DIAGNOSIS.get(n, ""), "site": SITE[n]} for n in DENSITY]
    report = import_metadata(engine, rows)
    assert report.unmatched == () and report.matched_rows == 6
    flag_slide(engine, "s3", reason="out of focus")
    return engine


def _expected(values: list[float]) -> dict[str, float | int | None]:
    arr = np.asarray(values)
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "q1": float(np.percentile(arr, 25)),
        "q3": float(np.percentile(arr, 75)),
    }


def _strip(row: dict[str, object]) -> dict[str, object]:
    return {k: row[k] for k in ("n", "mean", "median", "std", "q1", "q3")}


def test_query_by_diagnosis(cohort: Engine) -> None:
    rows = query_cohort(cohort, by=["diagnosis"], metrics=["nuclei_per_mm2"])
    by = {r["diagnosis"]: r for r in rows}
    assert list(by) == ["LUAD", "LUSC", None]  # slides without the key group last, as None
    assert _strip(by["LUAD"]) == pytest.approx(_expected([1000.0, 3000.0]))
    assert _strip(by["LUSC"]) == pytest.approx(_expected([500.0, 1500.0]))
    assert _strip(by[None]) == _expected([800.0]) | {"std": None}


def test_flagged_slides_excluded_unless_asked(cohort: Engine) -> None:
    rows = query_cohort(cohort, by=["diagnosis"], where={"diagnosis": "LUAD"}, include_flagged=True)
    assert len(rows) == 1 and rows[0]["n"] == 3
    assert rows[0]["median"] == 3000.0
    assert unflag_slide(cohort, "s3") == 1
    assert query_cohort(cohort, where={"diagnosis": "LUAD"})[0]["n"] == 3


def test_query_class_two_keys_and_where(cohort: Engine) -> None:
    rows = query_cohort(
        cohort,
        by=["diagnosis", "site"],
        tissue_class="tumour",
        where={"site": ["A", "B"], "vendor": "aperio"},
        metrics=["nuclei_per_mm2", "fraction"],
    )
    got = {(r["diagnosis"], r["site"], r["metric"]): r for r in rows}
    assert got[("LUAD", "B", "nuclei_per_mm2")]["mean"] == 6000.0  # s2's latest run only
    assert got[("LUAD", "A", "nuclei_per_mm2")]["n"] == 1
    assert got[("LUSC", "A", "fraction")]["mean"] == 0.5
    assert all(r["tissue_class"] == "tumour" for r in rows)
    stroma = query_cohort(cohort, tissue_class="stroma", metrics=["nuclei_per_mm2"])
    assert stroma[0]["n"] == 4  # s2's latest run has no stroma; s3 is flagged


def test_bad_metric(cohort: Engine) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        query_cohort(cohort, metrics=["tissue_area_mm2; DROP TABLE slides"])
    with pytest.raises(ConfigError, match="does not exist"):
        query_cohort(cohort, tissue_class="tumour", metrics=["tissue_area_mm2"])
    with pytest.raises(ConfigError, match="is a number"):
        query_cohort(cohort, where={"objective_power": "forty"})
    assert query_cohort(cohort, where={"objective_power": "40"})[0]["n"] == 5


def test_injection_strings_are_values(cohort: Engine) -> None:
    import_metadata(cohort, [{"name": "s5", "diagnosis": INJECTION, INJECTION: "v"}])
    rows = query_cohort(cohort, by=[INJECTION], where={"diagnosis": INJECTION})
    assert rows == [
        {INJECTION: "v", "metric": "nuclei_per_mm2"} | _expected([1500.0]) | {"std": None}
    ]
    assert query_cohort(cohort, where={"diagnosis": "x"}) == []
    assert query_cohort(cohort, where={"vendor": INJECTION}) == []
    flag_slide(cohort, "s5", reason=INJECTION, flag=INJECTION)
    assert "slides" in inspect(cohort).get_table_names()
    s5 = next(s for s in list_slides(cohort) if s["name"] == "s5")
    assert s5["metadata"]["diagnosis"] == INJECTION and s5["flags"] == [INJECTION]


def test_list_slides(cohort: Engine) -> None:
    slides = list_slides(cohort)
    assert [s["name"] for s in slides] == sorted(DENSITY)
    s2 = slides[1]
    assert s2["nuclei_per_mm2"] == 3000.0 and s2["metadata"] == {"diagnosis": "LUAD", "site": "B"}
    assert slides[2]["flags"] == ["qc"]
    assert [s["name"] for s in list_slides(cohort, include_flagged=False)] == [
        "s1",
        "s2",
        "s4",
        "s5",
        "s6",
    ]


def test_query_cohort_df(cohort: Engine) -> None:
    pytest.importorskip("pandas")
    df = query_cohort_df(cohort, by=["site"], metrics=["nuclei_per_mm2", "tissue_area_mm2"])
    assert list(df.columns) == ["site", "metric", "n", "mean", "median", "std", "q1", "q3"]
    assert len(df) == 4


def test_import_csv_by_fingerprint_path_and_name(
    engine: Engine, make_summary, tmp_path: Path
) -> None:
    for name in ("a", "b", "c"):
        record_run(engine, make_summary(name))
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text(
        "slide;diagnosis;stage\nfp-a;LUAD;I\n/data/b.svs;LUSC;\nc;LUAD;III\nnope;X;Y\n",
        encoding="utf-8",
    )
    report = import_metadata_csv(engine, csv_path)
    assert (report.rows, report.matched_rows, report.slides) == (4, 3, 3)
    assert report.values == 5 and report.unmatched == ("nope",)
    meta = {s["name"]: s["metadata"] for s in list_slides(engine)}
    assert meta == {
        "a": {"diagnosis": "LUAD", "stage": "I"},
        "b": {"diagnosis": "LUSC"},
        "c": {"diagnosis": "LUAD", "stage": "III"},
    }
    # re-import updates values instead of duplicating them
    import_metadata(engine, [{"fingerprint": "fp-a", "diagnosis": "LUSC"}])
    assert list_slides(engine)[0]["metadata"]["diagnosis"] == "LUSC"
    with pytest.raises(ConfigError, match="no slide column"):
        import_metadata(engine, [{"patient": "p", "x": "1"}])


def test_import_by_patient(engine: Engine, make_summary) -> None:
    for name in ("a", "b", "c"):
        record_run(engine, make_summary(name))
    import_metadata(
        engine, [{"slide": "a", "patient_id": "P1"}, {"slide": "b", "patient_id": "P1"}]
    )
    report = import_metadata(
        engine,
        [{"patient_id": "P1", "sex": "F", "stage": "II"}, {"patient_id": "P9", "sex": "M"}],
        key="patient",
    )
    assert report.matched_rows == 1 and report.slides == 2 and report.unmatched == ("P9",)
    # a slide linked to the patient later inherits the patient's values
    import_metadata(engine, [{"slide": "c", "patient_id": "P1", "stage": "III"}])
    meta = {s["name"]: s["metadata"] for s in list_slides(engine)}
    assert meta["a"] == {"patient_id": "P1", "sex": "F", "stage": "II"}
    assert meta["c"] == {"patient_id": "P1", "sex": "F", "stage": "III"}  # slide value wins
    rows = query_cohort(engine, by=["sex"])
    assert [(r["sex"], r["n"]) for r in rows] == [("F", 3)]


def test_flag_needs_one_slide(engine: Engine, make_summary) -> None:
    record_run(engine, make_summary("a"))
    record_run(engine, make_summary("a", fingerprint="other"))
    with pytest.raises(ConfigError, match="2 slides"):
        flag_slide(engine, "a", reason="dup")
    with pytest.raises(ConfigError, match="no slide"):
        flag_slide(engine, "zzz", reason="?")
    flag_slide(engine, "other", reason="blurry")
    flag_slide(engine, "other", reason="very blurry")
    assert list_slides(engine)[1]["flags"] == ["qc"]
