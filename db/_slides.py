"""The slide list: sorted pages (keyset or offset), streaming exports, counts.

Every function here serves both the ``query --slides`` command and the viewer's API. A slide
row carries the slide columns, its latest succeeded run (``run_id``, ``finished_at``) and that
run's slide-level statistics (:data:`~slidestream.db.SLIDE_METRICS`), its QC flags and its
metadata.

Order: by ``name`` (default), ``id`` or a slide metric, ascending or descending, ties broken by
slide id in the same direction. Slides without a value of the sort metric (no succeeded run, or
``NULL``) come last in both directions, in slide id order. The order is what the indexes give
(``ix_slides_name_id``, ``ix_slide_statistics_by_<metric>``), so a page costs the same at
any depth with a keyset cursor (``after``); ``offset`` also works but reads the skipped rows.

Exports (:func:`iter_slides`) are one streaming query (a server-side cursor on PostgreSQL) read
``batch_size`` rows at a time, with the metadata and flags of each batch fetched by slide id:
memory stays flat whatever the size of the cohort.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    FromClause,
    Select,
    Table,
    func,
    select,
    true,
    tuple_,
)

from slidestream.db._columns import check_columns
from slidestream.db._migrate import check_schema
from slidestream.db._query import (
    BUILTIN_COLUMNS,
    FLAGS,
    META,
    SLIDE_METRICS,
    SLIDES,
    SSTATS,
    TSTATS,
    not_flagged,
    where_conditions,
)
from slidestream.db._schema import ALL_TISSUE, AnalysisRun
from slidestream.errors import ConfigError

__all__ = [
    "SLIDE_COLUMNS",
    "SLIDE_SORT_KEYS",
    "SLIDE_TYPE_COLUMNS",
    "SlidePage",
    "SlideRow",
    "count_slides",
    "iter_slides",
    "list_slides",
    "slide_page",
]

logger = logging.getLogger(__name__)

_RUNS: Table = AnalysisRun.__table__  # type: ignore[assignment]

SLIDE_COLUMNS: tuple[str, ...] = (
    "id",
    "name",
    "path",
    "fingerprint",
    "vendor",
    "width",
    "height",
    "mpp_x",
    "mpp_y",
    "objective_power",
)
"""The ``slides`` columns of a slide row (sizes in level-0 px, resolutions in µm/px)."""
SLIDE_SORT_KEYS: tuple[str, ...] = ("name", "id", *SLIDE_METRICS)
"""What the slide list can be sorted by."""
SLIDE_TYPE_COLUMNS: tuple[str, ...] = tuple(
    f"{t}_{m}"
    for t in ("epithelial", "inflammatory", "spindle", "other")
    for m in ("per_mm2", "fraction")
)
"""Per-type columns of a slide row (over the whole tissue): ``<type>_per_mm2`` (nuclei of the
type per mm² of tissue) and ``<type>_fraction`` (share of the nuclei); ``None`` for runs of a
model without a type head. A model with other type names adds its own ``<type>_*`` keys."""

_CURSOR_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideRow:
    """One slide with its latest succeeded statistics, flags and metadata."""

    id: int
    name: str
    path: str
    fingerprint: str
    vendor: str | None
    width: int | None
    """Level-0 width in pixels."""
    height: int | None
    """Level-0 height in pixels."""
    mpp_x: float | None
    """Level-0 µm per pixel along x."""
    mpp_y: float | None
    """Level-0 µm per pixel along y."""
    objective_power: float | None
    run_id: int | None
    """The latest succeeded run; ``None`` when the slide has none (then no statistics)."""
    finished_at: datetime | None
    """When that run finished (UTC)."""
    statistics: Mapping[str, float | int | None]
    """Metric (:data:`~slidestream.db.SLIDE_METRICS`, then :data:`SLIDE_TYPE_COLUMNS`) to
    value; ``None`` without a value."""
    flags: tuple[str, ...]
    """QC flag names, sorted."""
    metadata: Mapping[str, str]
    """Cohort metadata, key to value (keys sorted)."""

    def as_dict(self) -> dict[str, Any]:
        """A flat row: the slide columns, ``run_id``, ``finished_at``, every metric, ``flags``
        (list) and ``metadata`` (dict), as :func:`list_slides` returns."""
        row: dict[str, Any] = {column: getattr(self, column) for column in SLIDE_COLUMNS}
        row["run_id"] = self.run_id
        row["finished_at"] = self.finished_at
        row.update(self.statistics)
        row["flags"] = list(self.flags)
        row["metadata"] = dict(self.metadata)
        return row


@dataclass(frozen=True, slots=True, kw_only=True)
class SlidePage:
    """One page of the slide list."""

    slides: tuple[SlideRow, ...]
    next_after: str | None
    """Cursor of the next page (pass it as ``after``); ``None`` on the last page."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Cursor:
    sort: str
    descending: bool
    nulls: bool
    """Whether the last row was among the slides without a value (the second phase)."""
    value: str | float | int | None
    slide_id: int


