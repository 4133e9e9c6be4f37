"""Upkeep of the packed cohort table ``cohort_values`` and of the metadata dictionaries.

``cohort_values`` holds, per slide and scope (the slide level and each tissue class), the
statistics of the slide's latest succeeded run, whether the slide is QC-flagged, and the codes
of its metadata values in the slotted keys (:class:`~slidestream.db.CohortValues`). It copies
four sources, and each writer of a source rewrites the rows of the slides it changed, in its
own transaction (so readers never see the copy disagree with its sources):

* :func:`~slidestream.db.record_run`, when the run becomes the slide's latest;
* :func:`~slidestream.db.import_metadata` (after :func:`register_metadata` gave the new keys
  a slot and the new values a code);
* :func:`~slidestream.db.flag_slide` and :func:`~slidestream.db.unflag_slide`.

Invariant (kept by :func:`register_metadata`, which every metadata writer calls, and by
migration 0005 for older data): every key of ``slide_metadata`` is in ``metadata_keys`` and
every (key, value) pair in ``metadata_values``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    BindParameter,
    Boolean,
    ColumnElement,
    CompoundSelect,
    Connection,
    Executable,
    FromClause,
    Select,
    Table,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal,
    null,
    select,
    true,
    union_all,
)

from slidestream.db._schema import (
    ALL_TISSUE,
    COHORT_METRIC_COLUMNS,
    COHORT_SLOTS,
    ClassStatistics,
    CohortValues,
    MetadataKey,
    MetadataValue,
    QCFlag,
    SlideMetadata,
    SlideStatistics,
)

__all__ = [
    "COHORT",
    "META_KEYS",
    "META_VALUES",
    "SLOT_COLUMNS",
    "rebuild_cohort_values",
    "refresh_cohort_values",
    "register_metadata",
    "slot_of_keys",
]

logger = logging.getLogger(__name__)

COHORT: Table = CohortValues.__table__  # type: ignore[assignment]
META_KEYS: Table = MetadataKey.__table__  # type: ignore[assignment]
META_VALUES: Table = MetadataValue.__table__  # type: ignore[assignment]
_META: Table = SlideMetadata.__table__  # type: ignore[assignment]
_FLAGS: Table = QCFlag.__table__  # type: ignore[assignment]
_SSTATS: Table = SlideStatistics.__table__  # type: ignore[assignment]
_CSTATS: Table = ClassStatistics.__table__  # type: ignore[assignment]

SLOT_COLUMNS: tuple[str, ...] = tuple(f"g{i}" for i in range(COHORT_SLOTS))
"""The code columns of ``cohort_values``, one per slot."""

_IN_CHUNK = 500
"""Slide ids per ``IN (...)`` list when rewriting many slides."""
_SLIDE_IDS: BindParameter[list[int]] = bindparam("slide_ids", expanding=True)


def slot_of_keys(conn: Connection) -> dict[str, int]:
    """The metadata keys that have a slot, and their slot (0 .. ``COHORT_SLOTS - 1``)."""
    rows = conn.execute(
        select(META_KEYS.c.key, META_KEYS.c.slot).where(META_KEYS.c.slot.is_not(None))
    )
    return {str(key): int(slot) for key, slot in rows}


def _insert(conn: Connection, table: Table) -> Any:
    # dialect_insert of _write, without importing it (it imports this module).
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)


def _register_keys(conn: Connection, keys: Iterable[str]) -> None:
    """Add the keys not yet in ``metadata_keys``, with the free slots in key order."""
    wanted = sorted(set(keys))
    known = {str(k): s for k, s in conn.execute(select(META_KEYS.c.key, META_KEYS.c.slot))}
    if all(key in known for key in wanted):
        return
    if conn.dialect.name == "postgresql":
        # Two importers must not give two keys the same free slot.
        conn.exec_driver_sql("LOCK TABLE metadata_keys IN SHARE ROW EXCLUSIVE MODE")
        known = {str(k): s for k, s in conn.execute(select(META_KEYS.c.key, META_KEYS.c.slot))}
    used = {slot for slot in known.values() if slot is not None}
    free = iter(slot for slot in range(COHORT_SLOTS) if slot not in used)
    rows = [{"key": key, "slot": next(free, None)} for key in wanted if key not in known]
    if rows:
        conn.execute(_insert(conn, META_KEYS).on_conflict_do_nothing(index_elements=["key"]), rows)


def register_metadata(conn: Connection, pairs: Iterable[tuple[str, str]]) -> None:
    """Give new metadata keys a slot (while one is free) and new (key, value) pairs a code.

    Parameters
    ----------
    conn : sqlalchemy.Connection
        In the transaction that writes the metadata.
    pairs : iterable of (str, str)
        The (key, value) pairs written.
    """
    unique = sorted(set(pairs))
    if not unique:
        return
    _register_keys(conn, (key for key, _ in unique))
    conn.execute(
        _insert(conn, META_VALUES).on_conflict_do_nothing(index_elements=["key", "value"]),
        [{"key": key, "value": value} for key, value in unique],
    )


def _codes(by_ids: bool) -> FromClause:
    """Per slide, the code of its value of each slotted key (columns ``g0`` .. ``g7``)."""
    values = META_VALUES
    columns = [
        func.max(case((META_KEYS.c.slot == slot, values.c.id))).label(name)
        for slot, name in enumerate(SLOT_COLUMNS)
    ]
    source = _META.join(META_KEYS, META_KEYS.c.key == _META.c.key).join(
        values, and_(values.c.key == _META.c.key, values.c.value == _META.c.value)
    )
    stmt = (
        select(_META.c.slide_id, *columns)
        .select_from(source)
        .where(META_KEYS.c.slot.is_not(None))
        .group_by(_META.c.slide_id)
    )
    if by_ids:
        stmt = stmt.where(_META.c.slide_id.in_(_SLIDE_IDS))
    return stmt.subquery("codes")


def _scope_select(stats: Table, by_ids: bool) -> Select[Any]:
    """The ``cohort_values`` rows of one statistics table (slide level or classes)."""
    codes = _codes(by_ids)
    flagged_ids = select(_FLAGS.c.slide_id).distinct()
    if by_ids:
        flagged_ids = flagged_ids.where(_FLAGS.c.slide_id.in_(_SLIDE_IDS))
    flags = flagged_ids.subquery("flagged")
    source = stats.outerjoin(flags, flags.c.slide_id == stats.c.slide_id).outerjoin(
        codes, codes.c.slide_id == stats.c.slide_id
    )
    scope: ColumnElement[Any] = literal(ALL_TISSUE) if stats is _SSTATS else stats.c.tissue_class
    # Typed NULLs: PostgreSQL types the columns of a UNION from its first SELECT.
    metrics = [
        stats.c[m] if m in stats.c else cast(null(), COHORT.c[m].type)
        for m in COHORT_METRIC_COLUMNS
    ]
    stmt = (
        select(
            scope,
            stats.c.slide_id,
            stats.c.run_id,
            cast(flags.c.slide_id.is_not(None), Boolean),
            *(codes.c[name] for name in SLOT_COLUMNS),
            *metrics,
        )
        .select_from(source)
        .where(stats.c.latest == true())
    )
    if by_ids:
        stmt = stmt.where(stats.c.slide_id.in_(_SLIDE_IDS))
    return stmt


@functools.cache
def _refresh_statements(by_ids: bool) -> tuple[Executable, Executable]:
    """``DELETE`` and ``INSERT ... SELECT`` of a refresh, built once (a ``record_run`` spent
    more time building this statement than running it)."""
    columns = ["tissue_class", "slide_id", "run_id", "flagged", *SLOT_COLUMNS]
    columns += list(COHORT_METRIC_COLUMNS)
    rows: Select[Any] | CompoundSelect[Any] = union_all(
        _scope_select(_SSTATS, by_ids), _scope_select(_CSTATS, by_ids)
    )
    if not by_ids:
        # A whole rebuild writes the rows in scan order (scope, then slide), as record_run's
        # writes of one slide after another leave them. In join order the rows of a class
        # scope lay at random in the heap, and an index-only scan of that scope switched
        # visibility-map pages at almost every row: 777,000 buffer accesses and 0.53 s for
        # the 990,000 rows of one scope at 1,000,000 slides, against 14,600 and 0.22 s.
        union = rows.subquery("rows")
        scope, slide = list(union.c)[:2]
        rows = select(*union.c).order_by(scope, slide)
    wipe = delete(COHORT)
    if by_ids:
        wipe = wipe.where(COHORT.c.slide_id.in_(_SLIDE_IDS))
    return wipe, COHORT.insert().from_select(columns, rows)


def refresh_cohort_values(conn: Connection, slide_ids: Iterable[int] | None) -> None:
    """Rewrite the ``cohort_values`` rows of these slides (every slide when ``None``).

    Parameters
    ----------
    conn : sqlalchemy.Connection
        In the transaction that changed the slides' latest run, metadata or flags.
    slide_ids : iterable of int, optional
        The slides; ``None`` rebuilds the whole table (a bulk load).
    """
    if slide_ids is None:
        wipe, fill = _refresh_statements(False)
        conn.execute(wipe)
        conn.execute(fill)
    else:
        wipe, fill = _refresh_statements(True)
        ids = sorted(set(slide_ids))
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = {"slide_ids": ids[start : start + _IN_CHUNK]}
            conn.execute(wipe, chunk)
            conn.execute(fill, chunk)
    logger.debug("cohort_values rewritten for %s slides", "all" if slide_ids is None else "some")


def rebuild_cohort_values(conn: Connection) -> None:
    """Register every stored metadata pair and rebuild ``cohort_values`` (after a bulk load
    that wrote the tables directly, as ``bench/_db_fill.py`` does)."""
    _register_keys(conn, (str(k) for k in conn.execute(select(_META.c.key).distinct()).scalars()))
    # WHERE true: SQLite would read the ON of ON CONFLICT as a join constraint.
    distinct = select(_META.c.key, _META.c.value).distinct().where(true())
    conn.execute(
        _insert(conn, META_VALUES)
        .from_select(["key", "value"], distinct)
        .on_conflict_do_nothing(index_elements=["key", "value"])
    )
    refresh_cohort_values(conn, None)
