"""Cohort queries: per-group summaries (n, mean, std, median, quartiles) of slide statistics.

Each slide contributes the statistics of its *latest* succeeded run: the statistics rows whose
``latest`` flag :func:`~slidestream.db.record_run` keeps (read through the covering indexes
``ix_slide_statistics_latest`` / ``ix_class_statistics_latest``). QC-flagged slides are left
out unless ``include_flagged``. Grouping (``by``) and filtering (``where``) columns are metadata
keys (``diagnosis``, ``site``, ``patient_id``...) or the built-in slide columns of
:data:`BUILTIN_COLUMNS`; a built-in name wins over a metadata key of the same name.

Where the summaries are computed:

* **PostgreSQL**: in the database. ``count``, ``avg``, ``stddev_samp`` and the ordered-set
  aggregate ``percentile_cont(ARRAY[0.25, 0.5, 0.75]) WITHIN GROUP (ORDER BY value)`` per
  group, so one row per group leaves the server.
* **SQLite** (in-process, so no rows cross a network): the database joins and filters, one row
  per slide, and numpy summarises the columns in one vectorised pass (sort by (group, value),
  then the same linear interpolation as ``numpy.percentile`` / ``percentile_cont``). This is an
  exact fallback: a pure-SQL version (``row_number() OVER (PARTITION BY ... ORDER BY value)``
  and ``count() OVER``, then picking the two neighbours of each quantile position) gives the
  same numbers but took 330 ms instead of about 110 ms at 100,000 slides (three sorts in
  SQLite's temporary B-trees), see ``bench/db_query.py``.

Both give what the previous numpy-only implementation gave (counts, groups, their order and
``None`` exactly; means, standard deviations and quantiles to the last bits of rounding, which
depend on the order of summation), see ``tests/unit/db/test_query_reference.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    Engine,
    Float,
    FromClause,
    Select,
    Table,
    and_,
    cast,
    exists,
    false,
    func,
    literal,
    select,
    true,
)
from sqlalchemy.orm import aliased

from slidestream.db._cohort_scan import fetch_columns
from slidestream.db._cohort_values import COHORT, META_VALUES, slot_of_keys
from slidestream.db._columns import check_columns
from slidestream.db._migrate import check_schema
from slidestream.db._schema import (
    ALL_TISSUE,
    CLASS_METRIC_COLUMNS,
    SLIDE_METRIC_COLUMNS,
    TYPE_METRIC_COLUMNS,
    ClassStatistics,
    QCFlag,
    Slide,
    SlideMetadata,
    SlideStatistics,
    TypeStatistics,
)
from slidestream.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BUILTIN_COLUMNS",
    "CLASS_METRICS",
    "SLIDE_METRICS",
    "SUMMARY_FIELDS",
    "TYPE_METRICS",
    "MetricSummary",
    "query_cohort",
    "query_cohort_df",
    "summarise_cohort",
]

logger = logging.getLogger(__name__)

SLIDES: Table = Slide.__table__  # type: ignore[assignment]
SSTATS: Table = SlideStatistics.__table__  # type: ignore[assignment]
CSTATS: Table = ClassStatistics.__table__  # type: ignore[assignment]
TSTATS: Table = TypeStatistics.__table__  # type: ignore[assignment]
FLAGS: Table = QCFlag.__table__  # type: ignore[assignment]
META: Table = SlideMetadata.__table__  # type: ignore[assignment]

SLIDE_METRICS: tuple[str, ...] = SLIDE_METRIC_COLUMNS
"""Metrics of the slide-level statistics (areas mm², densities per mm², nucleus areas µm²)."""
CLASS_METRICS: tuple[str, ...] = CLASS_METRIC_COLUMNS
"""Metrics of the per-tissue-class statistics (with ``tissue_class``)."""
TYPE_METRICS: tuple[str, ...] = TYPE_METRIC_COLUMNS
"""Metrics of the per-nucleus-type statistics (with ``nucleus_type``, and ``tissue_class`` for
one class instead of the whole tissue)."""
BUILTIN_COLUMNS: tuple[str, ...] = ("vendor", "objective_power", "name", "path", "fingerprint")
"""Slide columns usable in ``by``/``where`` besides metadata keys."""
SUMMARY_FIELDS: tuple[str, ...] = ("n", "mean", "median", "std", "q1", "q3")
"""The summary of each metric in each group (``std`` is the sample standard deviation)."""

_QUANTILES = (0.25, 0.5, 0.75)

_Summary = tuple[int, float | None, float | None, float | None, float | None, float | None]
"""``(n, mean, std, q1, median, q3)`` of one metric in one group."""

GroupValue = str | float | None
"""A group's value of one ``by`` column (text for metadata, a number for ``objective_power``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricSummary:
    """The summary of one metric over one group of slides."""

    group: tuple[tuple[str, GroupValue], ...]
    """``(column, value)`` per ``by`` column, in the order given; ``None``: key missing."""
    tissue_class: str | None
    """The tissue class summarised, ``None`` for slide-level statistics."""
    metric: str
    """The metric (a column of :data:`SLIDE_METRICS`, :data:`CLASS_METRICS` or
    :data:`TYPE_METRICS`)."""
    n: int
    """Slides of the group with a value (``NULL`` values are left out)."""
    mean: float | None
    median: float | None
    std: float | None
    """Sample standard deviation (``ddof=1``); ``None`` below 2 values."""
    q1: float | None
    """First quartile (linear interpolation, as ``percentile_cont`` / ``numpy.percentile``)."""
    q3: float | None
    """Third quartile."""
    nucleus_type: str | None = None
    """The nucleus type summarised (``None``: all nuclei)."""

    def as_dict(self) -> dict[str, Any]:
        """The row of :func:`query_cohort`: the ``by`` columns, ``tissue_class`` (when set),
        ``nucleus_type`` (when set), ``metric``, then :data:`SUMMARY_FIELDS`."""
        row: dict[str, Any] = dict(self.group)
        if self.tissue_class is not None:
            row["tissue_class"] = self.tissue_class
        if self.nucleus_type is not None:
            row["nucleus_type"] = self.nucleus_type
        row["metric"] = self.metric
        row.update(
            n=self.n, mean=self.mean, median=self.median, std=self.std, q1=self.q1, q3=self.q3
        )
        return row