def _encode_cursor(cursor: _Cursor) -> str:
    payload = [
        _CURSOR_VERSION,
        cursor.sort,
        cursor.descending,
        cursor.nulls,
        cursor.value,
        cursor.slide_id,
    ]
    raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(token: str, *, sort: str, descending: bool) -> _Cursor:
    problem = f"--after {token!r}: not a cursor of this slide list"
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, c_sort, c_desc, nulls, value, slide_id = json.loads(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as err:
        raise ConfigError(f"{problem}; pass the next-page cursor printed by the last page") from err
    if version != _CURSOR_VERSION or not isinstance(slide_id, int) or isinstance(slide_id, bool):
        raise ConfigError(f"{problem}; pass the next-page cursor printed by the last page")
    if c_sort != sort or bool(c_desc) != descending:
        order = f"--sort {c_sort}{' --desc' if c_desc else ''}"
        raise ConfigError(f"{problem} in this order; it was made for {order}: pass the same")
    if value is not None and not isinstance(value, str | int | float):
        raise ConfigError(f"{problem}; pass the next-page cursor printed by the last page")
    return _Cursor(
        sort=sort, descending=descending, nulls=bool(nulls), value=value, slide_id=slide_id
    )


def _check_sort(sort: str) -> None:
    if sort not in SLIDE_SORT_KEYS:
        raise ConfigError(f"--sort {sort!r}: unknown; use one of {list(SLIDE_SORT_KEYS)}")


def _columns(run_id: ColumnElement[Any]) -> list[ColumnElement[Any]]:
    return [
        *(SLIDES.c[c] for c in SLIDE_COLUMNS),
        run_id.label("run_id"),
        _RUNS.c.finished_at,
        *(SSTATS.c[m] for m in SLIDE_METRICS),
    ]


def _filters(
    where: Mapping[str, str | Sequence[str]], include_flagged: bool
) -> list[ColumnElement[bool]]:
    builtin, metadata = where_conditions(SLIDES.c.id, where)
    conditions = builtin + metadata
    if not include_flagged:
        conditions.append(not_flagged(SLIDES.c.id))
    return conditions


def _after(
    columns: Sequence[ColumnElement[Any]], values: Sequence[Any], descending: bool
) -> ColumnElement[bool]:
    """Keyset condition: the row comes after ``values`` in the (possibly reversed) order."""
    left = tuple_(*columns) if len(columns) > 1 else columns[0]
    right = tuple_(*values) if len(values) > 1 else values[0]
    return left < right if descending else left > right


def _ordered(columns: Sequence[ColumnElement[Any]], descending: bool) -> list[Any]:
    return [c.desc() if descending else c.asc() for c in columns]


RowColumns = Callable[[ColumnElement[Any]], list[ColumnElement[Any]]]
"""The selected columns of a slide-list statement, given the expression of the run id."""


def _valued_select(
    sort: str,
    descending: bool,
    cursor: _Cursor | None,
    conditions: list[ColumnElement[bool]],
    *,
    columns: RowColumns = _columns,
) -> Select[Any]:
    """Phase 1: the slides with a value of ``sort``, in the order of the sort index."""
    if sort in ("name", "id"):
        source: FromClause = SLIDES.outerjoin(
            SSTATS, SSTATS.c.run_id == SLIDES.c.latest_run_id
        ).outerjoin(_RUNS, _RUNS.c.id == SLIDES.c.latest_run_id)
        keys = [SLIDES.c.name, SLIDES.c.id] if sort == "name" else [SLIDES.c.id]
        stmt = select(*columns(SLIDES.c.latest_run_id)).select_from(source).where(*conditions)
    else:
        metric = SSTATS.c[sort]
        source = SSTATS.join(SLIDES, SLIDES.c.id == SSTATS.c.slide_id).outerjoin(
            _RUNS, _RUNS.c.id == SSTATS.c.run_id
        )
        keys = [metric, SSTATS.c.slide_id]
        stmt = (
            select(*columns(SSTATS.c.run_id))
            .select_from(source)
            .where(SSTATS.c.latest == true(), metric.is_not(None), *conditions)
        )
    if cursor is not None:
        values = [cursor.value, cursor.slide_id] if len(keys) == 2 else [cursor.slide_id]
        stmt = stmt.where(_after(keys, values, descending))
    return stmt.order_by(*_ordered(keys, descending))


def _null_select(
    sort: str,
    descending: bool,
    cursor: _Cursor | None,
    conditions: list[ColumnElement[bool]],
    *,
    columns: RowColumns = _columns,
) -> Select[Any]:
    """Phase 2 of a metric sort: slides without a value (no latest run, or ``NULL``)."""
    source = SLIDES.outerjoin(SSTATS, SSTATS.c.run_id == SLIDES.c.latest_run_id).outerjoin(
        _RUNS, _RUNS.c.id == SLIDES.c.latest_run_id
    )
    stmt = (
        select(*columns(SLIDES.c.latest_run_id))
        .select_from(source)
        .where(SSTATS.c[sort].is_(None), *conditions)
    )
    if cursor is not None and cursor.nulls:
        stmt = stmt.where(_after([SLIDES.c.id], [cursor.slide_id], descending))
    return stmt.order_by(*_ordered([SLIDES.c.id], descending))


def _whole_list(
    sort: str,
    descending: bool,
    conditions: list[ColumnElement[bool]],
    *,
    columns: RowColumns = _columns,
) -> list[Select[Any]]:
    """The statements of the whole list, in order: the slides with a value of ``sort``, then
    (for a metric) those without."""
    statements = [_valued_select(sort, descending, None, conditions, columns=columns)]
    if sort not in ("name", "id"):
        statements.append(_null_select(sort, descending, None, conditions, columns=columns))
    return statements


def _attach(conn: Connection, rows: Sequence[Any]) -> list[SlideRow]:
    """Slide rows of one batch of result rows, with their flags and metadata."""
    ids = [int(row[0]) for row in rows]
    flags: dict[int, list[str]] = {}
    metadata: dict[int, dict[str, str]] = {}
    if ids:
        for slide_id, flag in conn.execute(
            select(FLAGS.c.slide_id, FLAGS.c.flag)
            .where(FLAGS.c.slide_id.in_(ids))
            .order_by(FLAGS.c.slide_id, FLAGS.c.flag)
        ):
            flags.setdefault(slide_id, []).append(flag)
        for slide_id, key, value in conn.execute(
            select(META.c.slide_id, META.c.key, META.c.value)
            .where(META.c.slide_id.in_(ids))
            .order_by(META.c.slide_id, META.c.key)
        ):
            metadata.setdefault(slide_id, {})[key] = value
    n_cols = len(SLIDE_COLUMNS)
    run_ids = [int(row[n_cols]) for row in rows if row[n_cols] is not None]
    per_type: dict[int, dict[str, float | None]] = {}
    if run_ids:
        for run_id, name, density, fraction in conn.execute(
            select(
                TSTATS.c.run_id, TSTATS.c.nucleus_type, TSTATS.c.nuclei_per_mm2, TSTATS.c.fraction
            ).where(TSTATS.c.run_id.in_(run_ids), TSTATS.c.tissue_class == ALL_TISSUE)
        ):
            per_type.setdefault(int(run_id), {}).update(
                {f"{name}_per_mm2": density, f"{name}_fraction": fraction}
            )
    blank_types = dict.fromkeys(SLIDE_TYPE_COLUMNS)
    out = []
    for row, slide_id in zip(rows, ids, strict=True):
        out.append(
            SlideRow(
                id=slide_id,
                name=row[1],
                path=row[2],
                fingerprint=row[3],
                vendor=row[4],
                width=row[5],
                height=row[6],
                mpp_x=row[7],
                mpp_y=row[8],
                objective_power=row[9],
                run_id=row[n_cols],
                finished_at=row[n_cols + 1],
                statistics={
                    **dict(zip(SLIDE_METRICS, row[n_cols + 2 :], strict=True)),
                    **blank_types,
                    **per_type.get(int(row[n_cols]) if row[n_cols] is not None else -1, {}),
                },
                flags=tuple(flags.get(slide_id, ())),
                metadata=metadata.get(slide_id, {}),
            )
        )
    return out


def slide_page(
    engine: Engine,
    *,
    limit: int = 100,
    sort: str = "name",
    descending: bool = False,
    after: str | None = None,
    offset: int = 0,
    where: Mapping[str, str | Sequence[str]] | None = None,
    include_flagged: bool = True,
) -> SlidePage:
    """One page of the slide list.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (at the head revision).
    limit : int
        Slides per page (>= 1).
    sort : str
        ``name``, ``id`` or a metric of :data:`~slidestream.db.SLIDE_METRICS`
        (:data:`SLIDE_SORT_KEYS`).
    descending : bool
        Reverse the order (slides without a value stay last).
    after : str, optional
        The ``next_after`` cursor of the previous page (keyset pagination: the same cost at any
        depth). Made for one ``sort``/``descending``; another order is an error.
    offset : int
        Rows to skip (after ``after``, if given); reads the skipped rows.
    where : mapping, optional
        Keep slides whose metadata key (or built-in column) has the value, or one of the
        values (as :func:`~slidestream.db.query_cohort`).
    include_flagged : bool
        List QC-flagged slides too (default).

    Returns
    -------
    SlidePage
        The slides and the cursor of the next page.

    Raises
    ------
    ConfigError
        Unknown sort key, bad limit/offset, or a cursor of another order.
    SchemaVersionError
        The database is not at the revision this slidestream needs.
    """
    _check_sort(sort)
    if limit < 1 or offset < 0:
        raise ConfigError(f"limit {limit}, offset {offset}: need limit >= 1 and offset >= 0")
    cursor = None if after is None else _decode_cursor(after, sort=sort, descending=descending)
    conditions = _filters(where or {}, include_flagged)
    check_schema(engine)
    check_columns(engine, builtin=BUILTIN_COLUMNS, where=where or {})
    with engine.connect() as conn:
        rows: list[Any] = []
        nulls_from = 0
        skip_nulls = offset
        if cursor is None or not cursor.nulls:
            stmt = _valued_select(sort, descending, cursor, conditions)
            rows = list(conn.execute(stmt.limit(limit + 1).offset(offset or None)))
            nulls_from = len(rows)
            skip_nulls = 0
            if offset and not rows and sort not in ("name", "id"):
                # The offset reaches past the slides with values: skip the rest of it there.
                valued = stmt.order_by(None).subquery()
                n_valued = conn.execute(select(func.count()).select_from(valued)).scalar_one()
                skip_nulls = max(0, offset - int(n_valued))
        if sort not in ("name", "id") and len(rows) <= limit:
            null_stmt = _null_select(sort, descending, cursor, conditions)
            rows += list(
                conn.execute(null_stmt.limit(limit + 1 - len(rows)).offset(skip_nulls or None))
            )
        more = len(rows) > limit
        slides = _attach(conn, rows[:limit])
    next_after = None
    if more:
        last = slides[-1]
        in_nulls = len(slides) > nulls_from
        value: str | float | int | None = None
        if sort == "name":
            value = last.name
        elif sort != "id" and not in_nulls:
            value = last.statistics[sort]
        next_after = _encode_cursor(
            _Cursor(sort=sort, descending=descending, nulls=in_nulls, value=value, slide_id=last.id)
        )
    return SlidePage(slides=tuple(slides), next_after=next_after)


def iter_slides(
    engine: Engine,
    *,
    sort: str = "name",
    descending: bool = False,
    where: Mapping[str, str | Sequence[str]] | None = None,
    include_flagged: bool = True,
    batch_size: int = 2000,
) -> Iterator[SlideRow]:
    """Every slide of the list, streamed in order (flat memory, one database snapshot).

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (at the head revision).
    sort, descending, where, include_flagged
        As :func:`slide_page`.
    batch_size : int
        Rows fetched at a time (a server-side cursor on PostgreSQL); flags and metadata are
        fetched per batch.

    Yields
    ------
    SlideRow
        The slides in order. Keep the iterator running to its end (or close it): it holds a
        connection and, on PostgreSQL, an open cursor.

    Raises
    ------
    ConfigError
        Unknown sort key.
    SchemaVersionError
        The database is not at the revision this slidestream needs.
    """
    _check_sort(sort)
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size}: need >= 1")
    conditions = _filters(where or {}, include_flagged)
    check_schema(engine)
    check_columns(engine, builtin=BUILTIN_COLUMNS, where=where or {})
    statements = _whole_list(sort, descending, conditions)
    with engine.connect() as conn, conn.begin():
        # One transaction: both phases (and the per-batch look-ups) see the same snapshot.
        streaming = conn.execution_options(stream_results=True, yield_per=batch_size)
        for stmt in statements:
            result = streaming.execute(stmt)
            for batch in result.partitions():
                yield from _attach(conn, batch)


