"""The cohort summaries equal those of the previous implementation (kept here as reference).

The reference is the numpy-only ``query_cohort`` of revision 0002 (one row per slide through
the ``slides.latest_run_id`` pointer, then per-group ``numpy.percentile``), copied verbatim
apart from names. The cohort has ties, ``NULL`` values, flagged slides, superseded, failed and
skipped runs, slides without metadata, classes missing from a latest run and an integer metric;
both backends (PostgreSQL aggregates in SQL, SQLite in vectorised numpy) must give the same
groups in the same order, the same counts and ``None``s, and the same numbers up to rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sqlalchemy import (
    ColumnElement,
    Engine,
    Float,
    FromClause,
    Select,
    Table,
    and_,
    exists,
    select,
)
from sqlalchemy.orm import aliased

from slidestream.db import (
    BUILTIN_COLUMNS,
    ClassStatistics,
    QCFlag,
    Slide,
    SlideMetadata,
    SlideStatistics,
    flag_slide,
    import_metadata,
    query_cohort,
    record_failure,
    record_run,
    record_skip,
)
from slidestream.db._query import grouped_summaries

from .conftest import build_summary

_SLIDES: Table = Slide.__table__  # type: ignore[assignment]
_SSTATS: Table = SlideStatistics.__table__  # type: ignore[assignment]
_CSTATS: Table = ClassStatistics.__table__  # type: ignore[assignment]
_FLAGS: Table = QCFlag.__table__  # type: ignore[assignment]
_META: Table = SlideMetadata.__table__  # type: ignore[assignment]


# --- The reference: query_cohort as of revision 0002 -------------------------------------------


def _builtin_filter(column: str, values: Sequence[str]) -> ColumnElement[bool]:
    col = _SLIDES.c[column]
    if isinstance(col.type, Float):
        return col.in_([float(v) for v in values])
    return col.in_(list(values))


def _cohort_select(
    *,
    by: Sequence[str],
    tissue_class: str | None,
    where: Mapping[str, str | Sequence[str]],
    metrics: Sequence[str],
    include_flagged: bool,
) -> Select[Any]:
    stats = _CSTATS if tissue_class is not None else _SSTATS
    on = stats.c.run_id == _SLIDES.c.latest_run_id
    if tissue_class is not None:
        on = and_(on, stats.c.tissue_class == tissue_class)
    source: FromClause = _SLIDES.join(stats, on)
    conditions: list[ColumnElement[bool]] = []
    for key, raw in where.items():
        values = [raw] if isinstance(raw, str) else list(raw)
        if key in BUILTIN_COLUMNS:
            conditions.append(_builtin_filter(key, values))
            continue
        meta = aliased(_META)
        source = source.join(
            meta,
            and_(meta.c.slide_id == _SLIDES.c.id, meta.c.key == key, meta.c.value.in_(values)),
        )
    group_cols: list[ColumnElement[Any]] = []
    for i, key in enumerate(by):
        if key in BUILTIN_COLUMNS:
            group_cols.append(_SLIDES.c[key].label(f"g{i}"))
            continue
        meta = aliased(_META)
        source = source.outerjoin(meta, and_(meta.c.slide_id == _SLIDES.c.id, meta.c.key == key))
        group_cols.append(meta.c.value.label(f"g{i}"))
    if not include_flagged:
        conditions.append(~exists().where(_FLAGS.c.slide_id == _SLIDES.c.id))
    metric_cols = [stats.c[m].label(f"m{i}") for i, m in enumerate(metrics)]
    return select(*group_cols, *metric_cols).select_from(source).where(*conditions)


def _summary(arr: npt.NDArray[np.float64]) -> dict[str, float | int | None]:
    n = int(arr.size)
    if n == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "q1": None, "q3": None}
    q1, median, q3 = np.percentile(arr, [25.0, 50.0, 75.0])
    return {
        "n": n,
        "mean": float(arr.mean()),
        "median": float(median),
        "std": float(arr.std(ddof=1)) if n > 1 else None,
        "q1": float(q1),
        "q3": float(q3),
    }


def _sort_key(group: tuple[Any, ...]) -> tuple[tuple[bool, str], ...]:
    return tuple((value is None, "" if value is None else f"{value}") for value in group)


def reference_query_cohort(
    engine: Engine,
    *,
    by: Sequence[str] = (),
    tissue_class: str | None = None,
    where: Mapping[str, str | Sequence[str]] | None = None,
    metrics: Sequence[str] = ("nuclei_per_mm2",),
    include_flagged: bool = False,
) -> list[dict[str, Any]]:
    by = tuple(by)
    metrics = tuple(metrics)
    stmt = _cohort_select(
        by=by,
        tissue_class=tissue_class,
        where=where or {},
        metrics=metrics,
        include_flagged=include_flagged,
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    n_by, n_rows = len(by), len(rows)
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in range(n_by + len(metrics))]
    keys = list(zip(*columns[:n_by], strict=True)) if n_by else [()] * n_rows
    index: dict[tuple[Any, ...], int] = {}
    codes = np.fromiter(
        (index.setdefault(key, len(index)) for key in keys), dtype=np.intp, count=n_rows
    )
    values = [np.asarray(columns[n_by + j], dtype=np.float64) for j in range(len(metrics))]
    result: list[dict[str, Any]] = []
    for group in sorted(index, key=_sort_key):
        selected = codes == index[group]
        for metric, column in zip(metrics, values, strict=True):
            group_values = column[selected]
            out: dict[str, Any] = dict(zip(by, group, strict=True))
            if tissue_class is not None:
                out["tissue_class"] = tissue_class
            out["metric"] = metric
            out.update(_summary(group_values[~np.isnan(group_values)]))
            result.append(out)
    return result


# --- The cohort ----------------------------------------------------------------------------

DIAGNOSES = ("LUAD", "LUSC", "SCLC", "mesothelioma")
COMMON = {"parameters": {"a": 1}, "parameters_hash": "h", "software_version": "0.1.0"}


@pytest.fixture
def mixed_cohort(engine: Engine) -> Engine:
    rng = np.random.default_rng(26)
    # Few distinct values: many ties, within and across groups.
    levels = [500.0, 750.0, 1000.0, 1000.0, 1250.0, 3000.0]
    rows = []
    for i in range(64):
        name = f"s{i:02d}"
        density: float | None = float(rng.choice(levels))
        if i % 9 == 4:
            density = None  # no nuclei: NULL densities
        classes: dict[str, float | None] = {"tumour": 2 * density if density else None}
        if i % 5:
            classes["stroma"] = float(rng.choice(levels))
        summary = build_summary(name, nuclei_per_mm2=density, classes=classes)
        summary["statistics"]["tissue_area_mm2"] = float(rng.choice([10.0, 20.0, 20.0, 35.5]))
        summary["statistics"]["nucleus_count"] = int(rng.integers(1000, 1004))
        record_run(engine, summary)
        if i % 7 == 0:
            # Re-run with other parameters: supersedes the first run (other numbers).
            again = build_summary(
                name,
                nuclei_per_mm2=float(rng.choice(levels)) + 1.0,
                classes={"tumour": 4000.0 + i} if i % 2 else {},
                parameters_hash="e" * 64,
            )
            record_run(engine, again)
        if i % 11 == 0:
            record_failure(
                engine,
                slide_path=f"/data/{name}.svs",
                slide_name=name,
                fingerprint=f"fp-{name}",
                error="later attempt failed",
                **COMMON,
            )
        if i % 13 == 0:
            record_skip(
                engine,
                slide_path=f"/data/{name}.svs",
                slide_name=name,
                fingerprint=f"fp-{name}",
                reason="no tissue",
                **COMMON,
            )
        if i % 8 != 3:  # some slides have no diagnosis: the None group
            row = {"slide": name, "diagnosis": DIAGNOSES[i % 4], "site": "AB"[i % 3 == 0]}
            row["patient_id"] = f"P{i // 3}"
            rows.append(row)
    # A slide that only ever failed (no statistics) and one never analysed successfully.
    record_failure(
        engine,
        slide_path="/data/broken.svs",
        slide_name="broken",
        fingerprint="fp-broken",
        error="boom",
        **COMMON,
    )
    import_metadata(engine, [*rows, {"slide": "broken", "diagnosis": "LUAD"}])
    for i in (1, 2, 17, 30, 45):
        flag_slide(engine, f"s{i:02d}", reason="out of focus")
    return engine


QUERIES: list[dict[str, Any]] = [
    {},
    {"by": ["diagnosis"]},
    {"by": ["diagnosis"], "include_flagged": True},
    {"by": ["diagnosis", "site"], "metrics": ["nuclei_per_mm2", "tissue_area_mm2"]},
    {"by": ["diagnosis"], "tissue_class": "tumour", "metrics": ["nuclei_per_mm2", "fraction"]},
    {"by": ["site"], "tissue_class": "stroma", "metrics": ["nuclei_per_mm2", "nucleus_count"]},
    {"by": ["diagnosis"], "where": {"site": "A"}, "metrics": ["nucleus_count"]},
    {"by": ["vendor", "diagnosis"], "where": {"diagnosis": ["LUAD", "SCLC"]}},
    {"by": ["objective_power"], "where": {"vendor": "aperio", "site": ["A", "B"]}},
    {"by": ["patient_id"], "metrics": ["nuclei_per_mm2", "mean_hematoxylin_od"]},
    {"by": ["diagnosis"], "where": {"diagnosis": "nope"}},
    {"tissue_class": "absent"},
]


def _assert_same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w)  # same columns in the same order
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-12, abs=1e-9), (key, g, w)
            else:
                assert g[key] == value, (key, g, w)  # groups, metric, n, None


def test_summaries_equal_the_reference(mixed_cohort: Engine) -> None:
    # One cohort (64 slides recorded run by run), every query of QUERIES on it.
    for query in QUERIES:
        want = reference_query_cohort(mixed_cohort, **query)
        got = query_cohort(mixed_cohort, **query)
        _assert_same(got, want)
    rows = reference_query_cohort(mixed_cohort, by=["diagnosis"], include_flagged=True)
    assert [r["diagnosis"] for r in rows] == [*sorted(DIAGNOSES), None]
    no_value = [i for i in range(64) if i % 9 == 4 and i % 7]  # NULL density, not re-run
    assert sum(r["n"] for r in rows) == 64 - len(no_value)
    assert any(r["q1"] == r["median"] for r in rows)  # ties at the quartiles
    many = reference_query_cohort(mixed_cohort, by=["patient_id"])
    assert len(many) > 15 and any(r["n"] == 1 for r in many) and any(r["n"] > 1 for r in many)


@pytest.mark.parametrize("seed", range(6))
def test_grouped_summaries_equal_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_groups = int(rng.integers(1, 40))
    size = int(rng.integers(0, 600))
    codes = rng.integers(0, n_groups, size=size).astype(np.intp)
    values = rng.choice(rng.normal(100.0, 30.0, size=7), size=size)  # heavy ties
    values[rng.random(size) < 0.1] = np.nan
    got = grouped_summaries(codes, values, n_groups)
    for g in range(n_groups):
        arr = values[(codes == g) & ~np.isnan(values)]
        want = _summary(arr)
        n, mean, std, q1, median, q3 = got[g]
        assert n == want["n"]
        for name, value in (("mean", mean), ("std", std), ("q1", q1), ("median", median)):
            expected = want[name]
            if expected is None:
                assert value is None
            else:
                assert value == pytest.approx(expected, rel=1e-12)
        assert q3 == want["q3"]  # quantiles interpolate exactly as numpy does
        assert q1 == want["q1"] and median == want["median"]
