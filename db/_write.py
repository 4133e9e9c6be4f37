"""Recording analysis runs: the writing API the pipeline calls (in its main process only).

Each call is one transaction. Recording is safe with several writing processes:

* slides are upserted by fingerprint (``INSERT ... ON CONFLICT (fingerprint) DO UPDATE``);
* a succeeded run carries a ``success_key`` (sha256 of fingerprint, parameters hash and model
  weight hashes) under a unique constraint, inserted with ``ON CONFLICT DO NOTHING``, so the
  same analysis recorded twice, even at the same moment, gives one run and one set of
  statistics;
* on SQLite the transaction takes the write lock up front (``BEGIN IMMEDIATE``) and waits up to
  the busy timeout; a transaction that still finds the database locked, or a PostgreSQL
  deadlock/serialization failure, is retried a few times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Table, or_, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from slidestream.db._cohort_values import refresh_cohort_values
from slidestream.db._engine import mask_url, scrub_credentials, write_connection
from slidestream.db._migrate import check_schema
from slidestream.db._schema import (
    ALL_TISSUE,
    AnalysisRun,
    ClassStatistics,
    Slide,
    SlideStatistics,
    TypeStatistics,
)
from slidestream.errors import ConfigError, DatabaseError
from slidestream.summary import SUMMARY_SCHEMA, ModelRecord, NucleusStatistics, Summary

__all__ = ["SUMMARY_SCHEMA", "record_failure", "record_if_missing", "record_run", "record_skip"]

logger = logging.getLogger(__name__)


_MAX_ATTEMPTS = 5
_T = TypeVar("_T")


def dialect_insert(conn: Connection, table: Table) -> sqlite.Insert | postgresql.Insert:
    """An ``INSERT`` construct of the connection's dialect (it has ``on_conflict_*``)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def run_in_transaction(engine: Engine, work: Callable[[Connection], _T]) -> _T:
    """Run ``work`` in one write transaction, retrying on lock timeouts and deadlocks.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database.
    work : callable
        Receives the connection; everything it does commits together.

    Returns
    -------
    object
        What ``work`` returns.

    Raises
    ------
    DatabaseError
        The transaction failed ``_MAX_ATTEMPTS`` times, or with a non-transient error.
    """
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            with write_connection(engine) as conn:
                return work(conn)
        except sa_exc.DBAPIError as err:
            transient = err.connection_invalidated or _is_transient(err)
            if transient and attempt < _MAX_ATTEMPTS:
                logger.warning(
                    "database %s busy (attempt %d/%d), retrying",
                    mask_url(engine.url),
                    attempt,
                    _MAX_ATTEMPTS,
                )
                time.sleep(0.05 * 2**attempt)
                continue
            raise DatabaseError(
                f"{mask_url(engine.url)}: write failed: "
                f"{scrub_credentials(str(err.orig), engine.url)}; "
                "check the database server and retry"
            ) from err
    raise AssertionError("unreachable")  # pragma: no cover


def _is_transient(err: sa_exc.DBAPIError) -> bool:
    text = str(err.orig).lower()
    sqlstate = getattr(err.orig, "sqlstate", None)
    # 40001 serialization failure, 40P01 deadlock; SQLite: "database is locked"/"busy".
    return sqlstate in ("40001", "40P01") or "locked" in text or "busy" in text


def _now() -> datetime:
    return datetime.now(UTC)


def _parse_time(value: object) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError as err:
        raise ConfigError(
            f"summary.json: timestamp {value!r} is not ISO 8601; expected e.g. "
            "'2026-01-31T12:00:00+00:00'"
        ) from err
    # Stored in UTC (SQLite keeps no offset; a naive time is taken as UTC).
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"summary.json: {what} is {type(value).__name__}, expected an object")
    return value


def models_key(models: Mapping[str, Any]) -> str:
    """Canonical text of the models' names and weight hashes (part of a run's identity)."""
    parts = {
        role: {"name": _mapping(spec, f"models.{role}").get("name"), "sha256": spec.get("sha256")}
        for role, spec in sorted(models.items())
    }
    return json.dumps(parts, sort_keys=True, separators=(",", ":"))


def success_key(fingerprint: str, parameters_hash: str, models: Mapping[str, Any]) -> str:
    """The identity of a succeeded analysis: sha256 of slide, parameters and model weights.

    Parameters
    ----------
    fingerprint : str
        The slide's content fingerprint.
    parameters_hash : str
        sha256 of the effective parameters.
    models : mapping
        ``{"nuclei": {"name": ..., "sha256": ...}, ...}``.

    Returns
    -------
    str
        64 hex digits.
    """
    text = "\n".join((fingerprint, parameters_hash, models_key(models)))
    return hashlib.sha256(text.encode()).hexdigest()