def check_metrics(
    metrics: Sequence[str], tissue_class: str | None, nucleus_type: str | None = None
) -> tuple[str, ...]:
    """The metrics, checked against those of the scope (slide level, one tissue class, or one
    nucleus type in either)."""
    if nucleus_type is not None:
        allowed = TYPE_METRICS
    else:
        allowed = CLASS_METRICS if tissue_class is not None else SLIDE_METRICS
    metrics = tuple(metrics)
    if not metrics:
        raise ConfigError(f"no metric given; pass one or more of {list(allowed)}")
    for metric in metrics:
        if metric not in allowed:
            scope = f"tissue class {tissue_class!r}" if tissue_class is not None else "slides"
            if nucleus_type is not None:
                region = scope if tissue_class is not None else "the whole tissue"
                scope = f"nucleus type {nucleus_type!r} in {region}"
            raise ConfigError(
                f"metric {metric!r} does not exist for {scope}; use one of {list(allowed)}"
            )
    return metrics


def _builtin_filter(column: str, values: Sequence[str]) -> ColumnElement[bool]:
    col = SLIDES.c[column]
    if isinstance(col.type, Float):
        try:
            numbers = [float(v) for v in values]
        except ValueError as err:
            raise ConfigError(
                f"--where {column}={values[0]!r}: {column} is a number; pass e.g. {column}=40"
            ) from err
        return col.in_(numbers)
    return col.in_(list(values))


