"""Fixtures of the database tests: every test runs on SQLite and on the real PostgreSQL.

PostgreSQL tests use a fresh database ``slidestream_test_<random>`` per test session (dropped
afterwards, so parallel pytest-xdist workers never collide). Migration tests get a fresh schema
each (selected through ``search_path`` in the URL); the others share one schema migrated once and
emptied after each test. They skip with a reason when no server answers on
127.0.0.1:5432.
"""

from __future__ import annotations

import copy
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from slidestream.db import Base, open_database

PG_HOST = os.environ.get("SLIDESTREAM_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("SLIDESTREAM_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("SLIDESTREAM_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("SLIDESTREAM_TEST_PG_DB", "test")

SummaryFactory = Callable[..., dict[str, Any]]


def _pg_reachable() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1.0):
            return True
    except OSError:
        return False


def _pg_url(database: str, *, password: str | None = None) -> str:
    auth = PG_USER if password is None else f"{PG_USER}:{password}"
    return f"postgresql+psycopg://{auth}@{PG_HOST}:{PG_PORT}/{database}"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (its name)."""
    if not _pg_reachable():
        pytest.skip(f"PostgreSQL not reachable on {PG_HOST}:{PG_PORT}")
    name = f"slidestream_test_{secrets.token_hex(6)}"
    admin = create_engine(_pg_url(PG_ADMIN_DB), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as err:  # pragma: no cover - depends on the server
        admin.dispose()
        pytest.skip(f"cannot create a PostgreSQL test database: {err}")
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _create_schema(database: str) -> str:
    schema = f"t_{secrets.token_hex(6)}"
    admin = create_engine(_pg_url(database), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    return schema


def _drop_schema(database: str, schema: str) -> None:
    admin = create_engine(_pg_url(database), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    admin.dispose()


def _schema_url(database: str, schema: str) -> str:
    return f"{_pg_url(database)}?options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """URL of a fresh, empty schema in the session's PostgreSQL database."""
    schema = _create_schema(pg_database)
    try:
        yield _schema_url(pg_database, schema)
    finally:
        _drop_schema(pg_database, schema)


@pytest.fixture(scope="session")
def pg_shared_url(pg_database: str) -> Iterator[str]:
    """URL of a schema migrated to head once per session (emptied after each test)."""
    schema = _create_schema(pg_database)
    url = _schema_url(pg_database, schema)
    open_database(url, create=True).dispose()
    try:
        yield url
    finally:
        _drop_schema(pg_database, schema)


def _truncate(url: str) -> None:
    eng = create_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with eng.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    eng.dispose()


_BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=_BACKENDS)
def fresh_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a fresh, empty database (no schema): SQLite file, then PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'slidestream.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def fresh_engine(fresh_db_url: str) -> Iterator[Engine]:
    """An engine on a fresh database just upgraded to head (for migration tests)."""
    eng = open_database(fresh_db_url, create=True)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture(params=_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty database at head: a new SQLite file, or the session's PostgreSQL schema
    (emptied after the test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'slidestream.db'}"
        return
    url = str(request.getfixturevalue("pg_shared_url"))
    try:
        yield url
    finally:
        _truncate(url)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on an empty database at head."""
    eng = open_database(db_url, create=True)
    try:
        yield eng
    finally:
        eng.dispose()


_BASE_SUMMARY: dict[str, Any] = {
    "schema": "slidestream.summary/1",
    "slide": {
        "name": "slide",
        "path": "/data/slide.svs",
        "fingerprint": "fp",
        "vendor": "aperio",
        "width": 40000,
        "height": 30000,
        "mpp_x": 0.25,
        "mpp_y": 0.25,
        "objective_power": 40.0,
    },
    "statistics": {},
    "provenance": {
        "software_version": "0.1.0",
        "models": {
            "nuclei": {"name": "hovernet-lite", "sha256": "a" * 64, "mpp": 0.5},
            "tissue": {"name": "tissue-resnet", "sha256": "b" * 64, "mpp": 1.0},
        },
        "parameters": {"tile_size_px": 512, "overlap_px": 64},
        "parameters_hash": "c" * 64,
        "timings_s": {"total": 12.5, "nuclei": 9.0},
        "started_at": "2026-01-31T12:00:00+00:00",
        "finished_at": "2026-01-31T12:00:12.5+00:00",
    },
    "outputs": {
        "nuclei_geojson": "nuclei.geojson.gz",
        "tissue_geojson": "tissue.geojson",
        "nuclei_parquet": "nuclei.parquet",
        "overlay_png": "overlay.png",
        "summary_json": "summary.json",
    },
}


def _stats(density: float | None, area_mm2: float | None = 10.0) -> dict[str, Any]:
    count = None if density is None or area_mm2 is None else round(density * area_mm2)
    return {
        "nucleus_count": count,
        "nuclei_per_mm2": density,
        "nucleus_area_um2": {"mean": 40.0, "median": 38.0, "q1": 30.0, "q3": 50.0},
        "mean_hematoxylin_od": 0.4,
    }


def build_summary(
    name: str,
    *,
    nuclei_per_mm2: float | None = 1000.0,
    classes: dict[str, float | None] | None = None,
    parameters_hash: str | None = None,
    fingerprint: str | None = None,
    types: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """A summary.json for slide ``name``; ``classes`` maps class name to nuclei per mm²;
    ``types`` maps a region (``""``: the whole tissue, or a class) to type -> nuclei per mm²
    (area 10 mm² per class, 20 mm² of tissue: counts follow; ratio inflammatory/epithelial)."""
    summary = copy.deepcopy(_BASE_SUMMARY)
    summary["slide"].update(
        name=name, path=f"/data/{name}.svs", fingerprint=fingerprint or f"fp-{name}"
    )
    if parameters_hash is not None:
        summary["provenance"]["parameters_hash"] = parameters_hash
    stats = {"tissue_area_mm2": 20.0, **_stats(nuclei_per_mm2, 20.0)}
    classes = {"tumour": nuclei_per_mm2, "stroma": 500.0} if classes is None else classes
    stats["classes"] = {
        cls: {"area_mm2": 10.0, "fraction": 0.5, **_stats(dens)} for cls, dens in classes.items()
    }
    for region, per_type in (types or {}).items():
        block = stats if region == "" else stats["classes"][region]
        area = 20.0 if region == "" else 10.0
        counts = {t: round(d * area) for t, d in per_type.items()}
        total = sum(counts.values())
        block["types"] = {
            t: {
                "nucleus_count": counts[t],
                "fraction": counts[t] / total if total else None,
                "nuclei_per_mm2": d,
                "nucleus_area_um2": {"mean": 40.0, "median": 39.0, "q1": 30.0, "q3": 50.0},
                "eccentricity": {"mean": 0.5, "median": 0.5, "q1": 0.4, "q3": 0.6},
                "mean_hematoxylin_od": 0.5,
            }
            for t, d in per_type.items()
        }
        if counts.get("epithelial"):
            block["inflammatory_epithelial_ratio"] = (
                counts.get("inflammatory", 0) / counts["epithelial"]
            )
    summary["statistics"] = stats
    return summary


@pytest.fixture
def make_summary() -> SummaryFactory:
    """Factory of summary.json mappings (see :func:`build_summary`)."""
    return build_summary
