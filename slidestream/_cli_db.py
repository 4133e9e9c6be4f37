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
import sys
from collections.abc import Iterable, Mapping, Sequence
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


def _cell(value: Any, *, exact: bool = False) -> str:
    """A value as text: 6 significant digits for a table, every digit (``exact``) for CSV."""
    if value is None:
        return ""
    if isinstance(value, float):
        # CSV is for other programs: the shortest text that reads back as the same float
        # (what csv.writer writes for a float, and what the streamed slide export writes).
        return repr(value) if exact else f"{value:.6g}"
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
            writer.writerow([_cell(row.get(c), exact=True) for c in columns])
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
    @click.argument(
        "out_dir", metavar="OUT", type=click.Path(exists=True, file_okay=False, path_type=Path)
    )
    @db_option
    def sync(out_dir: Path, db_url: str | None) -> None:
        """Record every result in OUT (OUT/*/summary.json) that the database lacks.

        For results published while the database was unreachable. Idempotent: a result that
        is recorded already is left alone. The database defaults to OUT/slidestream.db, as for
        `slidestream run`.
        """
        from slidestream.db import connect
        from slidestream.pipeline import sync_results

        engine = connect(db_url or default_db_url(out_dir), create=True)
        try:
            report = sync_results(engine, out_dir)
        finally:
            engine.dispose()
        click.echo(report.line(out_dir))

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
        "--type",
        "nucleus_type",
        metavar="TYPE",
        help="Statistics of the nuclei of one type (epithelial, inflammatory, spindle, other), "
        "inside --class or over the whole tissue; metrics: nuclei_per_mm2, nucleus_count, "
        "fraction, nucleus_area_mean_um2, nucleus_area_median_um2, eccentricity_mean, "
        "mean_hematoxylin_od.",
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
        help="List slides with their latest statistics instead (streamed: any size).",
    )
    @click.option(
        "--limit",
        type=click.IntRange(min=1),
        default=None,
        help="With --slides: one page of this many slides (the next page's --after is "
        "printed on stderr).",
    )
    @click.option(
        "--offset",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="With --slides --limit: skip this many slides first.",
    )
    @click.option(
        "--after",
        metavar="CURSOR",
        default=None,
        help="With --slides --limit: the page after this cursor (keyset: fast at any depth).",
    )
    @click.option(
        "--sort",
        metavar="KEY",
        default="name",
        show_default=True,
        help="With --slides: order by name, id or a slide metric (e.g. nuclei_per_mm2); "
        "slides without a value come last.",
    )
    @click.option("--desc", "descending", is_flag=True, help="With --slides: reverse the order.")
    def query(
        db_url: str | None,
        by: tuple[str, ...],
        tissue_class: str | None,
        nucleus_type: str | None,
        where: tuple[str, ...],
        metrics: tuple[str, ...],
        fmt: str,
        include_flagged: bool,
        list_only: bool,
        limit: int | None,
        offset: int,
        after: str | None,
        sort: str,
        descending: bool,
    ) -> None:
        """Cohort statistics: per group n, mean, median, std, q1, q3 of slide metrics.

        Each slide counts once, with its latest succeeded run; QC-flagged slides are left out
        unless --include-flagged. E.g. tumour-infiltrating lymphocytes per diagnosis:
        query --by diagnosis --class tumour --type inflammatory --metric nuclei_per_mm2
        """
        from slidestream.db import SUMMARY_FIELDS, open_database, query_cohort

        paging = {
            "--limit": limit is not None,
            "--offset": offset != 0,
            "--after": after is not None,
            "--sort": sort != "name",
            "--desc": descending,
        }
        if list_only and (tissue_class or nucleus_type):
            raise click.UsageError("--class/--type summarise a cohort: not with --slides")
        if not list_only and any(paging.values()):
            used = ", ".join(name for name, given in paging.items() if given)
            raise click.UsageError(f"{used}: only with --slides")
        if list_only and limit is None and (offset or after is not None):
            raise click.UsageError("--offset/--after page through the list: pass --limit too")
        url = _require_url(db_url)
        where_map = _parse_where(where)
        if list_only:
            _list_slides(
                url,
                where=where_map,
                include_flagged=include_flagged,
                fmt=fmt,
                limit=limit,
                offset=offset,
                after=after,
                sort=sort,
                descending=descending,
            )
            return
        engine = open_database(url)
        try:
            rows = query_cohort(
                engine,
                by=by,
                tissue_class=tissue_class,
                where=where_map,
                metrics=metrics or ("nuclei_per_mm2",),
                include_flagged=include_flagged,
                nucleus_type=nucleus_type,
            )
        finally:
            engine.dispose()
        columns = [
            *by,
            *(["tissue_class"] if tissue_class else []),
            *(["nucleus_type"] if nucleus_type else []),
            "metric",
            *SUMMARY_FIELDS,
        ]
        click.echo(_render(rows, columns, fmt))


def _list_slides(
    url: str,
    *,
    where: dict[str, list[str]],
    include_flagged: bool,
    fmt: str,
    limit: int | None,
    offset: int,
    after: str | None,
    sort: str,
    descending: bool,
) -> None:
    """``query --slides``: one page (``--limit``) or the whole list, streamed as CSV/JSON."""
    from slidestream.db import (
        SLIDE_SORT_KEYS,
        iter_slide_csv,
        iter_slides,
        open_database,
        recorded_type_names,
        slide_page,
        slide_table_columns,
    )

    if sort not in SLIDE_SORT_KEYS:
        raise click.BadParameter(
            f"{sort!r}: use one of {', '.join(SLIDE_SORT_KEYS)}", param_hint="--sort"
        )
    engine = open_database(url)
    try:
        type_names = recorded_type_names(engine)
        columns = list(slide_table_columns(type_names))
        if limit is not None:
            page = slide_page(
                engine,
                limit=limit,
                offset=offset,
                after=after,
                sort=sort,
                descending=descending,
                where=where,
                include_flagged=include_flagged,
            )
            click.echo(_render([s.as_dict() for s in page.slides], columns, fmt))
            if page.next_after is not None:
                click.echo(f"next page: --after {page.next_after}", err=True)
            return
        if fmt == "csv":
            chunks = iter_slide_csv(
                engine,
                type_names=type_names,
                sort=sort,
                descending=descending,
                where=where,
                include_flagged=include_flagged,
            )
            sys.stdout.flush()
            out = sys.stdout.buffer
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            return
        slides = iter_slides(
            engine, sort=sort, descending=descending, where=where, include_flagged=include_flagged
        )
        if fmt == "json":
            _stream_json(slides)
        else:
            click.echo(_render([s.as_dict() for s in slides], columns, fmt))
    finally:
        engine.dispose()


def _stream_json(slides: Iterable[Any], *, chunk: int = 2000) -> None:
    """Write slide rows as a JSON array, one object per line, ``chunk`` rows per write."""
    import orjson

    buffer = io.StringIO()
    buffer.write("[")
    n = 0
    for slide in slides:
        buffer.write(",\n" if n else "\n")
        buffer.write(orjson.dumps(slide.as_dict(), option=orjson.OPT_NAIVE_UTC).decode())
        n += 1
        if n % chunk == 0:
            click.echo(buffer.getvalue(), nl=False)
            buffer.seek(0)
            buffer.truncate()
    buffer.write("\n]\n" if n else "]\n")
    click.echo(buffer.getvalue(), nl=False)
