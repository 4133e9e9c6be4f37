"""Migrations: head equals the models, round trips, schema-version check, URL masking."""

from __future__ import annotations

import logging
import multiprocessing
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
from slidestream.db._migrate import migrations_dir
from slidestream.errors import DatabaseError, SchemaVersionError


def _diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


def test_migrations_ship_with_env_and_versions() -> None:
    folder = migrations_dir()
    assert (folder / "env.py").is_file()
    assert (folder / "script.py.mako").is_file()
    assert sorted(p.name for p in (folder / "versions").glob("0*.py")) == [
        "0001_initial.py",
        "0002_cohort_metadata.py",
        "0003_cohort_scale.py",
    ]
    assert head_revision() == "0003"


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
