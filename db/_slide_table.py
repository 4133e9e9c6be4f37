"""The slide list as flat rows, for exports of any size (``query --slides --format csv``).

:func:`~slidestream.db.iter_slides` gives each slide as a :class:`~slidestream.db.SlideRow`
(with its metadata as a mapping, its flags as a tuple), assembled in Python from four queries
per batch: 27 µs a slide on SQLite, 44 µs on PostgreSQL at 100,000 slides. An export needs
none of that structure: here the database builds each row whole, in the order of the columns
of :func:`slide_table_columns`, in one streaming statement per phase. Flags and metadata are
joined into their text cells by the database (``group_concat`` / ``string_agg``, in flag and
key order) and the nucleus-type densities added, and the rows leave the driver as plain tuples
that a ``csv.writer`` writes without any per-cell Python.

Plans: an unfiltered export on PostgreSQL joins the list to per-slide aggregates of
``qc_flags``, ``slide_metadata`` and ``type_statistics`` (:func:`_grouped`: one pass each,
then one sort); filtered exports and SQLite look them up per row by primary key
(:func:`_looked_up`). On SQLite the name order is an unindexed sort of the scan.

Order, filters and the two phases of a metric sort (slides with a value, then those without)
are those of :func:`~slidestream.db.slide_page`; the rows are those of
:func:`~slidestream.db.iter_slides` with the same arguments.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    FromClause,
    Select,
    UnaryExpression,
    func,
    literal,
    select,
    true,
)
from sqlalchemy.sql import operators

from slidestream.db._columns import check_columns
from slidestream.db._engine import driver_statement
from slidestream.db._migrate import check_schema
from slidestream.db._query import (
    BUILTIN_COLUMNS,
    FLAGS,
    META,
    SLIDE_METRICS,
    SLIDES,
    SSTATS,
    TSTATS,
)
from slidestream.db._schema import ALL_TISSUE
from slidestream.db._slides import (
    _check_sort,
    _filters,
    _whole_list,
    recorded_type_names,
)
from slidestream.errors import ConfigError

__all__ = ["SlideTableRow", "iter_slide_csv", "iter_slide_table", "slide_table_columns"]

SlideTableRow = tuple[str | int | float | None, ...]
"""One slide of :func:`iter_slide_table`: text, integers, floats (``None`` without a value)."""


def slide_table_columns(type_names: Sequence[str]) -> tuple[str, ...]:
    """The columns of the exported slide list.

    Parameters
    ----------
    type_names : sequence of str
        Nucleus types with a ``<type>_per_mm2`` column (nuclei of the type per mm² of tissue),
        e.g. :func:`~slidestream.db.recorded_type_names`.

    Returns
    -------
    tuple of str
        ``name``, ``fingerprint``, ``vendor``, ``run_id`` (the latest succeeded run), the
        slide metrics (:data:`~slidestream.db.SLIDE_METRICS`: areas mm², densities per mm²,
        nucleus areas µm²), the ``<type>_per_mm2`` columns, ``flags`` (QC flag names, sorted,
        comma-joined), ``metadata`` (``key=value`` pairs, keys sorted, joined by ``;``) and
        ``path``.
    """
    return (
        "name",
        "fingerprint",
        "vendor",
        "run_id",
        *SLIDE_METRICS,
        *(f"{t}_per_mm2" for t in type_names),
        "flags",
        "metadata",
        "path",
    )


def _base_columns(run_id: ColumnElement[Any]) -> list[ColumnElement[Any]]:
    """The columns of a phase statement that the export's outer query reads."""
    return [
        SLIDES.c.id.label("slide_id"),
        SLIDES.c.name,
        SLIDES.c.fingerprint,
        SLIDES.c.vendor,
        run_id.label("run_id"),
        *(SSTATS.c[m] for m in SLIDE_METRICS),
        SLIDES.c.path,
    ]


def _string_agg(
    value: ColumnElement[str], key: ColumnElement[Any], sep: str
) -> ColumnElement[str | None]:
    """PostgreSQL's ``string_agg(value, sep ORDER BY key)``."""
    from sqlalchemy.dialects.postgresql import aggregate_order_by

    return func.string_agg(value, aggregate_order_by(literal(sep), key))


