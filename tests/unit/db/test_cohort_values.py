"""The packed cohort table ``cohort_values``: kept equal to its sources by every writer.

Every test runs on SQLite and PostgreSQL. The expected rows are computed here from the source
tables (latest statistics, flags, metadata) independently of ``slidestream.db._cohort_values``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, select

from slidestream.db import (
    ClassStatistics,
    QCFlag,
    SlideMetadata,
    SlideStatistics,
    connect,
    flag_slide,
    import_metadata,
    query_cohort,
    record_run,
    unflag_slide,
    upgrade,
)
from slidestream.db._cohort_values import COHORT, META_KEYS, META_VALUES

from .conftest import build_summary
from .test_query_reference import _assert_same, reference_query_cohort

_METRICS = ("tissue_area_mm2", "area_mm2", "fraction", "nuclei_per_mm2", "nucleus_count")


def _expected(engine: Engine) -> set[tuple[Any, ...]]:
    """(scope, slide, run, flagged, {key: value}, metrics) from the source tables."""
    with engine.connect() as conn:
        flagged = set(conn.execute(select(QCFlag.slide_id)).scalars())
        meta: dict[int, dict[str, str]] = {}
        for slide_id, key, value in conn.execute(
            select(SlideMetadata.slide_id, SlideMetadata.key, SlideMetadata.value)
        ):
            meta.setdefault(slide_id, {})[key] = value
        slots = {k: s for k, s in conn.execute(select(META_KEYS.c.key, META_KEYS.c.slot))}
        rows = set()
        sstats, cstats = SlideStatistics.__table__, ClassStatistics.__table__
        for r in conn.execute(select(sstats).where(sstats.c.latest)).mappings():
            values = (r["tissue_area_mm2"], None, None, r["nuclei_per_mm2"], r["nucleus_count"])
            rows.add(("", r["slide_id"], r["run_id"], r["slide_id"] in flagged, values))
        for c in conn.execute(select(cstats).where(cstats.c.latest)).mappings():
            values = (None, c["area_mm2"], c["fraction"], c["nuclei_per_mm2"], c["nucleus_count"])
            rows.add(
                (c["tissue_class"], c["slide_id"], c["run_id"], c["slide_id"] in flagged, values)
            )
    out = set()
    for scope, slide_id, run_id, is_flagged, values in rows:
        slotted = tuple(
            sorted((k, v) for k, v in meta.get(slide_id, {}).items() if slots.get(k) is not None)
        )
        out.add((scope, slide_id, run_id, is_flagged, slotted, values))
    return out


def _stored(engine: Engine) -> set[tuple[Any, ...]]:
    with engine.connect() as conn:
        slot_key = {
            slot: key
            for key, slot in conn.execute(select(META_KEYS.c.key, META_KEYS.c.slot))
            if slot is not None
        }
        names = {i: v for i, v in conn.execute(select(META_VALUES.c.id, META_VALUES.c.value))}
        out = set()
        for row in conn.execute(select(COHORT)).mappings():
            slotted = tuple(
                sorted(
                    (key, names[row[f"g{slot}"]])
                    for slot, key in slot_key.items()
                    if row[f"g{slot}"] is not None
                )
            )
            values = tuple(row[m] for m in _METRICS)
            out.add(
                (
                    row["tissue_class"],
                    row["slide_id"],
                    row["run_id"],
                    bool(row["flagged"]),
                    slotted,
                    values,
                )
            )
    return out


def test_every_writer_keeps_cohort_values(engine: Engine) -> None:
    # Metadata before any run (the slides exist through a first run of one of them).
    record_run(engine, build_summary("a", nuclei_per_mm2=100.0))
    import_metadata(engine, [{"slide": "a", "diagnosis": "LUAD", "patient_id": "P1"}])
    assert _stored(engine) == _expected(engine)
    record_run(engine, build_summary("b", nuclei_per_mm2=200.0, classes={"tumour": 5.0}))
    import_metadata(engine, [{"slide": "b", "diagnosis": "LUSC", "patient_id": "P1"}])
    # Per patient: copied onto both slides.
    import_metadata(engine, [{"patient_id": "P1", "site": "Leeds"}], key="patient")
    assert _stored(engine) == _expected(engine)
    # A re-run supersedes the first run; recording it again changes nothing.
    again = build_summary("a", nuclei_per_mm2=150.0, parameters_hash="e" * 64)
    record_run(engine, again)
    record_run(engine, again)
    # A value changes; a slide is flagged, another flagged and unflagged.
    import_metadata(engine, [{"slide": "a", "diagnosis": "SCLC"}])
    flag_slide(engine, "a", reason="blurred")
    flag_slide(engine, "b", reason="pen")
    unflag_slide(engine, "b")
    assert _stored(engine) == _expected(engine)
    rows = query_cohort(engine, by=["diagnosis"], include_flagged=True)
    assert [(r["diagnosis"], r["n"], r["mean"]) for r in rows] == [
        ("LUSC", 1, 200.0),
        ("SCLC", 1, 150.0),
    ]
    assert [r["diagnosis"] for r in query_cohort(engine, by=["diagnosis"])] == ["LUSC"]


def test_keys_beyond_the_slots_match_the_reference(engine: Engine) -> None:
    """With more keys than slots the later keys are joined; the numbers do not change."""
    rows = []
    for i in range(24):
        density = 100.0 + 10.0 * (i % 5)
        record_run(engine, build_summary(f"s{i:02d}", nuclei_per_mm2=density))
        row = {"slide": f"s{i:02d}"}
        row |= {f"k{k:02d}": f"v{(i + k) % 3}" for k in range(11) if (i + k) % 4}
        rows.append(row)
    import_metadata(engine, rows)
    with engine.connect() as conn:
        slots = {k: s for k, s in conn.execute(select(META_KEYS.c.key, META_KEYS.c.slot))}
    assert sorted(k for k, s in slots.items() if s is None) == ["k08", "k09", "k10"]
    assert _stored(engine) == _expected(engine)
    for query in (
        {"by": ["k10"]},
        {"by": ["k00", "k09"], "where": {"k08": ["v0", "v2"]}},
        {"by": ["k01"], "where": {"k10": "v1", "k02": "v0"}},
        {"by": ["vendor", "k03"], "where": {"k09": "v9"}},
    ):
        _assert_same(query_cohort(engine, **query), reference_query_cohort(engine, **query))


def test_upgrade_from_0004_fills_cohort_values(fresh_db_url: str) -> None:
    """A database with data at 0004 gets its packed table on upgrade; queries are unchanged."""
    from .test_migrations import _fill_at_0002

    engine = connect(fresh_db_url)
    try:
        upgrade(engine, "0002")
        _fill_at_0002(engine)  # slides 1 (superseded run 1, latest 3), 2; 3 only failed
        upgrade(engine, "0004")
        with engine.begin() as conn:
            conn.execute(
                SlideMetadata.__table__.insert(),  # type: ignore[attr-defined]
                [{"slide_id": 2, "key": "site", "value": "Leeds"}],
            )
            conn.execute(
                QCFlag.__table__.insert(),  # type: ignore[attr-defined]
                [{"slide_id": 2, "flag": "qc", "reason": "r", "created_at": datetime.now(UTC)}],
            )
        upgrade(engine)
        assert _stored(engine) == _expected(engine)
        # slide 1: slide level + tumour of run 3; slide 2: slide level + tumour of run 2
        assert sorted((r[0], r[1], r[2], r[3]) for r in _stored(engine)) == [
            ("", 1, 3, False),
            ("", 2, 2, True),
            ("tumour", 1, 3, False),
            ("tumour", 2, 2, True),
        ]
        rows = query_cohort(engine, by=["diagnosis", "site"], include_flagged=True)
        assert [(r["diagnosis"], r["site"], r["n"], r["mean"]) for r in rows] == [
            ("LUAD", "Leeds", 1, 200.0),
            ("LUAD", None, 1, 300.0),
        ]
        assert [r["n"] for r in query_cohort(engine, tissue_class="tumour")] == [1]
        # The writers keep the backfilled table.
        import_metadata(engine, [{"slide": "s2", "diagnosis": "SCLC"}])
        unflag_slide(engine, "s2")
        assert _stored(engine) == _expected(engine)
        assert [r["diagnosis"] for r in query_cohort(engine, by=["diagnosis"])] == [
            "LUAD",
            "SCLC",
        ]
    finally:
        engine.dispose()


@pytest.mark.parametrize("codes", [[], [-1], [3, -1, 3, 7], list(range(-1, 50)) * 3])
def test_factorize_groups_codes(codes: list[int]) -> None:
    import numpy as np

    from slidestream.db._query import _factorize

    a = np.array(codes, dtype=np.int64)
    b = (a * 7) % 5 - 1
    for arrays in ([a], [a, b]):
        group, keys = _factorize(arrays, a.size)
        assert group.shape == (a.size,)
        rebuilt = [tuple(int(k) for k in keys[g]) for g in group]
        assert rebuilt == list(zip(*(arr.tolist() for arr in arrays), strict=True))
        assert len({tuple(k) for k in keys.tolist()}) == len(keys)
