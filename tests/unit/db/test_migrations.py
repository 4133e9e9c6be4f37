"""Migrations: head equals the models, round trips, schema-version check, URL masking."""

from __future__ import annotations

import logging
import multiprocessing
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from slidestream.db import (
    Base,
    check_schema,
    connect,
    current_revision,
    downgrade,
    head_revision,
    open_database,
    query_cohort,
    record_run,
    upgrade,
)
from slidestream.db._engine import make_engine
from slidestream.db._migrate import migrations_dir
from slidestream.errors import DatabaseError, SchemaVersionError


def _diff(engine: Engine) -> list[object]:
    def include(obj: Any, name: Any, type_: str, reflected: bool, compare_to: Any) -> bool:
        # Objects made for one backend only (``Index(...).ddl_if(dialect=...)``).
        ddl_if = getattr(obj, "_ddl_if", None)
        return ddl_if is None or ddl_if.dialect in (None, engine.dialect.name)

    with engine.connect() as conn:
        opts = {"compare_type": True, "include_object": include}
        ctx = MigrationContext.configure(conn, opts=opts)
        return list(compare_metadata(ctx, Base.metadata))


def test_migrations_ship_with_env_and_versions() -> None:
    folder = migrations_dir()
    assert (folder / "env.py").is_file()
    assert (folder / "script.py.mako").is_file()
    assert sorted(p.name for p in (folder / "versions").glob("0*.py")) == [
        "0001_initial.py",
        "0002_cohort_metadata.py",
        "0003_cohort_scale.py",
        "0004_nucleus_types.py",
        "0005_cohort_values.py",
    ]
    assert head_revision() == "0005"


def test_upgrade_head_equals_models(fresh_engine: Engine) -> None:
    assert current_revision(fresh_engine) == head_revision()
    assert _diff(fresh_engine) == []


def test_downgrade_base_then_upgrade_round_trips(fresh_engine: Engine) -> None:
    downgrade(fresh_engine, "base")
    assert current_revision(fresh_engine) is None
    assert set(inspect(fresh_engine).get_table_names()) <= {"alembic_version"}
    # a database downgraded to base counts as fresh again
    open_database(fresh_engine.url, create=True).dispose()
    assert current_revision(fresh_engine) == head_revision()
    downgrade(fresh_engine, "base")
    upgrade(fresh_engine, "0001")
    assert current_revision(fresh_engine) == "0001"
    upgrade(fresh_engine)
    assert current_revision(fresh_engine) == head_revision()
    assert _diff(fresh_engine) == []


def test_old_schema_refuses_writes_and_queries(fresh_engine: Engine, make_summary) -> None:
    downgrade(fresh_engine, "0001")
    with pytest.raises(SchemaVersionError) as info:
        record_run(fresh_engine, make_summary("s1"))
    message = str(info.value)
    assert "revision 0001" in message and head_revision() in message
    assert "slidestream db upgrade --db " in message
    with pytest.raises(SchemaVersionError):
        query_cohort(fresh_engine)
    # open_database(create=True) does not touch a database that is not fresh
    with pytest.raises(SchemaVersionError):
        open_database(fresh_engine.url, create=True).dispose()
    upgrade(fresh_engine)
    check_schema(fresh_engine)
    assert record_run(fresh_engine, make_summary("s1")) > 0


def test_unmigrated_sqlite_file_without_create(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="no such database file"):
        open_database(f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'p.db'}", create=True)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_password_masked_in_schema_error_and_logs(
    pg_url: str, make_summary, caplog: pytest.LogCaptureFixture
) -> None:
    url = pg_url.replace("postgresql+psycopg://postgres@", "postgresql+psycopg://postgres:s3cr3t@")
    caplog.set_level(logging.DEBUG)
    engine = open_database(url, create=True)
    try:
        record_run(engine, make_summary("s1"))
        downgrade(engine, "0001")
        with pytest.raises(SchemaVersionError) as info:
            record_run(engine, make_summary("s1"))
        assert "s3cr3t" not in str(info.value)
        assert "postgres:***@" in str(info.value)
    finally:
        engine.dispose()
    assert "postgres:***@" in caplog.text
    assert "s3cr3t" not in caplog.text