def _joined(
    dialect: str,
    value: ColumnElement[str],
    key: ColumnElement[Any],
    sep: str,
    where: ColumnElement[bool],
    outer: FromClause,
) -> ColumnElement[str | None]:
    """``value`` of the rows matching ``where``, in ``key`` order, joined by ``sep``."""
    if dialect == "postgresql":
        return select(_string_agg(value, key, sep)).where(where).scalar_subquery()
    # SQLite before 3.44 has no ORDER BY in an aggregate: join an ordered subquery (SQLite's
    # group_concat keeps the order of the rows it is given).
    ordered = select(value.label("v")).where(where).order_by(key).correlate(outer).subquery()
    return select(func.group_concat(ordered.c.v, sep)).scalar_subquery()


def _meta_text() -> ColumnElement[str]:
    return META.c.key + literal("=") + META.c.value


def _looked_up(
    dialect: str, base: FromClause, type_names: Sequence[str]
) -> tuple[FromClause, list[ColumnElement[Any]]]:
    """Flags, metadata and type densities of each row of ``base`` by correlated look-ups.

    Cheap per row (the primary keys of ``qc_flags``, ``slide_metadata`` and
    ``type_statistics``), whatever share of the slides ``base`` selects.
    """
    types = [
        select(TSTATS.c.nuclei_per_mm2)
        .where(
            TSTATS.c.run_id == base.c.run_id,
            TSTATS.c.tissue_class == ALL_TISSUE,
            TSTATS.c.nucleus_type == name,
        )
        .scalar_subquery()
        for name in type_names
    ]
    flags = _joined(
        dialect, FLAGS.c.flag, FLAGS.c.flag, ",", FLAGS.c.slide_id == base.c.slide_id, base
    )
    metadata = _joined(
        dialect, _meta_text(), META.c.key, ";", META.c.slide_id == base.c.slide_id, base
    )
    return base, [*types, flags, metadata]


def _grouped(base: FromClause, type_names: Sequence[str]) -> tuple[FromClause, list[Any]]:
    """Flags, metadata and type densities of ``base`` by joins to their per-slide aggregates.

    For whole-cohort exports on PostgreSQL: one pass over each table in key order (merge or
    hash joins, then one sort) instead of a look-up per row (0.6 s against 2.1 s per 100,000
    slides). A filter that selects few slides would still aggregate every slide, so filtered
    exports take :func:`_looked_up`.
    """
    flags = (
        select(FLAGS.c.slide_id, _string_agg(FLAGS.c.flag, FLAGS.c.flag, ",").label("v"))
        .group_by(FLAGS.c.slide_id)
        .subquery("export_flags")
    )
    metadata = (
        select(META.c.slide_id, _string_agg(_meta_text(), META.c.key, ";").label("v"))
        .group_by(META.c.slide_id)
        .subquery("export_metadata")
    )
    source = base.outerjoin(flags, flags.c.slide_id == base.c.slide_id).outerjoin(
        metadata, metadata.c.slide_id == base.c.slide_id
    )
    densities: list[Any] = []
    if type_names:
        per_type = (
            select(
                TSTATS.c.run_id,
                *(
                    func.max(TSTATS.c.nuclei_per_mm2)
                    .filter(TSTATS.c.nucleus_type == name)
                    .label(f"t{i}")
                    for i, name in enumerate(type_names)
                ),
            )
            .where(
                TSTATS.c.latest == true(),
                TSTATS.c.tissue_class == ALL_TISSUE,
                TSTATS.c.nucleus_type.in_(list(type_names)),
            )
            .group_by(TSTATS.c.run_id)
            .subquery("export_types")
        )
        source = source.outerjoin(per_type, per_type.c.run_id == base.c.run_id)
        densities = [per_type.c[f"t{i}"] for i in range(len(type_names))]
    return source, [*densities, flags.c.v, metadata.c.v]