def where_conditions(
    slide_id: ColumnElement[int], where: Mapping[str, str | Sequence[str]]
) -> tuple[list[ColumnElement[bool]], list[ColumnElement[bool]]]:
    """Conditions on the slide ``slide_id`` for ``where``: (on built-in slide columns, others).

    Built-in columns (:data:`BUILTIN_COLUMNS`) give conditions on the ``slides`` table (the
    caller joins it); metadata keys give ``EXISTS`` subqueries on ``slide_metadata`` (index
    ``(key, value, slide_id)``). All values are bound parameters.
    """
    builtin: list[ColumnElement[bool]] = []
    metadata: list[ColumnElement[bool]] = []
    for key, raw in where.items():
        values = [raw] if isinstance(raw, str) else list(raw)
        if key in BUILTIN_COLUMNS:
            builtin.append(_builtin_filter(key, values))
            continue
        meta = aliased(META)
        metadata.append(
            exists().where(meta.c.slide_id == slide_id, meta.c.key == key, meta.c.value.in_(values))
        )
    return builtin, metadata


def not_flagged(slide_id: ColumnElement[int]) -> ColumnElement[bool]:
    """The slide has no QC flag (index ``(slide_id, flag)`` of ``qc_flags``)."""
    return ~exists().where(FLAGS.c.slide_id == slide_id)


def _cohort_parts(
    *,
    by: Sequence[str],
    tissue_class: str | None,
    where: Mapping[str, str | Sequence[str]],
    include_flagged: bool,
    nucleus_type: str | None = None,
) -> tuple[Table, FromClause, list[ColumnElement[Any]], list[ColumnElement[bool]]]:
    """The statistics table, FROM clause, group columns ``g0..`` and WHERE conditions."""
    stats = SSTATS if tissue_class is None else CSTATS
    if nucleus_type is not None:
        stats = TSTATS
    conditions: list[ColumnElement[bool]] = [stats.c.latest == true()]
    if nucleus_type is not None:
        region = ALL_TISSUE if tissue_class is None else tissue_class
        conditions[:0] = [stats.c.tissue_class == region, stats.c.nucleus_type == nucleus_type]
    elif tissue_class is not None:
        conditions.insert(0, stats.c.tissue_class == tissue_class)
    builtin_where, meta_where = where_conditions(stats.c.slide_id, where)
    source: FromClause = stats
    if builtin_where or any(key in BUILTIN_COLUMNS for key in by):
        source = source.join(SLIDES, SLIDES.c.id == stats.c.slide_id)
    group_cols: list[ColumnElement[Any]] = []
    for i, key in enumerate(by):
        if key in BUILTIN_COLUMNS:
            group_cols.append(SLIDES.c[key].label(f"g{i}"))
            continue
        meta = aliased(META)
        source = source.outerjoin(
            meta, and_(meta.c.slide_id == stats.c.slide_id, meta.c.key == key)
        )
        group_cols.append(meta.c.value.label(f"g{i}"))
    conditions += builtin_where + meta_where
    if not include_flagged:
        conditions.append(not_flagged(stats.c.slide_id))
    return stats, source, group_cols, conditions


def _sort_key(group: tuple[Any, ...]) -> tuple[tuple[bool, str], ...]:
    return tuple((value is None, "" if value is None else f"{value}") for value in group)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _summary_select(
    stats: Table,
    source: FromClause,
    group_cols: list[ColumnElement[Any]],
    conditions: list[ColumnElement[bool]],
    metrics: Sequence[str],
) -> Select[Any]:
    """PostgreSQL: per group, count, mean, std and the three quantiles of each metric."""
    aggregates: list[ColumnElement[Any]] = []
    for metric in metrics:
        value = cast(stats.c[metric], Float)
        aggregates += [
            func.count(value),
            func.avg(value),
            func.stddev_samp(value),
            func.percentile_cont(literal(list(_QUANTILES), ARRAY(Float)))
            .within_group(value)
            .label(None),
        ]
    stmt = select(*group_cols, *aggregates).select_from(source).where(*conditions)
    if group_cols:
        return stmt.group_by(*group_cols)
    return stmt.having(func.count() > 0)  # no slides: no group (not one of n = 0)


