"""The slide list: sorted pages, keyset and offset pagination, streaming (both backends)."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from sqlalchemy import Engine

from slidestream.db import (
    SLIDE_SORT_KEYS,
    count_slides,
    flag_slide,
    import_metadata,
    iter_slide_csv,
    iter_slide_table,
    iter_slides,
    list_slides,
    record_failure,
    record_run,
    slide_page,
    slide_table_columns,
)
from slidestream.errors import ConfigError

from .conftest import build_summary

# name -> nuclei per mm² (None: no value); "nostats" only ever failed (no statistics at all).
DENSITIES: dict[str, float | None] = {
    "b": 300.0,
    "a": 100.0,
    "e": None,
    "c": 300.0,  # tie with b
    "d": 50.0,
    "g": 900.0,
    "f": None,
    "h": 300.0,
}


@pytest.fixture
def slides(engine: Engine) -> Engine:
    for name, density in DENSITIES.items():
        record_run(engine, build_summary(name, nuclei_per_mm2=density))
    # "a" re-analysed: its latest run counts (700), also for sorting.
    record_run(engine, build_summary("a", nuclei_per_mm2=700.0, parameters_hash="e" * 64))
    record_failure(
        engine,
        slide_path="/data/nostats.svs",
        slide_name="nostats",
        fingerprint="fp-nostats",
        error="boom",
        parameters={},
        parameters_hash="h",
        software_version="0.1.0",
    )
    import_metadata(engine, [{"slide": n, "site": "A" if n in "abcd" else "B"} for n in DENSITIES])
    flag_slide(engine, "g", reason="folded")
    return engine


def _all_pages(engine: Engine, limit: int, **kwargs: Any) -> list[str]:
    names: list[str] = []
    after = None
    for _ in range(50):
        page = slide_page(engine, limit=limit, after=after, **kwargs)
        assert len(page.slides) <= limit
        names += [s.name for s in page.slides]
        after = page.next_after
        if after is None:
            return names
    raise AssertionError("pagination does not end")


def _expected_by_density(descending: bool) -> list[str]:
    latest = {**DENSITIES, "a": 700.0}
    valued = sorted(
        ((v, i, n) for i, (n, v) in enumerate(latest.items(), start=1) if v is not None),
        reverse=descending,
    )
    nulls = [n for n, v in latest.items() if v is None] + ["nostats"]
    if descending:
        nulls.reverse()
    return [n for _, _, n in valued] + nulls


def test_default_order_is_by_name(slides: Engine) -> None:
    everything = sorted([*DENSITIES, "nostats"])
    assert [s.name for s in iter_slides(slides)] == everything
    assert [s["name"] for s in list_slides(slides)] == everything
    assert _all_pages(slides, 3) == everything
    assert _all_pages(slides, 100) == everything
    assert _all_pages(slides, 2, descending=True) == everything[::-1]
    assert count_slides(slides) == 9


def test_metric_order_keyset_pages(slides: Engine) -> None:
    for descending in (False, True):
        want = _expected_by_density(descending)
        assert want[-3:] in (["e", "f", "nostats"], ["nostats", "f", "e"])  # no value: last
        for limit in (1, 2, 4, 20):
            got = _all_pages(slides, limit, sort="nuclei_per_mm2", descending=descending)
            assert got == want, (descending, limit)
        streamed = iter_slides(slides, sort="nuclei_per_mm2", descending=descending, batch_size=2)
        assert [s.name for s in streamed] == want


def test_offset_pages(slides: Engine) -> None:
    want = _expected_by_density(False)
    for offset in range(len(want) + 2):
        page = slide_page(slides, limit=2, offset=offset, sort="nuclei_per_mm2")
        assert [s.name for s in page.slides] == want[offset : offset + 2], offset
        assert (page.next_after is None) == (offset + 2 >= len(want))
    by_name = sorted([*DENSITIES, "nostats"])
    page = slide_page(slides, limit=3, offset=4)
    assert [s.name for s in page.slides] == by_name[4:7]
    # an offset after a cursor skips from there
    first = slide_page(slides, limit=2, sort="nuclei_per_mm2")
    later = slide_page(slides, limit=2, sort="nuclei_per_mm2", after=first.next_after, offset=1)
    assert [s.name for s in later.slides] == want[3:5]


def test_every_sort_key_pages_like_the_stream(slides: Engine) -> None:
    for sort in SLIDE_SORT_KEYS:
        for descending in (False, True):
            streamed = [s.name for s in iter_slides(slides, sort=sort, descending=descending)]
            assert sorted(streamed) == sorted([*DENSITIES, "nostats"])
            assert _all_pages(slides, 3, sort=sort, descending=descending) == streamed


def test_rows_filters_and_flags(slides: Engine) -> None:
    page = slide_page(slides, limit=100, where={"site": "A"}, include_flagged=False)
    assert [s.name for s in page.slides] == ["a", "b", "c", "d"]
    a = page.slides[0]
    assert a.statistics["nuclei_per_mm2"] == 700.0 and a.metadata == {"site": "A"}
    assert a.run_id is not None and a.finished_at is not None and a.flags == ()
    assert a.as_dict()["nuclei_per_mm2"] == 700.0 and a.as_dict()["metadata"] == {"site": "A"}
    kept = [s.name for s in iter_slides(slides, include_flagged=False, where={"site": "B"})]
    assert kept == ["e", "f", "h"]
    g = slide_page(slides, limit=1, where={"name": "g"}).slides[0]
    assert g.flags == ("qc",)
    nostats = slide_page(slides, limit=1, where={"name": "nostats"}).slides[0]
    assert nostats.run_id is None and set(nostats.statistics.values()) == {None}
    assert count_slides(slides, where={"site": "B"}, include_flagged=False) == 3


def test_bad_arguments(slides: Engine) -> None:
    with pytest.raises(ConfigError, match="unknown"):
        slide_page(slides, sort="nuclei_per_mm2; DROP TABLE slides")
    with pytest.raises(ConfigError, match="limit"):
        slide_page(slides, limit=0)
    token = slide_page(slides, limit=2, sort="tissue_area_mm2").next_after
    assert token is not None
    with pytest.raises(ConfigError, match="made for --sort tissue_area_mm2"):
        slide_page(slides, limit=2, after=token)
    with pytest.raises(ConfigError, match="not a cursor"):
        slide_page(slides, limit=2, after="garbage!")
    with pytest.raises(ConfigError, match="unknown"):
        next(iter_slides(slides, sort="bogus"))


def _table_row(slide: Any, columns: tuple[str, ...]) -> tuple[Any, ...]:
    """What :func:`iter_slide_table` must give for a :class:`SlideRow`."""
    cells: list[Any] = []
    for column in columns:
        if column == "flags":
            cells.append(",".join(slide.flags) or None)
        elif column == "metadata":
            cells.append(";".join(f"{k}={v}" for k, v in slide.metadata.items()) or None)
        elif column in ("name", "fingerprint", "vendor", "run_id", "path"):
            cells.append(getattr(slide, column))
        else:
            cells.append(slide.statistics.get(column))
    return tuple(cells)


def test_slide_table_rows_are_the_slide_rows(slides: Engine) -> None:
    # Types (the shipped names and a user's), several flags, metadata with separators in values.
    record_run(
        slides,
        build_summary(
            "t", nuclei_per_mm2=400.0, types={"": {"epithelial": 120.0, "Immune cells": 30.5}}
        ),
    )
    import_metadata(slides, [{"slide": "t", "site": "A;B=c", "diagnosis": "LUAD"}])
    flag_slide(slides, "t", reason="pen", flag="pen")
    flag_slide(slides, "t", reason="folded")
    types = ("epithelial", "inflammatory", "spindle", "other", "Immune cells")
    columns = slide_table_columns(types)
    for sort in SLIDE_SORT_KEYS:
        for descending in (False, True):
            for where, flagged in (({}, True), ({"site": ["A", "A;B=c"]}, False)):
                want = [
                    _table_row(s, columns)
                    for s in iter_slides(
                        slides,
                        sort=sort,
                        descending=descending,
                        where=where,
                        include_flagged=flagged,
                    )
                ]
                batches = list(
                    iter_slide_table(
                        slides,
                        type_names=types,
                        sort=sort,
                        descending=descending,
                        where=where,
                        include_flagged=flagged,
                        batch_size=2,
                    )
                )
                assert all(len(b) <= 2 for b in batches)
                got = [tuple(row) for batch in batches for row in batch]
                assert got == want, (sort, descending, where)
    t = next(r for b in iter_slide_table(slides, type_names=types) for r in b if r[0] == "t")
    cells = dict(zip(columns, t, strict=True))
    assert cells["Immune cells_per_mm2"] == 30.5 and cells["spindle_per_mm2"] is None
    assert cells["flags"] == "pen,qc"
    assert cells["metadata"] == "diagnosis=LUAD;site=A;B=c"


def test_slide_csv_is_the_slide_table(slides: Engine) -> None:
    # Cells the CSV must quote (a comma, a quote, a line break) and a user's type name.
    record_run(slides, build_summary("q", nuclei_per_mm2=400.0, types={"": {"Immune, T": 2.5}}))
    import_metadata(slides, [{"slide": "q", "site": 'A, "B"\nC'}])
    types = ("epithelial", "Immune, T")
    columns = slide_table_columns(types)
    for sort, descending, where in (
        ("name", False, {}),
        ("nuclei_per_mm2", True, {}),
        ("id", False, {"site": 'A, "B"\nC'}),
    ):
        table = [
            row
            for batch in iter_slide_table(
                slides, type_names=types, sort=sort, descending=descending, where=where
            )
            for row in batch
        ]
        chunks = list(
            iter_slide_csv(
                slides,
                type_names=types,
                sort=sort,
                descending=descending,
                where=where,
                chunk_bytes=64,
            )
        )
        assert all(chunks)
        if slides.dialect.name == "postgresql" and not where:
            assert len(chunks) > 2, "streamed in pieces"
        lines = list(csv.reader(io.StringIO(b"".join(chunks).decode())))
        assert tuple(lines[0]) == columns
        want = [["" if cell is None else cell for cell in row] for row in table]
        got = [
            [
                float(cell) if isinstance(w, float) else int(cell) if isinstance(w, int) else cell
                for cell, w in zip(line, row, strict=True)
            ]
            for line, row in zip(lines[1:], want, strict=True)
        ]
        assert len(lines) - 1 == len(want) and got == want, (sort, where)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        next(iter_slide_csv(slides, chunk_bytes=0))