def _order_keys(dialect: str, base: FromClause, sort: str, phase: int) -> list[ColumnElement[Any]]:
    """The order of phase ``phase`` of the list (as :func:`~slidestream.db.slide_page`)."""
    if sort == "name":
        name: ColumnElement[Any] = base.c.name
        if dialect == "sqlite":
            # ``+name`` is not indexed: SQLite scans in id order and sorts (0.76 s per 100,000
            # slides) instead of walking the name index into random pages (1.50 s).
            name = UnaryExpression(name, operator=operators.custom_op("+"))
        return [name, base.c.slide_id]
    if sort == "id" or phase == 1:
        return [base.c.slide_id]
    return [base.c[sort], base.c.slide_id]


def _statements(
    conn: Connection,
    *,
    type_names: Sequence[str],
    sort: str,
    descending: bool,
    where: Mapping[str, str | Sequence[str]],
    include_flagged: bool,
) -> list[Select[Any]]:
    """The export's statements: each phase of the slide list, its rows completed by joins
    (whole-cohort exports on PostgreSQL) or look-ups (SQLite, filtered exports)."""
    dialect = conn.dialect.name
    conditions = _filters(where, include_flagged)
    statements: list[Select[Any]] = []
    for phase, stmt in enumerate(_whole_list(sort, descending, conditions, columns=_base_columns)):
        base = stmt.order_by(None).subquery("base")
        if dialect == "postgresql" and not where:
            source, extra = _grouped(base, type_names)
        else:
            source, extra = _looked_up(dialect, base, type_names)
        *densities, flags, metadata = extra
        type_cells = [d.label(f"{n}_per_mm2") for d, n in zip(densities, type_names, strict=True)]
        keys = _order_keys(dialect, base, sort, phase)
        statements.append(
            select(
                base.c.name,
                base.c.fingerprint,
                base.c.vendor,
                base.c.run_id,
                *(base.c[m] for m in SLIDE_METRICS),
                *type_cells,
                flags.label("flags"),
                metadata.label("metadata"),
                base.c.path,
            )
            .select_from(source)
            .order_by(*(k.desc() if descending else k.asc() for k in keys))
        )
    return statements