def test_password_masked_when_server_unreachable() -> None:
    url = "postgresql+psycopg://ann:hunter2@127.0.0.1:1/cohort?connect_timeout=2"
    engine = connect(url)
    try:
        with pytest.raises(DatabaseError) as info:
            check_schema(engine)
    finally:
        engine.dispose()
    assert "hunter2" not in str(info.value)
    assert "ann:***@" in str(info.value)


def test_unsupported_backend_is_rejected() -> None:
    with pytest.raises(DatabaseError, match="unsupported database backend"):
        connect("mysql://u:pw@host/db")


def _create(url: str, queue: Any) -> None:
    try:
        open_database(url, create=True).dispose()
        queue.put("ok")
    except Exception as err:  # reported to the parent
        queue.put(f"{type(err).__name__}: {err}")


def test_concurrent_creation_of_a_fresh_database(fresh_db_url: str) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(fresh_db_url, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == ["ok"] * 4
    engine = connect(fresh_db_url)
    try:
        assert current_revision(engine) == head_revision()
        assert _diff(engine) == []
    finally:
        engine.dispose()


def test_first_connection_waits_while_a_new_sqlite_file_is_being_written(tmp_path: Path) -> None:
    # Switching a file to WAL takes an exclusive lock, and SQLite's busy handler does not wait
    # for it: two `slidestream run` starting on one new --db failed 1 time in ~8 with
    # "database is locked" when one met the other's first write transaction.
    path = tmp_path / "cohort.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE being_created (a INTEGER)")
    timer = threading.Timer(0.3, other.execute, ("COMMIT",))
    timer.start()
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        timer.join()
        other.close()
        engine.dispose()


def test_connect_create_makes_a_fresh_database(fresh_db_url: str, make_summary) -> None:
    plain = connect(fresh_db_url)
    try:
        assert current_revision(plain) is None
    finally:
        plain.dispose()
    engine = connect(fresh_db_url, create=True)
    try:
        assert current_revision(engine) == head_revision()
        assert record_run(engine, make_summary("s1")) > 0
    finally:
        engine.dispose()


def _fill_at_0002(engine: Engine) -> None:
    """Slides, runs (one superseded, one failed), statistics, metadata and a flag, written
    with the tables of revision 0002 (reflected: the models are at head)."""
    from datetime import UTC, datetime

    from sqlalchemy import MetaData

    meta = MetaData()
    meta.reflect(engine)
    t = meta.tables
    now = datetime(2026, 1, 1, tzinfo=UTC)
    run = {
        "slide_path": "/d/x.svs",
        "slide_name": "x",
        "parameters": {},
        "parameters_hash": "h",
        "models": {},
        "software_version": "0.1.0",
        "recorded_at": now,
    }
    with engine.begin() as conn:
        conn.execute(
            t["slides"].insert(),
            [
                {"id": i, "fingerprint": f"fp{i}", "path": f"/d/s{i}.svs", "name": f"s{i}"}
                | {"first_seen": now, "last_seen": now, "vendor": "aperio"}
                for i in (1, 2, 3)
            ],
        )
        conn.execute(
            t["analysis_runs"].insert(),
            [
                run | {"id": 1, "slide_id": 1, "status": "succeeded", "success_key": "k1"},
                run | {"id": 2, "slide_id": 2, "status": "succeeded", "success_key": "k2"},
                run | {"id": 3, "slide_id": 1, "status": "succeeded", "success_key": "k3"},
                run | {"id": 4, "slide_id": 3, "status": "failed", "success_key": None},
            ],
        )
        conn.execute(
            t["slide_statistics"].insert(),
            [
                {"run_id": r, "slide_id": s, "nuclei_per_mm2": d, "tissue_area_mm2": 10.0}
                for r, s, d in ((1, 1, 100.0), (2, 2, 200.0), (3, 1, 300.0))
            ],
        )
        conn.execute(
            t["class_statistics"].insert(),
            [
                {"run_id": r, "slide_id": s, "tissue_class": c, "nuclei_per_mm2": d}
                for r, s, c, d in (
                    (1, 1, "tumour", 1.0),
                    (1, 1, "stroma", 2.0),
                    (2, 2, "tumour", 3.0),
                    (3, 1, "tumour", 4.0),
                )
            ],
        )
        for slide_id, run_id in ((1, 3), (2, 2)):
            conn.execute(
                t["slides"].update().where(t["slides"].c.id == slide_id),
                {"latest_run_id": run_id},
            )
        conn.execute(
            t["slide_metadata"].insert(),
            [{"slide_id": i, "key": "diagnosis", "value": "LUAD"} for i in (1, 2)],
        )