def _aggregate_in_database(
    conn: Connection,
    stats: Table,
    source: FromClause,
    group_cols: list[ColumnElement[Any]],
    conditions: list[ColumnElement[bool]],
    metrics: Sequence[str],
) -> dict[tuple[Any, ...], list[_Summary]]:
    """PostgreSQL: one row per group with count, mean, std and the three quantiles per metric."""
    stmt = _summary_select(stats, source, group_cols, conditions, metrics)
    n_by = len(group_cols)
    out: dict[tuple[Any, ...], list[_Summary]] = {}
    for row in conn.execute(stmt):
        summaries = []
        for j in range(len(metrics)):
            n, mean, std, quantiles = row[n_by + 4 * j : n_by + 4 * j + 4]
            q1, median, q3 = quantiles if quantiles is not None else (None, None, None)
            summaries.append(
                (
                    int(n),
                    _float_or_none(mean),
                    _float_or_none(std),
                    _float_or_none(q1),
                    _float_or_none(median),
                    _float_or_none(q3),
                )
            )
        out[tuple(row[:n_by])] = summaries
    return out


def _lerp(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], t: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """``a + (b - a) t``, computed from the nearer end as ``numpy.percentile`` does."""
    diff = b - a
    return np.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)


_FEW_GROUPS = 64
"""Up to this many groups, each group's values are sorted on their own (numpy's SIMD sort)."""
_FEW_GROUPS_SQL = 4096
"""Up to this many possible groups, PostgreSQL groups the rows by code before sending them."""


def _sort_within_groups(
    codes: npt.NDArray[np.intp], values: npt.NDArray[np.float64], counts: npt.NDArray[np.intp]
) -> npt.NDArray[np.float64]:
    """``values`` ordered by (group code, value): what ``values[np.lexsort((values, codes))]``
    gives, 3 to 7 times faster (1,000,000 values: 27 or 67 ms instead of 193 ms)."""
    n_groups = counts.size
    if n_groups <= _FEW_GROUPS:
        if codes.size < 2 or bool(np.all(codes[1:] >= codes[:-1])):
            out = values.copy()  # already by group (PostgreSQL's rows of few groups)
        else:
            # A stable sort of 16-bit keys is a radix sort.
            out = values[np.argsort(codes.astype(np.int16), kind="stable")]
        bounds = np.concatenate(([0], np.cumsum(counts)))
        for g in range(n_groups):
            out[bounds[g] : bounds[g + 1]].sort()
        return out
    by_value = np.argsort(values)
    keys = codes[by_value]
    if n_groups <= np.iinfo(np.int16).max:
        keys = keys.astype(np.int16)
    # Stable: each group keeps the value order.
    return values[by_value][np.argsort(keys, kind="stable")]