def iter_slide_table(
    engine: Engine,
    *,
    type_names: Sequence[str] | None = None,
    sort: str = "name",
    descending: bool = False,
    where: Mapping[str, str | Sequence[str]] | None = None,
    include_flagged: bool = True,
    batch_size: int = 5000,
) -> Iterator[Sequence[SlideTableRow]]:
    """Every slide of the list as a flat row, streamed in batches (flat memory, one snapshot).

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (at the head revision).
    type_names : sequence of str, optional
        The nucleus types with a ``<type>_per_mm2`` column; default: the recorded ones
        (:func:`~slidestream.db.recorded_type_names`).
    sort, descending, where, include_flagged
        As :func:`~slidestream.db.slide_page`.
    batch_size : int
        Rows fetched at a time (a server-side cursor on PostgreSQL).

    Yields
    ------
    sequence of tuple
        Batches of rows, each in the order of ``slide_table_columns(type_names)``; a slide
        without a value has ``None`` there (no flags or metadata: ``None``). Keep the iterator
        running to its end (or close it): it holds a connection.

    Raises
    ------
    ConfigError
        Unknown sort key, or ``batch_size`` < 1.
    SchemaVersionError
        The database is not at the revision this slidestream needs.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size}: need >= 1")
    with _export(engine, type_names, sort, descending, where, include_flagged) as (
        conn,
        statements,
    ):
        raw: Any = conn.connection.dbapi_connection
        for number, stmt in enumerate(statements):
            # On the driver's cursor, whose rows are plain tuples (every column is text, an
            # integer or a float: nothing to convert); SQLAlchemy's rows cost a third of an
            # export. A named (server-side) cursor on PostgreSQL streams, in the binary
            # format (numbers arrive as their bytes, not as text to parse: 8-14 % less time
            # per export); SQLite's steps.
            if conn.dialect.name == "postgresql":
                cursor = raw.cursor(name=f"slidestream_slide_table_{number}", binary=True)
                cursor.itersize = batch_size
            else:
                cursor = raw.cursor()
            try:
                cursor.execute(*driver_statement(conn, stmt))
                while batch := cursor.fetchmany(batch_size):
                    yield batch
            finally:
                cursor.close()


def iter_slide_csv(
    engine: Engine,
    *,
    type_names: Sequence[str] | None = None,
    sort: str = "name",
    descending: bool = False,
    where: Mapping[str, str | Sequence[str]] | None = None,
    include_flagged: bool = True,
    chunk_bytes: int = 1 << 20,
) -> Iterator[bytes]:
    """The slide list as CSV text (UTF-8, header first), streamed in chunks (flat memory).

    The rows of :func:`iter_slide_table`. On PostgreSQL the server writes the CSV itself
    (``COPY (...) TO STDOUT``: no row is parsed or formatted in Python); elsewhere
    ``csv.writer`` writes the rows of :func:`iter_slide_table`.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (at the head revision).
    type_names, sort, descending, where, include_flagged
        As :func:`iter_slide_table`.
    chunk_bytes : int
        Bytes a chunk holds at least (but the last); on SQLite a chunk ends with a batch of
        :func:`iter_slide_table`.

    Yields
    ------
    bytes
        Consecutive pieces of the CSV file: the header row (:func:`slide_table_columns`), then
        one line per slide (``\\n`` line ends). Numbers are the shortest text that reads back
        as the same value (PostgreSQL writes a whole number without ``.0``); a missing value
        is an empty cell.

    Raises
    ------
    ConfigError
        Unknown sort key, or ``chunk_bytes`` < 1.
    SchemaVersionError
        The database is not at the revision this slidestream needs.
    """
    if chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes {chunk_bytes}: need >= 1")
    names = recorded_type_names(engine) if type_names is None else tuple(type_names)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(slide_table_columns(names))
    if engine.dialect.name != "postgresql":
        for batch in iter_slide_table(
            engine,
            type_names=names,
            sort=sort,
            descending=descending,
            where=where,
            include_flagged=include_flagged,
        ):
            writer.writerows(batch)
            if text.tell() >= chunk_bytes:
                yield text.getvalue().encode()
                text.seek(0)
                text.truncate()
        if text.tell():
            yield text.getvalue().encode()
        return
    with _export(engine, names, sort, descending, where, include_flagged) as (conn, statements):
        # Every digit of a float (PostgreSQL 12+'s default, set in case a server lowered it).
        conn.exec_driver_sql("SET LOCAL extra_float_digits = 1")
        chunk = bytearray(text.getvalue().encode())
        raw: Any = conn.connection.dbapi_connection
        for stmt in statements:
            sql, params = driver_statement(conn, stmt)
            # psycopg merges the parameters into the statement client-side, quoted.
            with (
                raw.cursor() as cursor,
                cursor.copy(f"COPY ({sql}) TO STDOUT (FORMAT csv)", params) as copy,
            ):
                for data in copy:
                    chunk += data
                    if len(chunk) >= chunk_bytes:
                        yield bytes(chunk)
                        chunk.clear()
        if chunk:
            yield bytes(chunk)


@contextmanager
def _export(
    engine: Engine,
    type_names: Sequence[str] | None,
    sort: str,
    descending: bool,
    where: Mapping[str, str | Sequence[str]] | None,
    include_flagged: bool,
) -> Iterator[tuple[Connection, list[Select[Any]]]]:
    """A read transaction (one snapshot for every phase) and the export's statements."""
    _check_sort(sort)
    check_schema(engine)
    check_columns(engine, builtin=BUILTIN_COLUMNS, where=where or {})
    names = recorded_type_names(engine) if type_names is None else tuple(type_names)
    postgres = engine.dialect.name == "postgresql"
    # PostgreSQL's default READ COMMITTED gives each phase's statement its own snapshot; a
    # slide re-analysed between them could be listed twice or not at all. (SQLite's read
    # transaction is one snapshot.)
    options = {"isolation_level": "REPEATABLE READ"} if postgres else {}
    with engine.connect().execution_options(**options) as conn, conn.begin():
        if postgres:
            # JIT compiling the per-row look-ups costs 0.45 s and saves nothing on a scan.
            conn.exec_driver_sql("SET LOCAL jit = off")
        yield (
            conn,
            _statements(
                conn,
                type_names=names,
                sort=sort,
                descending=descending,
                where=where or {},
                include_flagged=include_flagged,
            ),
        )
