"""CLI of the statistics database: ``db``, ``cohort`` and ``query``.

The database URL comes from ``--db`` or the ``SLIDESTREAM_DB`` environment variable (read here,
never in the library). ``slidestream run`` defaults to ``sqlite:///<out>/slidestream.db``
(:func:`default_db_url`); ``query`` and ``cohort`` need a URL. URLs are shown with their
password masked.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import click

from slidestream._cli_options import DB_ENVVAR, db_option

__all__ = ["DB_ENVVAR", "db_option", "default_db_url", "register"]


def default_db_url(out_dir: Path) -> str:
    """The database of ``slidestream run`` when neither ``--db`` nor ``$SLIDESTREAM_DB``.

    Parameters
    ----------
    out_dir : pathlib.Path
        The run's output folder.

    Returns
    -------
    str
        ``sqlite:///<out_dir>/slidestream.db`` (absolute path).
    """
    return f"sqlite:///{(Path(out_dir).resolve() / 'slidestream.db').as_posix()}"


def _require_url(db_url: str | None) -> str:
    if not db_url:
        raise click.UsageError(
            f"no database given; pass --db URL (e.g. --db sqlite:///out/slidestream.db) "
            f"or set {DB_ENVVAR}"
        )
    return db_url


def _parse_where(items: Sequence[str]) -> dict[str, list[str]]:
    where: dict[str, list[str]] = {}
    for item in items:
        column, sep, value = item.partition("=")
        if not sep or not column.strip():
            raise click.BadParameter(f"{item!r}: expected COLUMN=VALUE", param_hint="--where")
        where.setdefault(column.strip(), []).append(value)
    return where


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return ";".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _render(rows: list[dict[str, Any]], columns: list[str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2, default=_cell, ensure_ascii=False)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
        return buffer.getvalue().rstrip("\n")
    table = [columns, *[[_cell(row.get(c)) for c in columns] for row in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def register(cli: click.Group, *, train: click.Group, evaluate: click.Group) -> None:
    """Attach the ``db`` and ``cohort`` groups and the ``query`` command to the CLI."""
    group_cls = type(cli)

    @cli.group(cls=group_cls)
    def db() -> None:
        """Create and migrate the statistics database."""

    @db.command()
    @db_option
    @click.option("--revision", default="head", show_default=True, help="Target revision.")
    def upgrade(db_url: str | None, revision: str) -> None:
        """Create the schema, or migrate the database to this slidestream's revision."""
        from slidestream.db import connect, current_revision, mask_url
        from slidestream.db import upgrade as upgrade_db

        engine = connect(_require_url(db_url))
        try:
            upgrade_db(engine, revision)
            click.echo(f"{mask_url(engine.url)}: at revision {current_revision(engine)}")
        finally:
            engine.dispose()

    @db.command()
    @db_option
    def current(db_url: str | None) -> None:
        """Show the database's revision and the one this slidestream needs."""
        from slidestream.db import connect, current_revision, head_revision, mask_url

        engine = connect(_require_url(db_url))
        try:
            rev = current_revision(engine)
            state = "up to date" if rev == head_revision() else "run `slidestream db upgrade`"
            click.echo(
                f"{mask_url(engine.url)}: revision {rev or '<none>'} "
                f"(this slidestream needs {head_revision()}; {state})"
            )
        finally:
            engine.dispose()

    @db.command()
    @db_option
    @click.argument("revision")
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    def downgrade(db_url: str | None, revision: str, yes: bool) -> None:
        """Migrate the database down to REVISION (e.g. -1, 0001 or base; may drop data)."""
        from slidestream.db import connect, current_revision, mask_url
        from slidestream.db import downgrade as downgrade_db

        engine = connect(_require_url(db_url))
        try:
            if not yes:
                click.confirm(
                    f"Downgrade {mask_url(engine.url)} to {revision}? Tables may be dropped",
                    abort=True,
                )
            downgrade_db(engine, revision)
            click.echo(
                f"{mask_url(engine.url)}: at revision {current_revision(engine) or '<none>'}"
            )
        finally:
            engine.dispose()

    @cli.group(cls=group_cls)
    def cohort() -> None:
        """Cohort metadata and QC flags."""

    @cohort.command(name="import")
    @click.argument(
        "csv_path",
        metavar="METADATA.CSV",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
    )
    @click.option(
        "--key",
        type=click.Choice(["slide", "patient"]),
        default="slide",
        show_default=True,
        help="Rows describe slides (column slide/name/fingerprint/path) or patients "
        "(column patient_id, linked to slides by their patient_id metadata).",
    )
    @db_option
    def import_(csv_path: Path, key: Literal["slide", "patient"], db_url: str | None) -> None:
        """Import cohort metadata (diagnosis, site, patient_id...) from a CSV file."""
        from slidestream.db import import_metadata_csv, open_database

        engine = open_database(_require_url(db_url))
        try:
            report = import_metadata_csv(engine, csv_path, key=key)
        finally:
            engine.dispose()
        click.echo(
            f"{csv_path}: {report.rows} rows, {report.matched_rows} matched, "
            f"{report.values} values on {report.slides} slides"
        )
        if report.unmatched:
            shown = ", ".join(repr(u) for u in report.unmatched[:20])
            more = f" and {len(report.unmatched) - 20} more" if len(report.unmatched) > 20 else ""
            click.echo(
                f"{len(report.unmatched)} rows matched no slide ({key}): {shown}{more}", err=True
            )

    @cohort.command()
    @click.argument("slide")
    @click.option("--reason", required=True, help="Why the slide is excluded.")
    @click.option("--flag", default="qc", show_default=True, help="Flag name.")
    @db_option
    def flag(slide: str, reason: str, flag: str, db_url: str | None) -> None:
        """Flag SLIDE (fingerprint, path or name): excluded from cohort statistics."""
        from slidestream.db import flag_slide, open_database

        engine = open_database(_require_url(db_url))
        try:
            flag_slide(engine, slide, reason=reason, flag=flag)
        finally:
            engine.dispose()
        click.echo(f"{slide}: flagged {flag!r}")

    @cohort.command()
    @click.argument("slide")
    @click.option("--flag", default=None, help="Remove only this flag (default: all).")
    @db_option
    def unflag(slide: str, flag: str | None, db_url: str | None) -> None:
        """Remove QC flags from SLIDE (fingerprint, path or name)."""
        from slidestream.db import open_database, unflag_slide

        engine = open_database(_require_url(db_url))
        try:
            removed = unflag_slide(engine, slide, flag=flag)
        finally:
            engine.dispose()
        click.echo(f"{slide}: {removed} flag(s) removed")

    @cli.command()
    @db_option
    @click.option(
        "--by",
        "by",
        multiple=True,
        metavar="COLUMN",
        help="Group by a metadata key or vendor/objective_power (repeatable).",
    )
    @click.option(
        "--class", "tissue_class", metavar="CLASS", help="Statistics of one tissue class."
    )
    @click.option(
        "--where",
        "where",
        multiple=True,
        metavar="COLUMN=VALUE",
        help="Keep slides with this value (repeatable; same column repeated: any value).",
    )
    @click.option(
        "--metric",
        "metrics",
        multiple=True,
        metavar="METRIC",
        help="Metric to summarise (repeatable; default nuclei_per_mm2).",
    )
    @click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "csv", "json"]),
        default="table",
        show_default=True,
    )
    @click.option("--include-flagged", is_flag=True, help="Include QC-flagged slides.")
    @click.option(
        "--slides",
        "list_only",
        is_flag=True,
        help="List slides with their latest statistics instead.",
    )
    def query(
        db_url: str | None,
        by: tuple[str, ...],
        tissue_class: str | None,
        where: tuple[str, ...],
        metrics: tuple[str, ...],
        fmt: str,
        include_flagged: bool,
        list_only: bool,
    ) -> None:
        """Cohort statistics: per group n, mean, median, std, q1, q3 of slide metrics.

        Each slide counts once, with its latest succeeded run; QC-flagged slides are left out
        unless --include-flagged.
        """
        from slidestream.db import (
            SLIDE_METRICS,
            SUMMARY_FIELDS,
            list_slides,
            open_database,
            query_cohort,
        )

        url = _require_url(db_url)
        where_map = _parse_where(where)
        engine = open_database(url)
        try:
            if list_only:
                rows = list_slides(engine, include_flagged=True)
                if not include_flagged:
                    rows = [r for r in rows if not r["flags"]]
                columns = [
                    "name",
                    "fingerprint",
                    "vendor",
                    "run_id",
                    *SLIDE_METRICS,
                    "flags",
                    "metadata",
                    "path",
                ]
            else:
                rows = query_cohort(
                    engine,
                    by=by,
                    tissue_class=tissue_class,
                    where=where_map,
                    metrics=metrics or ("nuclei_per_mm2",),
                    include_flagged=include_flagged,
                )
                columns = [
                    *by,
                    *(["tissue_class"] if tissue_class else []),
                    "metric",
                    *SUMMARY_FIELDS,
                ]
        finally:
            engine.dispose()
        click.echo(_render(rows, columns, fmt))