def _upsert_slide(conn: Connection, values: dict[str, Any], *, full: bool) -> int:
    """Insert a slide or refresh it (by fingerprint); returns its id."""
    now = _now()
    table: Table = Slide.__table__  # type: ignore[assignment]
    insert = dialect_insert(conn, table).values(**values, first_seen=now, last_seen=now)
    update_cols = ["path", "name", "last_seen"]
    if full:
        update_cols += ["vendor", "width", "height", "mpp_x", "mpp_y", "objective_power"]
    stmt = insert.on_conflict_do_update(
        index_elements=["fingerprint"],
        set_={col: insert.excluded[col] for col in update_cols},
    ).returning(table.c.id)
    return int(conn.execute(stmt).scalar_one())


def _statistic_columns(stats: NucleusStatistics) -> dict[str, float | int | None]:
    """The statistic columns shared by slide and class statistics."""
    area = stats.nucleus_area_um2
    return {
        "nucleus_count": stats.nucleus_count,
        "nuclei_per_mm2": stats.nuclei_per_mm2,
        "nucleus_area_mean_um2": area.mean,
        "nucleus_area_median_um2": area.median,
        "nucleus_area_q1_um2": area.q1,
        "nucleus_area_q3_um2": area.q3,
        "mean_hematoxylin_od": stats.mean_hematoxylin_od,
        "inflammatory_epithelial_ratio": stats.inflammatory_epithelial_ratio,
    }


def _type_rows(region: str, stats: NucleusStatistics) -> list[dict[str, Any]]:
    """The ``type_statistics`` rows of one region (``ALL_TISSUE`` or a tissue class)."""
    rows = []
    for name, t in stats.types.items():
        rows.append(
            {
                "tissue_class": region,
                "nucleus_type": name,
                "nucleus_count": t.nucleus_count,
                "fraction": t.fraction,
                "nuclei_per_mm2": t.nuclei_per_mm2,
                "nucleus_area_mean_um2": t.nucleus_area_um2.mean,
                "nucleus_area_median_um2": t.nucleus_area_um2.median,
                "eccentricity_mean": t.eccentricity.mean,
                "eccentricity_median": t.eccentricity.median,
                "mean_hematoxylin_od": t.mean_hematoxylin_od,
            }
        )
    return rows


def _model_json(record: ModelRecord) -> dict[str, Any]:
    return {"name": record.name, "sha256": record.sha256, "mpp": record.mpp}


def _advance_latest(conn: Connection, slide_id: int, run_id: int) -> bool:
    """Make ``run_id`` the slide's latest succeeded run unless a later one is recorded.

    Moves ``slides.latest_run_id`` forward only (the highest run id wins, also between
    concurrent writers: the slide row is locked by the upsert until commit) and clears the
    ``latest`` flag of the statistics rows of the run it supersedes. Returns whether ``run_id``
    is now the latest run (the flag its statistics rows get).
    """
    slides: Table = Slide.__table__  # type: ignore[assignment]
    moved = conn.execute(
        update(slides)
        .where(
            slides.c.id == slide_id,
            or_(slides.c.latest_run_id.is_(None), slides.c.latest_run_id < run_id),
        )
        .values(latest_run_id=run_id)
        .returning(slides.c.id)
    ).scalar_one_or_none()
    if moved is None:
        return False
    for model in (SlideStatistics, ClassStatistics, TypeStatistics):
        table: Table = model.__table__  # type: ignore[assignment]
        conn.execute(
            update(table)
            .where(table.c.slide_id == slide_id, table.c.latest, table.c.run_id != run_id)
            .values(latest=False)
        )
    return True


