"""Cohort queries: per-group summaries of slide statistics, and the slide list.

Each slide contributes the statistics of its *latest* succeeded run (highest run id, kept in
``slides.latest_run_id`` by :func:`~slidestream.db.record_run`). QC-flagged
slides are left out unless ``include_flagged``. Grouping (``by``) and filtering (``where``)
columns are metadata keys (``diagnosis``, ``site``, ``patient_id``...) or the built-in slide
columns of :data:`BUILTIN_COLUMNS`; a built-in name wins over a metadata key of the same name.

The database selects the per-slide values (one row per slide, through SQLAlchemy expressions
and bound parameters only); medians and quartiles are computed in numpy (linear interpolation,
as PostgreSQL's ``percentile_cont``), the same on every backend.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
    ColumnElement,
    Engine,
    Float,
    FromClause,
    Select,
    Table,
    and_,
    exists,
    select,
)
from sqlalchemy.orm import aliased

from slidestream.db._migrate import check_schema
from slidestream.db._schema import (
    AnalysisRun,
    ClassStatistics,
    QCFlag,
    Slide,
    SlideMetadata,
    SlideStatistics,
)
from slidestream.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BUILTIN_COLUMNS",
    "CLASS_METRICS",
    "SLIDE_METRICS",
    "SUMMARY_FIELDS",
    "list_slides",
    "query_cohort",
    "query_cohort_df",
]

logger = logging.getLogger(__name__)

_SLIDES: Table = Slide.__table__  # type: ignore[assignment]
_RUNS: Table = AnalysisRun.__table__  # type: ignore[assignment]
_SSTATS: Table = SlideStatistics.__table__  # type: ignore[assignment]
_CSTATS: Table = ClassStatistics.__table__  # type: ignore[assignment]
_FLAGS: Table = QCFlag.__table__  # type: ignore[assignment]
_META: Table = SlideMetadata.__table__  # type: ignore[assignment]

_COMMON_METRICS = (
    "nuclei_per_mm2",
    "nucleus_count",
    "nucleus_area_mean_um2",
    "nucleus_area_median_um2",
    "mean_hematoxylin_od",
)
SLIDE_METRICS: tuple[str, ...] = ("tissue_area_mm2", *_COMMON_METRICS)
"""Metrics of the slide-level statistics (areas mm², densities per mm², nucleus areas µm²)."""
CLASS_METRICS: tuple[str, ...] = ("area_mm2", "fraction", *_COMMON_METRICS)
"""Metrics of the per-tissue-class statistics (with ``tissue_class``)."""
BUILTIN_COLUMNS: tuple[str, ...] = ("vendor", "objective_power", "name", "path", "fingerprint")
"""Slide columns usable in ``by``/``where`` besides metadata keys."""
SUMMARY_FIELDS: tuple[str, ...] = ("n", "mean", "median", "std", "q1", "q3")
"""The summary of each metric in each group (``std`` is the sample standard deviation)."""


def _check_metrics(metrics: Sequence[str], tissue_class: str | None) -> tuple[str, ...]:
    allowed = CLASS_METRICS if tissue_class is not None else SLIDE_METRICS
    metrics = tuple(metrics)
    if not metrics:
        raise ConfigError(f"no metric given; pass one or more of {list(allowed)}")
    for metric in metrics:
        if metric not in allowed:
            scope = f"tissue class {tissue_class!r}" if tissue_class is not None else "slides"
            raise ConfigError(
                f"metric {metric!r} does not exist for {scope}; use one of {list(allowed)}"
            )
    return metrics


def _builtin_filter(column: str, values: Sequence[str]) -> ColumnElement[bool]:
    col = _SLIDES.c[column]
    if isinstance(col.type, Float):
        try:
            numbers = [float(v) for v in values]
        except ValueError as err:
            raise ConfigError(
                f"--where {column}={values[0]!r}: {column} is a number; pass e.g. {column}=40"
            ) from err
        return col.in_(numbers)
    return col.in_(list(values))


def _cohort_select(
    *,
    by: Sequence[str],
    tissue_class: str | None,
    where: Mapping[str, str | Sequence[str]],
    metrics: Sequence[str],
    include_flagged: bool,
) -> Select[Any]:
    """One row per slide: the group values ``g0..`` then the metric values ``m0..``."""
    stats = _CSTATS if tissue_class is not None else _SSTATS
    on = stats.c.run_id == _SLIDES.c.latest_run_id
    if tissue_class is not None:
        on = and_(on, stats.c.tissue_class == tissue_class)
    source: FromClause = _SLIDES.join(stats, on)
    conditions: list[ColumnElement[bool]] = []
    for key, raw in where.items():
        values = [raw] if isinstance(raw, str) else list(raw)
        if key in BUILTIN_COLUMNS:
            conditions.append(_builtin_filter(key, values))
            continue
        meta = aliased(_META)
        source = source.join(
            meta,
            and_(meta.c.slide_id == _SLIDES.c.id, meta.c.key == key, meta.c.value.in_(values)),
        )
    group_cols: list[ColumnElement[Any]] = []
    for i, key in enumerate(by):
        if key in BUILTIN_COLUMNS:
            group_cols.append(_SLIDES.c[key].label(f"g{i}"))
            continue
        meta = aliased(_META)
        source = source.outerjoin(meta, and_(meta.c.slide_id == _SLIDES.c.id, meta.c.key == key))
        group_cols.append(meta.c.value.label(f"g{i}"))
    if not include_flagged:
        conditions.append(~exists().where(_FLAGS.c.slide_id == _SLIDES.c.id))
    metric_cols = [stats.c[m].label(f"m{i}") for i, m in enumerate(metrics)]
    return select(*group_cols, *metric_cols).select_from(source).where(*conditions)


def _summary(arr: npt.NDArray[np.float64]) -> dict[str, float | int | None]:
    """n, mean, median, sample std, q1, q3 of the values (no NaN) of one group."""
    n = int(arr.size)
    if n == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "q1": None, "q3": None}
    q1, median, q3 = np.percentile(arr, [25.0, 50.0, 75.0])
    return {
        "n": n,
        "mean": float(arr.mean()),
        "median": float(median),
        "std": float(arr.std(ddof=1)) if n > 1 else None,
        "q1": float(q1),
        "q3": float(q3),
    }


def _sort_key(group: tuple[Any, ...]) -> tuple[tuple[bool, str], ...]:
    return tuple((value is None, "" if value is None else f"{value}") for value in group)


def query_cohort(
    engine: Engine,
    *,
    by: Sequence[str] = (),
    tissue_class: str | None = None,
    where: Mapping[str, str | Sequence[str]] | None = None,
    metrics: Sequence[str] = ("nuclei_per_mm2",),
    include_flagged: bool = False,
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

    Returns
    -------
    list of dict
        One row per (group, metric), sorted by group: the ``by`` keys with their values,
        ``tissue_class`` (when given), ``metric``, then ``n`` (slides with a value), ``mean``,
        ``median``, ``std`` (sample; ``None`` below 2 slides), ``q1`` and ``q3`` (linear
        interpolation). Groups without slides do not appear.

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
    by = tuple(by)
    metrics = _check_metrics(metrics, tissue_class)
    stmt = _cohort_select(
        by=by,
        tissue_class=tissue_class,
        where=where or {},
        metrics=metrics,
        include_flagged=include_flagged,
    )
    check_schema(engine)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    n_by, n_rows = len(by), len(rows)
    # Column-wise, in C: group codes per slide, one float array (None -> NaN) per metric.
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in range(n_by + len(metrics))]
    keys = list(zip(*columns[:n_by], strict=True)) if n_by else [()] * n_rows
    index: dict[tuple[Any, ...], int] = {}
    codes = np.fromiter(
        (index.setdefault(key, len(index)) for key in keys), dtype=np.intp, count=n_rows
    )
    values = [np.asarray(columns[n_by + j], dtype=np.float64) for j in range(len(metrics))]
    result: list[dict[str, Any]] = []
    for group in sorted(index, key=_sort_key):
        selected = codes == index[group]
        for metric, column in zip(metrics, values, strict=True):
            group_values = column[selected]
            out: dict[str, Any] = dict(zip(by, group, strict=True))
            if tissue_class is not None:
                out["tissue_class"] = tissue_class
            out["metric"] = metric
            out.update(_summary(group_values[~np.isnan(group_values)]))
            result.append(out)
    logger.debug("cohort query: %d slides in %d groups", n_rows, len(index))
    return result


def query_cohort_df(
    engine: Engine,
    *,
    by: Sequence[str] = (),
    tissue_class: str | None = None,
    where: Mapping[str, str | Sequence[str]] | None = None,
    metrics: Sequence[str] = ("nuclei_per_mm2",),
    include_flagged: bool = False,
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
    )
    columns = [*by, *(["tissue_class"] if tissue_class is not None else []), "metric"]
    return pd.DataFrame(rows, columns=[*columns, *SUMMARY_FIELDS])


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
        One row per slide, sorted by name: the slide columns (``id``, ``name``, ``path``,
        ``fingerprint``, ``vendor``, ``width``, ``height``, ``mpp_x``, ``mpp_y``,
        ``objective_power``), ``run_id`` and ``finished_at`` of the latest succeeded run
        (``None`` without one), the metrics of :data:`SLIDE_METRICS`, ``flags`` (sorted
        flag names) and ``metadata`` (dict).
    """
    slide_cols = [
        _SLIDES.c[c]
        for c in (
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
    ]
    stmt = (
        select(
            *slide_cols,
            _SLIDES.c.latest_run_id.label("run_id"),
            _RUNS.c.finished_at,
            *(_SSTATS.c[m] for m in SLIDE_METRICS),
        )
        .select_from(
            _SLIDES.outerjoin(_RUNS, _RUNS.c.id == _SLIDES.c.latest_run_id).outerjoin(
                _SSTATS, _SSTATS.c.run_id == _SLIDES.c.latest_run_id
            )
        )
        .order_by(_SLIDES.c.name, _SLIDES.c.id)
    )
    check_schema(engine)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(stmt)]
        flags: dict[int, list[str]] = {}
        for slide_id, flag in conn.execute(
            select(_FLAGS.c.slide_id, _FLAGS.c.flag).order_by(_FLAGS.c.flag)
        ):
            flags.setdefault(int(slide_id), []).append(str(flag))
        metadata: dict[int, dict[str, str]] = {}
        for slide_id, key, value in conn.execute(
            select(_META.c.slide_id, _META.c.key, _META.c.value).order_by(_META.c.key)
        ):
            metadata.setdefault(int(slide_id), {})[str(key)] = str(value)
    result = []
    for row in rows:
        slide_id = int(row["id"])
        row["flags"] = flags.get(slide_id, [])
        row["metadata"] = metadata.get(slide_id, {})
        if include_flagged or not row["flags"]:
            result.append(row)
    return result