def test_upgrade_from_0002_keeps_data_and_sets_latest(fresh_db_url: str) -> None:
    from sqlalchemy import select

    from slidestream.db import ClassStatistics, SlideStatistics, list_slides

    engine = connect(fresh_db_url)
    try:
        upgrade(engine, "0002")
        _fill_at_0002(engine)
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert _diff(engine) == []
        with engine.connect() as conn:
            latest = {
                r.run_id: r.latest
                for r in conn.execute(select(SlideStatistics.run_id, SlideStatistics.latest))
            }
            class_latest = set(
                conn.execute(
                    select(ClassStatistics.run_id, ClassStatistics.tissue_class).where(
                        ClassStatistics.latest
                    )
                ).all()
            )
        assert latest == {1: False, 2: True, 3: True}
        assert class_latest == {(2, "tumour"), (3, "tumour")}
        rows = query_cohort(engine, by=["diagnosis"], tissue_class="tumour")
        assert [(r["diagnosis"], r["n"], r["mean"]) for r in rows] == [("LUAD", 2, 3.5)]
        assert [s["nuclei_per_mm2"] for s in list_slides(engine)] == [300.0, 200.0, None]
        # and back: 0002 again, data intact, then head again
        downgrade(engine, "0002")
        assert current_revision(engine) == "0002"
        upgrade(engine)
        assert query_cohort(engine, by=["diagnosis"], tissue_class="tumour")[0]["n"] == 2
        assert _diff(engine) == []
    finally:
        engine.dispose()


def test_upgrade_from_0003_adds_type_statistics_and_keeps_data(
    fresh_db_url: str, make_summary
) -> None:
    """A database of the previous release (0003, with data) upgrades to 0004: old rows and
    queries unchanged, the new columns NULL, typed runs recorded and queried by type."""
    from slidestream.db import list_slides

    engine = connect(fresh_db_url)
    try:
        upgrade(engine, "0002")
        _fill_at_0002(engine)
        if engine.dialect.name == "postgresql":  # the fill gave explicit ids: move the sequences
            with engine.begin() as conn:
                for table in ("slides", "analysis_runs"):
                    conn.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))"
                    )
        upgrade(engine, "0003")
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert _diff(engine) == []
        before = query_cohort(engine, by=["diagnosis"], tissue_class="tumour")
        assert [(r["diagnosis"], r["n"], r["mean"]) for r in before] == [("LUAD", 2, 3.5)]
        assert all(s["inflammatory_epithelial_ratio"] is None for s in list_slides(engine))
        assert query_cohort(engine, nucleus_type="inflammatory") == []
        types = {"tumour": {"inflammatory": 300.0, "epithelial": 600.0}}
        record_run(engine, make_summary("typed", types=types))
        rows = query_cohort(engine, tissue_class="tumour", nucleus_type="inflammatory")
        assert [(r["n"], r["mean"]) for r in rows] == [(1, 300.0)]
        ratio = query_cohort(
            engine, tissue_class="tumour", metrics=["inflammatory_epithelial_ratio"]
        )
        assert ratio[0]["mean"] == pytest.approx(0.5)
        downgrade(engine, "0003")
        assert "type_statistics" not in inspect(engine).get_table_names()
        upgrade(engine)
        assert _diff(engine) == []
        # the typed run's slide and class rows survived the round trip (its type rows did not)
        after = query_cohort(engine, by=["diagnosis"], tissue_class="tumour")
        assert (after[0]["diagnosis"], after[0]["n"], after[0]["mean"]) == ("LUAD", 2, 3.5)
        assert query_cohort(engine, nucleus_type="inflammatory", tissue_class="tumour") == []
    finally:
        engine.dispose()