def list_slides(engine: Engine, *, include_flagged: bool = True) -> list[dict[str, Any]]:
    """All slides with their latest succeeded statistics, flags and metadata.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (at the head revision).
    include_flagged : bool
        List QC-flagged slides too (default).

    Returns
    -------
    list of dict
        One row per slide, sorted by name (then id): :meth:`SlideRow.as_dict`. For large
        cohorts use :func:`iter_slides` (streaming) or :func:`slide_page` (pages).
    """
    return [row.as_dict() for row in iter_slides(engine, include_flagged=include_flagged)]


def count_slides(
    engine: Engine,
    *,
    where: Mapping[str, str | Sequence[str]] | None = None,
    include_flagged: bool = True,
) -> int:
    """How many slides the list has (with the filters of :func:`slide_page`).

    Returns
    -------
    int
        The number of slides.
    """
    conditions = _filters(where or {}, include_flagged)
    check_schema(engine)
    check_columns(engine, builtin=BUILTIN_COLUMNS, where=where or {})
    with engine.connect() as conn:
        stmt = select(func.count()).select_from(SLIDES).where(*conditions)
        return int(conn.execute(stmt).scalar_one())


def recorded_type_names(engine: Engine) -> tuple[str, ...]:
    """The nucleus types the latest runs recorded, shipped names first, then the others sorted.

    A slide list's ``<type>_per_mm2`` columns: the shipped model's four types, plus the types
    of models fitted to a user's annotations (``train nuclei-types``) where slides have them.

    Returns
    -------
    tuple of str
    """
    from slidestream.db._schema import TypeStatistics

    check_schema(engine)
    stmt = (
        select(TypeStatistics.nucleus_type)
        .where(TypeStatistics.tissue_class == ALL_TISSUE, TypeStatistics.latest.is_(True))
        .distinct()
    )
    with engine.connect() as conn:
        found = {str(t) for t in conn.execute(stmt).scalars()}
    shipped = [c.removesuffix("_per_mm2") for c in SLIDE_TYPE_COLUMNS if c.endswith("_per_mm2")]
    return (*shipped, *sorted(found - set(shipped)))
