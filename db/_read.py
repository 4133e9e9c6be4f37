"""Read-only access for viewers: a read-only engine, latest run outcomes, per-slide values.

:func:`connect_read_only` opens a database so that no statement can change it (SQLite in
``mode=ro``; PostgreSQL sessions with ``default_transaction_read_only``). :func:`latest_runs`
gives the latest analysis attempt of every slide name, whatever its status (the slide list of a
viewer shows failures and skips with their reason). :func:`query_slide_values` gives the
per-slide metric values behind :func:`~slidestream.db.query_cohort`'s summaries (one row per
slide: the points of a strip plot or a scatter plot).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, func, select
from sqlalchemy.engine import URL

from slidestream.db._engine import make_engine, mask_url
from slidestream.db._migrate import check_schema
from slidestream.db._query import _cohort_parts, check_metrics
from slidestream.db._schema import AnalysisRun, ClassStatistics
from slidestream.errors import DatabaseError

__all__ = [
    "RunOutcome",
    "SlideValues",
    "connect_read_only",
    "latest_runs",
    "query_slide_values",
    "tissue_classes",
]

logger = logging.getLogger(__name__)

_RUNS: Table = AnalysisRun.__table__  # type: ignore[assignment]
_CSTATS: Table = ClassStatistics.__table__  # type: ignore[assignment]


def connect_read_only(url: str | URL) -> Engine:
    """An engine on an existing slidestream database that refuses every write.

    Parameters
    ----------
    url : str or sqlalchemy.engine.URL
        ``sqlite:///path/to/slidestream.db`` (the file must exist) or
        ``postgresql+psycopg://user@host/dbname``.

    Returns
    -------
    sqlalchemy.Engine
        SQLite: the file opened with ``mode=ro`` (a write raises "attempt to write a readonly
        database"); PostgreSQL: every transaction is ``READ ONLY``. The schema revision is
        checked. Dispose of it when done.

    Raises
    ------
    DatabaseError
        The URL is invalid, the SQLite file does not exist, or the server cannot be reached.
    SchemaVersionError
        The database is not at the revision this slidestream needs.
    """
    probe = make_engine(url)
    parsed = probe.url
    probe.dispose()
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise DatabaseError(
                f"{mask_url(parsed)}: a viewer needs a database file; pass "
                "--db sqlite:///path/to/slidestream.db"
            )
        path = Path(database).expanduser().resolve()
        if not path.is_file():
            raise DatabaseError(
                f"{mask_url(parsed)}: no such database file; pass the --db of an existing "
                "database (slidestream run writes OUT/slidestream.db)"
            )
        engine = make_engine(f"sqlite:///file:{path.as_posix()}?mode=ro&uri=true")
    else:
        engine = make_engine(
            parsed, connect_args={"options": "-c default_transaction_read_only=on"}
        )
    try:
        check_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    logger.info("database %s opened read-only", mask_url(parsed))
    return engine


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOutcome:
    """The latest recorded analysis attempt of one slide name."""

    slide_name: str
    """File name without the slide extension."""
    slide_path: str
    """The slide file as the run saw it."""
    status: str
    """One of :data:`~slidestream.db.RUN_STATUSES`."""
    error: str | None
    """The failure message or the reason of a skip; ``None`` for a success."""
    finished_at: datetime | None
    """When the attempt ended."""


def latest_runs(engine: Engine) -> list[RunOutcome]:
    """The latest analysis attempt (highest run id) of every slide name, sorted by name.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (at the head revision).

    Returns
    -------
    list of RunOutcome
        One per distinct ``slide_name`` of ``analysis_runs``, including failures of slides
        that could not be opened (no slide row).
    """
    latest = (
        select(func.max(_RUNS.c.id).label("id")).group_by(_RUNS.c.slide_name).subquery("latest")
    )
    stmt = (
        select(
            _RUNS.c.slide_name,
            _RUNS.c.slide_path,
            _RUNS.c.status,
            _RUNS.c.error,
            _RUNS.c.finished_at,
        )
        .join(latest, latest.c.id == _RUNS.c.id)
        .order_by(_RUNS.c.slide_name)
    )
    check_schema(engine)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [
        RunOutcome(
            slide_name=str(name),
            slide_path=str(path),
            status=str(status),
            error=None if error is None else str(error),
            finished_at=finished,
        )
        for name, path, status, error, finished in rows
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideValues:
    """The metric values of one slide in a cohort query (a point of a strip or scatter plot)."""

    name: str
    """Slide name."""
    group: tuple[str | None, ...]
    """The values of the ``by`` keys (``None`` where the slide lacks a key)."""
    values: tuple[float | None, ...]
    """The metrics, in the order asked (``None`` where unknown)."""


def query_slide_values(
    engine: Engine,
    *,
    metrics: Sequence[str],
    by: Sequence[str] = (),
    tissue_class: str | None = None,
    where: Mapping[str, str | Sequence[str]] | None = None,
    include_flagged: bool = False,
) -> list[SlideValues]:
    """Per-slide values of the slides a :func:`~slidestream.db.query_cohort` call summarises.

    Parameters are those of :func:`~slidestream.db.query_cohort` (same slides, same latest
    succeeded run, same filters and flag handling).

    Returns
    -------
    list of SlideValues
        One per slide, sorted by group then slide name.

    Raises
    ------
    ConfigError
        Unknown metric, or a non-number ``where`` value for a number column.
    SchemaVersionError
        The database is not at the revision this slidestream needs.
    """
    by = tuple(by)
    metrics = check_metrics(metrics, tissue_class)
    stats, source, group_cols, conditions = _cohort_parts(
        by=("name", *by),
        tissue_class=tissue_class,
        where=where or {},
        include_flagged=include_flagged,
    )
    metric_cols = [stats.c[m].label(f"m{i}") for i, m in enumerate(metrics)]
    stmt = select(*group_cols, *metric_cols).select_from(source).where(*conditions)
    check_schema(engine)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    out: list[SlideValues] = []
    n_by = len(by)
    for row in rows:
        cells: tuple[Any, ...] = tuple(row)
        out.append(
            SlideValues(
                name=str(cells[0]),
                group=tuple(None if v is None else str(v) for v in cells[1 : 1 + n_by]),
                values=tuple(None if v is None else float(v) for v in cells[1 + n_by :]),
            )
        )
    out.sort(key=lambda s: (tuple((g is None, g or "") for g in s.group), s.name))
    return out


def tissue_classes(engine: Engine) -> list[str]:
    """The tissue classes that have statistics in the database, sorted.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (at the head revision).

    Returns
    -------
    list of str
        Distinct ``class_statistics.tissue_class`` values (the ``--class`` choices of a query).
    """
    check_schema(engine)
    stmt = select(_CSTATS.c.tissue_class).distinct().order_by(_CSTATS.c.tissue_class)
    with engine.connect() as conn:
        return [str(v) for v in conn.execute(stmt).scalars()]