def grouped_summaries(
    codes: npt.NDArray[np.intp], values: npt.NDArray[np.float64], n_groups: int
) -> list[_Summary]:
    """n, mean, sample std, q1, median, q3 of ``values`` per group code (NaN left out).

    One sort by (group, value) and vectorised arithmetic on the group boundaries, so many
    groups (e.g. ``by=["patient_id"]``) cost no more than one.

    Parameters
    ----------
    codes : numpy.ndarray of intp, shape (N,)
        Group code 0..n_groups-1 of each value.
    values : numpy.ndarray of float64, shape (N,)
        The values; NaN stands for ``NULL``.
    n_groups : int
        Number of groups.

    Returns
    -------
    list of tuple
        Per group code: ``(n, mean, std, q1, median, q3)``, ``None`` where undefined.
    """
    keep = ~np.isnan(values)
    codes, values = codes[keep], values[keep]
    empty: _Summary = (0, None, None, None, None, None)
    if values.size == 0:
        return [empty] * n_groups
    counts = np.bincount(codes, minlength=n_groups)
    sorted_values = _sort_within_groups(codes, values, counts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    filled = counts > 0
    sums = np.zeros(n_groups)
    sums[filled] = np.add.reduceat(sorted_values, starts[filled])
    means = sums / np.maximum(counts, 1)
    deviations = sorted_values - np.repeat(means, counts)
    squares = np.zeros(n_groups)
    squares[filled] = np.add.reduceat(deviations * deviations, starts[filled])
    stds = np.sqrt(squares / np.maximum(counts - 1, 1))
    last = np.maximum(counts - 1, 0)
    top = sorted_values.size - 1
    quantiles = []
    for q in _QUANTILES:
        position = last * q
        below = np.floor(position).astype(np.intp)
        above = np.minimum(below + 1, last)
        quantiles.append(
            _lerp(
                sorted_values[np.minimum(starts + below, top)],
                sorted_values[np.minimum(starts + above, top)],
                position - below,
            )
        )
    q1s, medians, q3s = quantiles
    return [
        (
            int(counts[g]),
            float(means[g]),
            float(stds[g]) if counts[g] > 1 else None,
            float(q1s[g]),
            float(medians[g]),
            float(q3s[g]),
        )
        if filled[g]
        else empty
        for g in range(n_groups)
    ]


def _aggregate_in_numpy(
    conn: Connection,
    stats: Table,
    source: FromClause,
    group_cols: list[ColumnElement[Any]],
    conditions: list[ColumnElement[bool]],
    metrics: Sequence[str],
) -> dict[tuple[Any, ...], list[_Summary]]:
    """SQLite: one row per slide from the database, summarised column-wise in numpy."""
    metric_cols = [stats.c[m].label(f"m{i}") for i, m in enumerate(metrics)]
    stmt: Select[Any] = select(*group_cols, *metric_cols).select_from(source).where(*conditions)
    result = conn.execute(stmt)
    try:
        # Plain DBAPI tuples: text and numbers need no result processing, and building
        # SQLAlchemy rows cost as much as the query itself at 100,000 slides.
        rows = result.cursor.fetchall()
    finally:
        result.close()
    n_by, n_rows = len(group_cols), len(rows)
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in range(n_by + len(metrics))]
    index: dict[Any, int] = {}
    if n_by == 0:
        codes = np.zeros(n_rows, dtype=np.intp)
        if n_rows:
            index[()] = 0
    else:
        keys = columns[0] if n_by == 1 else zip(*columns[:n_by], strict=True)
        codes = np.fromiter(
            (index.setdefault(key, len(index)) for key in keys), dtype=np.intp, count=n_rows
        )
    per_metric = [
        grouped_summaries(codes, np.asarray(columns[n_by + j], dtype=np.float64), len(index))
        for j in range(len(metrics))
    ]
    out: dict[tuple[Any, ...], list[_Summary]] = {}
    for key, code in index.items():
        group = (key,) if n_by == 1 else key
        out[group] = [summaries[code] for summaries in per_metric]
    return out


# --- Slide-level and class scopes: the packed table cohort_values ---------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PackedQuery:
    """A cohort query on ``cohort_values``: what to read, and how to group."""

    source: FromClause
    """``cohort_values``, joined to ``slides`` for built-in columns and to ``slide_metadata``
    for keys without a slot (and, for :attr:`group_cols`, to ``metadata_values``)."""
    conditions: list[ColumnElement[bool]]
    """Scope, QC flags and the ``where`` filters (on codes where the key has a slot)."""
    codes: list[ColumnElement[Any]] | None
    """The code column of each ``by`` key when every one has a slot (the fast path), else
    ``None``."""
    group_cols: list[ColumnElement[Any]]
    """The group values ``g0..`` as text or numbers (the general path; empty with codes)."""


