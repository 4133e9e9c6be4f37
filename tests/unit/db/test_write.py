"""Recording runs: one transaction, idempotent, null numbers, failures, concurrent writers."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from slidestream.db import (
    AnalysisRun,
    ClassStatistics,
    Slide,
    SlideStatistics,
    open_database,
    record_failure,
    record_run,
    record_skip,
)
from slidestream.errors import ConfigError


def _count(engine: Engine, model: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def test_record_run_writes_everything(engine: Engine, make_summary) -> None:
    summary = make_summary("s1", classes={"tumour": 2000.0, "stroma": 300.0, "fat": None})
    run_id = record_run(engine, summary)
    with engine.connect() as conn:
        run = conn.execute(select(AnalysisRun).where(AnalysisRun.id == run_id)).one()._mapping
        assert run["status"] == "succeeded"
        assert run["parameters"] == {"tile_size_px": 512, "overlap_px": 64}
        assert run["models"]["nuclei"]["sha256"] == "a" * 64
        assert run["timings"]["total"] == 12.5
        assert run["outputs"]["overlay_png"] == "overlay.png"
        stats = conn.execute(select(SlideStatistics)).one()._mapping
        assert stats["nuclei_per_mm2"] == 1000.0 and stats["nucleus_count"] == 20000
        assert stats["nucleus_area_q3_um2"] == 50.0
        classes = {
            r.tissue_class: r.nuclei_per_mm2
            for r in conn.execute(
                select(ClassStatistics.tissue_class, ClassStatistics.nuclei_per_mm2)
            )
        }
        slide = conn.execute(select(Slide)).one()._mapping
    assert classes == {"tumour": 2000.0, "stroma": 300.0, "fat": None}
    assert slide["width"] == 40000 and slide["mpp_x"] == 0.25 and slide["vendor"] == "aperio"


def test_rerun_is_idempotent(engine: Engine, make_summary) -> None:
    first = record_run(engine, make_summary("s1"))
    again = record_run(engine, make_summary("s1"))
    assert again == first
    assert (_count(engine, AnalysisRun), _count(engine, SlideStatistics)) == (1, 1)
    assert _count(engine, ClassStatistics) == 2
    other = record_run(engine, make_summary("s1", parameters_hash="d" * 64))
    assert other != first
    assert (_count(engine, Slide), _count(engine, AnalysisRun)) == (1, 2)


def test_null_statistics(engine: Engine, make_summary) -> None:
    summary = make_summary("empty", nuclei_per_mm2=None, classes={})
    summary["statistics"]["nucleus_area_um2"] = None
    summary["statistics"]["mean_hematoxylin_od"] = None
    record_run(engine, summary)
    with engine.connect() as conn:
        stats = conn.execute(select(SlideStatistics)).one()._mapping
    assert stats["nucleus_count"] is None and stats["nucleus_area_mean_um2"] is None


def test_bad_summary_schema(engine: Engine, make_summary) -> None:
    summary = make_summary("s1")
    summary["schema"] = "something/9"
    with pytest.raises(ConfigError, match=r"slidestream\.summary/1"):
        record_run(engine, summary)


def test_failures_and_skips(engine: Engine, make_summary) -> None:
    common: dict[str, Any] = {
        "parameters": {"a": 1},
        "parameters_hash": "h",
        "software_version": "0.1.0",
    }
    no_slide = record_failure(
        engine,
        slide_path="/x/broken.svs",
        slide_name="broken",
        fingerprint=None,
        error="boom",
        **common,
    )
    with_slide = record_failure(
        engine, slide_path="/x/s1.svs", slide_name="s1", fingerprint="fp-s1", error="OOM", **common
    )
    skipped = record_skip(
        engine,
        slide_path="/x/s1.svs",
        slide_name="s1",
        fingerprint="fp-s1",
        reason="no tissue",
        **common,
    )
    ok = record_run(engine, make_summary("s1"))
    with engine.connect() as conn:
        rows = {
            r.id: (r.status, r.slide_id, r.error)
            for r in conn.execute(
                select(AnalysisRun.id, AnalysisRun.status, AnalysisRun.slide_id, AnalysisRun.error)
            )
        }
        slide = conn.execute(select(Slide)).one()._mapping
    assert rows[no_slide] == ("failed", None, "boom")
    assert rows[with_slide][0] == "failed" and rows[with_slide][1] == slide["id"]
    assert rows[skipped][:2] == ("skipped", slide["id"])
    assert rows[ok][0] == "succeeded"
    assert slide["vendor"] == "aperio"  # the full summary filled in what the failure lacked


def _writer(url: str, worker: int, n_shared: int, n_own: int, queue: Any) -> None:
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from conftest import build_summary

    engine = open_database(url)
    ids = []
    try:
        names = [f"shared{i}" for i in range(n_shared)] + [f"w{worker}-{i}" for i in range(n_own)]
        if worker % 2:
            names.reverse()
        for name in names:
            ids.append((name, record_run(engine, build_summary(name))))
    finally:
        engine.dispose()
    queue.put(ids)


def test_concurrent_writers_lose_nothing(engine: Engine, db_url: str) -> None:
    n_workers, n_shared, n_own = 4, 12, 6
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(db_url, w, n_shared, n_own, queue))
        for w in range(n_workers)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    by_name: dict[str, set[int]] = {}
    for result in results:
        for name, run_id in result:
            by_name.setdefault(name, set()).add(run_id)
    expected = n_shared + n_workers * n_own
    assert len(by_name) == expected
    assert all(len(ids) == 1 for ids in by_name.values())  # everyone got the same run id
    assert _count(engine, Slide) == expected
    assert _count(engine, AnalysisRun) == expected
    assert _count(engine, SlideStatistics) == expected
    assert _count(engine, ClassStatistics) == 2 * expected
    assert_latest_consistent(engine)


def _rerunner(url: str, worker: int, n_slides: int, queue: Any) -> None:
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from conftest import build_summary

    engine = open_database(url)
    try:
        for i in range(n_slides):
            # Every worker analyses the same slides with its own parameters: each run
            # supersedes the others' and the highest run id must win.
            record_run(engine, build_summary(f"r{i}", parameters_hash=f"{worker:064x}"))
    finally:
        engine.dispose()
    queue.put("ok")


def test_concurrent_reruns_keep_one_latest_run(engine: Engine, db_url: str) -> None:
    n_workers, n_slides = 4, 8
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rerunner, args=(db_url, w, n_slides, queue)) for w in range(n_workers)
    ]
    for p in procs:
        p.start()
    assert [queue.get(timeout=60) for _ in procs] == ["ok"] * n_workers
    for p in procs:
        p.join(timeout=60)
    assert _count(engine, AnalysisRun) == n_workers * n_slides
    pointers, _, _ = _latest_state(engine)
    with engine.connect() as conn:
        highest = dict(
            conn.execute(
                select(AnalysisRun.slide_id, func.max(AnalysisRun.id)).group_by(
                    AnalysisRun.slide_id
                )
            ).all()
        )
    assert pointers == highest
    assert_latest_consistent(engine)


def _latest_state(engine: Engine) -> tuple[dict[int, int | None], dict[int, set[int]], set[int]]:
    """(pointer per slide, slide-statistics runs flagged latest per slide, class-stat runs)."""
    with engine.connect() as conn:
        pointers = {r.id: r.latest_run_id for r in conn.execute(select(Slide))}
        flagged: dict[int, set[int]] = {}
        for row in conn.execute(select(SlideStatistics).where(SlideStatistics.latest)):
            flagged.setdefault(row.slide_id, set()).add(row.run_id)
        class_runs = {
            r.run_id for r in conn.execute(select(ClassStatistics).where(ClassStatistics.latest))
        }
    return pointers, flagged, class_runs


def assert_latest_consistent(engine: Engine) -> None:
    """Exactly the pointer's run is flagged latest, in both statistics tables."""
    pointers, flagged, class_runs = _latest_state(engine)
    assert flagged == {s: {r} for s, r in pointers.items() if r is not None}
    with engine.connect() as conn:
        all_class_runs = {r.run_id for r in conn.execute(select(ClassStatistics.run_id))}
    assert class_runs == set(pointers.values()) & all_class_runs


def test_latest_flags_follow_the_latest_run(engine: Engine, make_summary) -> None:
    first = record_run(engine, make_summary("s1"))
    record_run(engine, make_summary("s2"))
    assert_latest_consistent(engine)
    second = record_run(engine, make_summary("s1", parameters_hash="d" * 64))
    assert second > first
    assert record_run(engine, make_summary("s1")) == first  # the old analysis again: no-op
    pointers, flagged, _ = _latest_state(engine)
    assert pointers[1] == second and flagged[1] == {second}
    assert_latest_consistent(engine)
    record_failure(
        engine,
        slide_path="/data/s1.svs",
        slide_name="s1",
        fingerprint="fp-s1",
        error="boom",
        parameters={},
        parameters_hash="x",
        software_version="0.1.0",
    )
    assert_latest_consistent(engine)  # a failure supersedes nothing
    with engine.connect() as conn:
        flags = dict(
            conn.execute(select(ClassStatistics.run_id, ClassStatistics.latest).distinct()).all()
        )
    assert flags == {first: False, second: True, first + 1: True}
