"""The cohort page's data: ``slidestream query`` statistics per group, and per-slide values.

Everything comes from the statistics database (opened read-only) through the query functions of
:mod:`slidestream.db`: :func:`~slidestream.db.query_cohort` for the per-group summaries (the same
numbers as ``slidestream query``), :func:`~slidestream.db.query_slide_values` for the slides
behind them (the points of the strip and scatter plots).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from slidestream.db import (
    BUILTIN_COLUMNS,
    CLASS_METRICS,
    SLIDE_METRICS,
    SUMMARY_FIELDS,
    list_slides,
    query_cohort,
    query_slide_values,
    tissue_classes,
)
from slidestream.errors import ConfigError

__all__ = ["CohortRequest", "cohort_csv", "cohort_options", "run_cohort_query"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CohortRequest:
    """One cohort query (the options of ``slidestream query``)."""

    by: tuple[str, ...] = ()
    """Group by these metadata keys or built-in slide columns."""
    tissue_class: str | None = None
    """Statistics of one tissue class instead of the whole slide."""
    metrics: tuple[str, ...] = ("nuclei_per_mm2",)
    """Metrics (the first is plotted per group; the first two make the scatter plot)."""
    where: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Keep slides whose key has one of the values."""
    include_flagged: bool = False
    """Include QC-flagged slides."""

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ConfigError("no metric given; pass metric=nuclei_per_mm2 (or another)")
        allowed = CLASS_METRICS if self.tissue_class else SLIDE_METRICS
        for metric in self.metrics:
            if metric not in allowed:
                raise ConfigError(f"metric {metric!r} is unknown; use one of {list(allowed)}")

    @classmethod
    def from_query(cls, params: Sequence[tuple[str, str]]) -> CohortRequest:
        """Parse URL query parameters ``by``, ``class``, ``metric``, ``where=KEY=VALUE``."""
        by: list[str] = []
        metrics: list[str] = []
        where: dict[str, list[str]] = {}
        tissue_class = None
        flagged = False
        for key, value in params:
            if key == "by":
                by.extend(v.strip() for v in value.split(",") if v.strip())
            elif key == "metric":
                metrics.extend(v.strip() for v in value.split(",") if v.strip())
            elif key == "class":
                tissue_class = value.strip() or None
            elif key == "where":
                column, sep, wanted = value.partition("=")
                if not sep or not column.strip():
                    raise ConfigError(f"where={value!r}: expected where=COLUMN=VALUE")
                where.setdefault(column.strip(), []).append(wanted)
            elif key == "include_flagged":
                flagged = value.lower() in ("1", "true", "yes", "on")
        return cls(
            by=tuple(dict.fromkeys(by)),
            tissue_class=tissue_class,
            metrics=tuple(dict.fromkeys(metrics)) or ("nuclei_per_mm2",),
            where={k: tuple(v) for k, v in where.items()},
            include_flagged=flagged,
        )


def cohort_options(engine: Engine) -> dict[str, Any]:
    """The choices of the cohort page: grouping keys, tissue classes, metrics."""
    keys: set[str] = set()
    for row in list_slides(engine):
        keys.update((row.get("metadata") or {}).keys())
    return {
        "by": sorted(keys) + [c for c in BUILTIN_COLUMNS if c not in keys],
        "classes": tissue_classes(engine),
        "slide_metrics": list(SLIDE_METRICS),
        "class_metrics": list(CLASS_METRICS),
    }


def run_cohort_query(engine: Engine, request: CohortRequest) -> dict[str, Any]:
    """Summaries per group and the per-slide values behind them.

    Returns
    -------
    dict
        ``{"by", "tissue_class", "metrics", "summary": [query_cohort rows], "slides":
        [{"name", "group": [...], "values": {metric: value}}]}``.
    """
    where = {k: list(v) for k, v in request.where.items()}
    summary = query_cohort(
        engine,
        by=request.by,
        tissue_class=request.tissue_class,
        where=where,
        metrics=request.metrics,
        include_flagged=request.include_flagged,
    )
    slides = query_slide_values(
        engine,
        by=request.by,
        tissue_class=request.tissue_class,
        where=where,
        metrics=request.metrics,
        include_flagged=request.include_flagged,
    )
    return {
        "by": list(request.by),
        "tissue_class": request.tissue_class,
        "metrics": list(request.metrics),
        "summary": summary,
        "slides": [
            {
                "name": s.name,
                "group": list(s.group),
                "values": dict(zip(request.metrics, s.values, strict=True)),
            }
            for s in slides
        ],
    }


def cohort_csv(result: Mapping[str, Any], *, per_slide: bool) -> str:
    """The summary table (or the per-slide values) of :func:`run_cohort_query` as CSV text."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    by = list(result["by"])
    metrics = list(result["metrics"])
    if per_slide:
        writer.writerow(["slide", *by, *metrics])
        for s in result["slides"]:
            writer.writerow([s["name"], *s["group"], *(s["values"][m] for m in metrics)])
        return buf.getvalue()
    extra = ["tissue_class"] if result.get("tissue_class") else []
    columns = [*by, *extra, "metric", *SUMMARY_FIELDS]
    writer.writerow(columns)
    for row in result["summary"]:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return buf.getvalue()