def packed_query(
    conn: Connection,
    *,
    by: Sequence[str],
    tissue_class: str | None,
    where: Mapping[str, str | Sequence[str]],
    include_flagged: bool,
) -> PackedQuery:
    """The parts of a slide-level or class cohort query on ``cohort_values``.

    Metadata filters on slotted keys become ``g<slot> IN (codes)`` (the codes of the values
    are looked up first; a value nobody has matches nothing), others ``EXISTS`` subqueries on
    ``slide_metadata``.
    """
    slots = slot_of_keys(conn)
    scope = ALL_TISSUE if tissue_class is None else tissue_class
    conditions: list[ColumnElement[bool]] = [COHORT.c.tissue_class == scope]
    if not include_flagged:
        conditions.append(COHORT.c.flagged == false())
    source: FromClause = COHORT
    if any(key in BUILTIN_COLUMNS for key in (*by, *where)):
        source = source.join(SLIDES, SLIDES.c.id == COHORT.c.slide_id)
    for key, raw in where.items():
        values = [raw] if isinstance(raw, str) else list(raw)
        if key in BUILTIN_COLUMNS:
            conditions.append(_builtin_filter(key, values))
        elif key in slots:
            found = conn.execute(
                select(META_VALUES.c.id).where(
                    META_VALUES.c.key == key, META_VALUES.c.value.in_(values)
                )
            ).scalars()
            conditions.append(COHORT.c[f"g{slots[key]}"].in_(sorted(int(c) for c in found)))
        else:
            meta = aliased(META)
            conditions.append(
                exists().where(
                    meta.c.slide_id == COHORT.c.slide_id,
                    meta.c.key == key,
                    meta.c.value.in_(values),
                )
            )
    if all(key in slots and key not in BUILTIN_COLUMNS for key in by):
        codes: list[ColumnElement[Any]] = [COHORT.c[f"g{slots[key]}"] for key in by]
        return PackedQuery(source=source, conditions=conditions, codes=codes, group_cols=[])
    group_cols: list[ColumnElement[Any]] = []
    for i, key in enumerate(by):
        if key in BUILTIN_COLUMNS:
            group_cols.append(SLIDES.c[key].label(f"g{i}"))
        elif key in slots:
            decoded = aliased(META_VALUES)
            source = source.outerjoin(decoded, decoded.c.id == COHORT.c[f"g{slots[key]}"])
            group_cols.append(decoded.c.value.label(f"g{i}"))
        else:
            meta = aliased(META)
            source = source.outerjoin(
                meta, and_(meta.c.slide_id == COHORT.c.slide_id, meta.c.key == key)
            )
            group_cols.append(meta.c.value.label(f"g{i}"))
    return PackedQuery(source=source, conditions=conditions, codes=None, group_cols=group_cols)