def record_run(engine: Engine, summary: Summary | Mapping[str, Any]) -> int:
    """Record a succeeded analysis (slide, run, statistics, per-class statistics) at once.

    Recording the same slide (fingerprint) with the same ``parameters_hash`` and model weight
    hashes again writes nothing and returns the run recorded first, also when several processes
    record it at the same time.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (at the head revision).
    summary : Summary or mapping
        The slide's summary (:class:`slidestream.summary.Summary`, or the content of a
        ``summary.json``, parsed with :meth:`Summary.from_json`). Statistics may be ``None``
        (e.g. no nuclei found).

    Returns
    -------
    int
        The id of the run.

    Raises
    ------
    ConfigError
        ``summary`` does not have the expected shape.
    SchemaVersionError
        The database is not at the revision this slidestream needs.
    DatabaseError
        The database cannot be written.
    """
    if not isinstance(summary, Summary):
        summary = Summary.from_json(summary)
    slide, stats, prov = summary.slide, summary.statistics, summary.provenance
    fingerprint, parameters_hash, name, path = (
        slide.fingerprint,
        prov.parameters_hash,
        slide.name,
        slide.path,
    )
    models = {role: _model_json(m) for role, m in prov.models.items()}
    slide_values = {
        "fingerprint": fingerprint,
        "path": path,
        "name": name,
        "vendor": slide.vendor,
        "width": slide.width,
        "height": slide.height,
        "mpp_x": slide.mpp_x,
        "mpp_y": slide.mpp_y,
        "objective_power": slide.objective_power,
    }
    key = success_key(fingerprint, parameters_hash, models)
    run_values = {
        "slide_path": path,
        "slide_name": name,
        "status": "succeeded",
        "parameters": dict(prov.parameters),
        "parameters_hash": parameters_hash,
        "models": models,
        "success_key": key,
        "software_version": prov.software_version,
        "started_at": _parse_time(prov.started_at),
        "finished_at": _parse_time(prov.finished_at),
        "timings": dict(prov.timings_s),
        "outputs": dict(summary.outputs),
    }
    slide_stats = {"tissue_area_mm2": stats.tissue_area_mm2, **_statistic_columns(stats)}
    class_rows = [
        {
            "tissue_class": class_name,
            "area_mm2": cstats.area_mm2,
            "fraction": cstats.fraction,
            **_statistic_columns(cstats),
        }
        for class_name, cstats in stats.classes.items()
    ]
    type_rows = _type_rows(ALL_TISSUE, stats)
    for class_name, cstats in stats.classes.items():
        type_rows += _type_rows(class_name, cstats)
    check_schema(engine)

    def work(conn: Connection) -> int:
        slide_id = _upsert_slide(conn, slide_values, full=True)
        run_table: Table = AnalysisRun.__table__  # type: ignore[assignment]
        stmt = (
            dialect_insert(conn, run_table)
            .values(**run_values, slide_id=slide_id, recorded_at=_now())
            .on_conflict_do_nothing(index_elements=["success_key"])
            .returning(run_table.c.id)
        )
        run_id = conn.execute(stmt).scalar_one_or_none()
        if run_id is None:
            existing = conn.execute(
                select(run_table.c.id).where(run_table.c.success_key == key)
            ).scalar_one()
            logger.info("slide %s already recorded as run %d", name, existing)
            return int(existing)
        latest = _advance_latest(conn, slide_id, int(run_id))
        conn.execute(
            SlideStatistics.__table__.insert(),  # type: ignore[attr-defined]
            [{"run_id": run_id, "slide_id": slide_id, "latest": latest, **slide_stats}],
        )
        if class_rows:
            conn.execute(
                ClassStatistics.__table__.insert(),  # type: ignore[attr-defined]
                [
                    {"run_id": run_id, "slide_id": slide_id, "latest": latest, **row}
                    for row in class_rows
                ],
            )
        if type_rows:
            conn.execute(
                TypeStatistics.__table__.insert(),  # type: ignore[attr-defined]
                [
                    {"run_id": run_id, "slide_id": slide_id, "latest": latest, **row}
                    for row in type_rows
                ],
            )
        if latest:
            refresh_cohort_values(conn, [slide_id])
        logger.info("recorded slide %s as run %d", name, run_id)
        return int(run_id)

    return run_in_transaction(engine, work)


def summary_success_key(summary: Summary) -> str:
    """The :func:`success_key` of a summary (what :func:`record_run` stores it under)."""
    prov = summary.provenance
    models = {role: _model_json(m) for role, m in prov.models.items()}
    return success_key(summary.slide.fingerprint, prov.parameters_hash, models)