def _factor(codes: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(uniques, index)``: the distinct codes (sorted) and each element's index among them."""
    shifted = codes + 1  # -1 (no value) becomes 0
    top = int(shifted.max()) if shifted.size else 0
    if top < 4 * shifted.size + 4096:  # codes are dense ids: a look-up table, no sort
        present = np.zeros(top + 1, dtype=bool)
        present[shifted] = True
        uniques = np.flatnonzero(present)
        table = np.zeros(top + 1, dtype=np.int64)
        table[uniques] = np.arange(uniques.size)
        return uniques - 1, table[shifted]
    uniques, index = np.unique(shifted, return_inverse=True)
    return uniques - 1, index.reshape(-1)


def _factorize(
    arrays: Sequence[npt.NDArray[np.int64]], n_rows: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
    """The group number of each row, and the codes of each group (one row per group)."""
    if not arrays:
        return np.zeros(n_rows, dtype=np.intp), np.zeros((1 if n_rows else 0, 0), dtype=np.int64)
    if len(arrays) == 1:
        uniques, index = _factor(arrays[0])
        return index.astype(np.intp), uniques[:, None]
    combined = np.zeros(n_rows, dtype=np.int64)
    for array in arrays:
        uniques, index = _factor(array)
        combined = combined * max(uniques.size, 1) + index
    _, first, group = np.unique(combined, return_index=True, return_inverse=True)
    keys = np.stack([array[first] for array in arrays], axis=1)
    return group.reshape(-1).astype(np.intp), keys


def _packed_summaries(
    conn: Connection,
    *,
    by: Sequence[str],
    tissue_class: str | None,
    where: Mapping[str, str | Sequence[str]],
    metrics: Sequence[str],
    include_flagged: bool,
) -> dict[tuple[Any, ...], list[_Summary]]:
    """Per group, the summary of each metric (slide level or one class)."""
    query = packed_query(
        conn, by=by, tissue_class=tissue_class, where=where, include_flagged=include_flagged
    )
    if query.codes is None:
        if conn.dialect.name == "postgresql":
            return _aggregate_in_database(
                conn, COHORT, query.source, query.group_cols, query.conditions, metrics
            )
        return _aggregate_in_numpy(
            conn, COHORT, query.source, query.group_cols, query.conditions, metrics
        )
    groups_at_most = 1
    if by:
        distinct = select(META_VALUES.c.key, func.count()).where(META_VALUES.c.key.in_(list(by)))
        per_key = {
            str(key): int(n) for key, n in conn.execute(distinct.group_by(META_VALUES.c.key))
        }
        for key in by:
            groups_at_most *= per_key.get(key, 0) + 1  # + 1: slides without the key
    code_arrays, value_arrays = fetch_columns(
        conn,
        codes=query.codes,
        metrics=[COHORT.c[m] for m in metrics],
        source=query.source,
        conditions=query.conditions,
        few_groups=groups_at_most <= _FEW_GROUPS_SQL,
    )
    n_rows = value_arrays[0].size
    group_of_row, group_codes = _factorize(code_arrays, n_rows)
    names: dict[int, str] = {}
    present = sorted({int(c) for c in np.unique(group_codes) if c >= 0})
    if present:
        decode = select(META_VALUES.c.id, META_VALUES.c.value)
        if len(present) <= _FEW_GROUPS_SQL:
            decode = decode.where(META_VALUES.c.id.in_(present))
        else:
            decode = decode.where(META_VALUES.c.key.in_(list(by)))
        names = {int(code): str(value) for code, value in conn.execute(decode)}
    keys = [
        tuple(None if code < 0 else names[code] for code in row) for row in group_codes.tolist()
    ]
    per_metric = [grouped_summaries(group_of_row, values, len(keys)) for values in value_arrays]
    return {key: [summaries[g] for summaries in per_metric] for g, key in enumerate(keys)}


def summarise_cohort(
    engine: Engine,
    *,
    by: Sequence[str] = (),
    tissue_class: str | None = None,
    where: Mapping[str, str | Sequence[str]] | None = None,
    metrics: Sequence[str] = ("nuclei_per_mm2",),
    include_flagged: bool = False,
    nucleus_type: str | None = None,
) -> list[MetricSummary]:
    """Summarise slide statistics per group of slides (typed rows; see :func:`query_cohort`).

    Parameters are those of :func:`query_cohort`.

    Returns
    -------
    list of MetricSummary
        One per (group, metric), sorted by group (text order, missing values last), metrics in
        the order given.
    """
    by = tuple(by)
    metrics = check_metrics(metrics, tissue_class, nucleus_type)
    where = where or {}
    check_schema(engine)
    check_columns(engine, builtin=BUILTIN_COLUMNS, by=by, where=where)
    with engine.connect() as conn:
        if nucleus_type is None:
            groups = _packed_summaries(
                conn,
                by=by,
                tissue_class=tissue_class,
                where=where,
                metrics=metrics,
                include_flagged=include_flagged,
            )
        else:
            stats, source, group_cols, conditions = _cohort_parts(
                by=by,
                tissue_class=tissue_class,
                where=where,
                include_flagged=include_flagged,
                nucleus_type=nucleus_type,
            )
            if conn.dialect.name == "postgresql":
                groups = _aggregate_in_database(
                    conn, stats, source, group_cols, conditions, metrics
                )
            else:
                groups = _aggregate_in_numpy(conn, stats, source, group_cols, conditions, metrics)
    result = []
    for group in sorted(groups, key=_sort_key):
        for metric, (n, mean, std, q1, median, q3) in zip(metrics, groups[group], strict=True):
            result.append(
                MetricSummary(
                    group=tuple(zip(by, group, strict=True)),
                    tissue_class=tissue_class,
                    metric=metric,
                    n=n,
                    mean=mean,
                    median=median,
                    std=std,
                    q1=q1,
                    q3=q3,
                    nucleus_type=nucleus_type,
                )
            )
    logger.debug("cohort query: %d groups", len(groups))
    return result


def query_cohort(
    engine: Engine,
    *,
    by: Sequence[str] = (),
    tissue_class: str | None = None,
    where: Mapping[str, str | Sequence[str]] | None = None,
    metrics: Sequence[str] = ("nuclei_per_mm2",),
    include_flagged: bool = False,
    nucleus_type: str | None = None,
) -> list[dict[str, Any]]:
    """Summarise slide statistics per group of slides.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (at the head revision).
    by : sequence of str
        Group by these metadata keys or built-in columns (:data:`BUILTIN_COLUMNS`); slides
        without a key form the group ``None``. Empty: one group of all slides.
    tissue_class : str, optional
        Summarise the statistics of this tissue class (metrics of :data:`CLASS_METRICS`)
        instead of the slide-level ones (:data:`SLIDE_METRICS`).
    where : mapping, optional
        Keep slides whose metadata key (or built-in column) equals the value, or one of the
        values when a sequence is given; several keys must all match. Values are compared
        literally as text (numbers for ``objective_power``).
    metrics : sequence of str
        Metrics to summarise.
    include_flagged : bool
        Include QC-flagged slides.
    nucleus_type : str, optional
        Summarise the statistics of the nuclei of this type (metrics of :data:`TYPE_METRICS`),
        inside ``tissue_class`` when given, else over the whole tissue; e.g. ``tissue_class=
        "tumour", nucleus_type="inflammatory", metrics=["nuclei_per_mm2"]`` is the density of
        tumour-infiltrating inflammatory cells. Slides analysed without a typing model have no
        such rows (they are not in any group).

    Returns
    -------
    list of dict
        One row per (group, metric), sorted by group: the ``by`` keys with their values,
        ``tissue_class`` (when given), ``nucleus_type`` (when given), ``metric``, then ``n``
        (slides with a value), ``mean``, ``median``, ``std`` (sample; ``None`` below 2 slides),
        ``q1`` and ``q3`` (linear interpolation). Groups without slides do not appear.

    Raises
    ------
    ConfigError
        Unknown metric, or a non-number ``where`` value for a number column.
    SchemaVersionError
        The database is not at the revision this slidestream needs.

    Examples
    --------
    >>> query_cohort(engine, by=["diagnosis"], tissue_class="tumour",
    ...              metrics=["nuclei_per_mm2"])  # doctest: +SKIP
    [{'diagnosis': 'LUAD', 'tissue_class': 'tumour', 'metric': 'nuclei_per_mm2', 'n': 12, ...}]
    """
    return [
        summary.as_dict()
        for summary in summarise_cohort(
            engine,
            by=by,
            tissue_class=tissue_class,
            where=where,
            metrics=metrics,
            include_flagged=include_flagged,
            nucleus_type=nucleus_type,
        )
    ]


def query_cohort_df(
    engine: Engine,
    *,
    by: Sequence[str] = (),
    tissue_class: str | None = None,
    where: Mapping[str, str | Sequence[str]] | None = None,
    metrics: Sequence[str] = ("nuclei_per_mm2",),
    include_flagged: bool = False,
    nucleus_type: str | None = None,
) -> pd.DataFrame:
    """:func:`query_cohort` as a pandas DataFrame (needs pandas).

    Returns
    -------
    pandas.DataFrame
        One row per (group, metric), columns as the dicts of :func:`query_cohort`.

    Raises
    ------
    ModuleNotFoundError
        pandas is not installed.
    """
    try:
        import pandas as pd
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "query_cohort_df needs pandas; pip install pandas (or use query_cohort)"
        ) from err
    rows = query_cohort(
        engine,
        by=by,
        tissue_class=tissue_class,
        where=where,
        metrics=metrics,
        include_flagged=include_flagged,
        nucleus_type=nucleus_type,
    )
    columns = [
        *by,
        *(["tissue_class"] if tissue_class is not None else []),
        *(["nucleus_type"] if nucleus_type is not None else []),
        "metric",
    ]
    return pd.DataFrame(rows, columns=[*columns, *SUMMARY_FIELDS])