def record_if_missing(engine: Engine, summary: Summary | Mapping[str, Any]) -> int | None:
    """Record a succeeded analysis unless it is recorded already (reconciling files and rows).

    A read-only look-up by success key first, so reconciling a folder whose results are all
    recorded takes no write lock; a missing one is recorded with :func:`record_run` (which is
    idempotent itself, so two processes reconciling at once still give one run).

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (at the head revision).
    summary : Summary or mapping
        A published ``summary.json`` (parsed, or its content).

    Returns
    -------
    int or None
        The id of the run recorded now, or ``None`` when it was recorded before.

    Raises
    ------
    ConfigError
        ``summary`` does not have the expected shape.
    DatabaseError
        The database cannot be read or written.
    """
    if not isinstance(summary, Summary):
        summary = Summary.from_json(summary)
    check_schema(engine)
    run_table: Table = AnalysisRun.__table__  # type: ignore[assignment]
    key = summary_success_key(summary)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                select(run_table.c.id).where(run_table.c.success_key == key)
            ).scalar_one_or_none()
    except sa_exc.DBAPIError as err:
        raise DatabaseError(
            f"{mask_url(engine.url)}: read failed: {scrub_credentials(str(err.orig), engine.url)}"
            "; check the database server and retry"
        ) from err
    if found is not None:
        return None
    return record_run(engine, summary)


def _record_unsuccessful(
    engine: Engine,
    *,
    status: str,
    slide_path: str,
    slide_name: str,
    fingerprint: str | None,
    error: str | None,
    parameters: Mapping[str, Any],
    parameters_hash: str,
    software_version: str,
    models: Mapping[str, Any] | None,
    started_at: datetime | None,
) -> int:
    check_schema(engine)
    now = _now()

    def work(conn: Connection) -> int:
        slide_id = None
        if fingerprint is not None:
            slide_id = _upsert_slide(
                conn,
                {"fingerprint": fingerprint, "path": slide_path, "name": slide_name},
                full=False,
            )
        run_table: Table = AnalysisRun.__table__  # type: ignore[assignment]
        stmt = (
            run_table.insert()
            .values(
                slide_id=slide_id,
                slide_path=slide_path,
                slide_name=slide_name,
                status=status,
                error=error,
                parameters=dict(parameters),
                parameters_hash=parameters_hash,
                models=dict(models or {}),
                success_key=None,
                software_version=software_version,
                started_at=started_at,
                finished_at=now,
                recorded_at=now,
            )
            .returning(run_table.c.id)
        )
        run_id = int(conn.execute(stmt).scalar_one())
        logger.info("recorded slide %s as %s run %d", slide_name, status, run_id)
        return run_id

    return run_in_transaction(engine, work)


def record_failure(
    engine: Engine,
    *,
    slide_path: str,
    slide_name: str,
    fingerprint: str | None,
    error: str,
    parameters: Mapping[str, Any],
    parameters_hash: str,
    software_version: str,
    models: Mapping[str, Any] | None = None,
    started_at: datetime | None = None,
) -> int:
    """Record a failed analysis of a slide (every failure is kept; no deduplication).

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (at the head revision).
    slide_path, slide_name : str
        The slide file and its name (file name without the slide extension).
    fingerprint : str or None
        The slide's fingerprint, ``None`` when the slide could not be opened; the run is then
        not linked to a slide row.
    error : str
        The one-line error message.
    parameters : mapping
        The effective parameters (JSON-serialisable).
    parameters_hash : str
        sha256 of the parameters.
    software_version : str
        slidestream version.
    models : mapping, optional
        Model names and weight hashes, when already loaded.
    started_at : datetime, optional
        When the analysis started; ``finished_at`` is now.

    Returns
    -------
    int
        The id of the failed run.
    """
    return _record_unsuccessful(
        engine,
        status="failed",
        slide_path=slide_path,
        slide_name=slide_name,
        fingerprint=fingerprint,
        error=error,
        parameters=parameters,
        parameters_hash=parameters_hash,
        software_version=software_version,
        models=models,
        started_at=started_at,
    )


def record_skip(
    engine: Engine,
    *,
    slide_path: str,
    slide_name: str,
    fingerprint: str | None,
    reason: str,
    parameters: Mapping[str, Any],
    parameters_hash: str,
    software_version: str,
) -> int:
    """Record a slide the pipeline skipped on purpose (e.g. no tissue), with the reason.

    Parameters are as :func:`record_failure`; ``reason`` is stored as the run's ``error``.

    Returns
    -------
    int
        The id of the skipped run.
    """
    return _record_unsuccessful(
        engine,
        status="skipped",
        slide_path=slide_path,
        slide_name=slide_name,
        fingerprint=fingerprint,
        error=reason,
        parameters=parameters,
        parameters_hash=parameters_hash,
        software_version=software_version,
        models=None,
        started_at=None,
    )
