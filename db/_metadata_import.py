"""Cohort metadata import (CSV, per slide or per patient) and QC flags.

Metadata are free key/value pairs. Per slide (``key="slide"``) each row names a slide in one of
the columns ``slide``, ``slide_name``, ``name``, ``fingerprint`` or ``path`` (the first present),
matched against the slide's fingerprint, path or name; every other non-empty column becomes a
metadata key. Per patient (``key="patient"``) each row has a ``patient_id`` column; the values
are stored per patient and copied onto every slide whose ``patient_id`` metadata names the
patient (also onto slides that get that ``patient_id`` later, by a per-slide import).

All values go through bound parameters: any text is stored and matched literally.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from sqlalchemy import Connection, Engine, Table, delete, or_, select

from slidestream.db._cohort_values import refresh_cohort_values, register_metadata
from slidestream.db._migrate import check_schema
from slidestream.db._schema import PatientMetadata, QCFlag, Slide, SlideMetadata
from slidestream.db._write import dialect_insert, run_in_transaction
from slidestream.errors import ConfigError

__all__ = [
    "PATIENT_KEY",
    "SLIDE_ID_COLUMNS",
    "ImportReport",
    "flag_slide",
    "import_metadata",
    "import_metadata_csv",
    "unflag_slide",
]

logger = logging.getLogger(__name__)

PATIENT_KEY = "patient_id"
"""The metadata key (and CSV column) that links slides to patients."""

SLIDE_ID_COLUMNS: tuple[str, ...] = ("slide", "slide_name", "name", "fingerprint", "path")
"""CSV columns that may name the slide of a row (the first one present is used)."""

_SLIDE_META: Table = SlideMetadata.__table__  # type: ignore[assignment]
_PATIENT_META: Table = PatientMetadata.__table__  # type: ignore[assignment]
_SLIDES: Table = Slide.__table__  # type: ignore[assignment]
_FLAGS: Table = QCFlag.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportReport:
    """What a metadata import did."""

    rows: int
    """Data rows read."""
    matched_rows: int
    """Rows that matched at least one slide."""
    slides: int
    """Distinct slides that received values."""
    values: int
    """Slide metadata values written (inserted or updated)."""
    unmatched: tuple[str, ...]
    """Identifiers (slide or patient) of the rows that matched no slide."""


def _find_slides(conn: Connection, identifier: str) -> list[int]:
    stmt = select(_SLIDES.c.id).where(
        or_(
            _SLIDES.c.fingerprint == identifier,
            _SLIDES.c.path == identifier,
            _SLIDES.c.name == identifier,
        )
    )
    return [int(i) for i in conn.execute(stmt).scalars()]


def _upsert_values(
    conn: Connection, table: Table, id_column: str, rows: list[dict[str, object]]
) -> None:
    if not rows:
        return
    stmt = dialect_insert(conn, table)
    stmt = stmt.on_conflict_do_update(
        index_elements=[id_column, "key"], set_={"value": stmt.excluded.value}
    )
    conn.execute(stmt, rows)


def _check_conflicts(
    given: dict[tuple[str, str], tuple[str, int, str]],
    targets: list[str],
    pairs: Mapping[str, str],
    ident: str,
    line: int,
    key: str,
) -> None:
    """Refuse a second, different value for a (slide or patient, key) of one import."""
    for target in targets:
        for name, value in pairs.items():
            first = given.setdefault((target, name), (value, line, ident))
            if first[0] != value:
                who = repr(ident) if first[2] == ident else f"{first[2]!r} (= {ident!r})"
                raise ConfigError(
                    f"metadata: {key} {who} has two values for {name!r}: {first[0]!r} (line "
                    f"{first[1]}) and {value!r} (line {line}); keep one row per {key} (or make "
                    "the values equal) and import again; nothing was imported"
                )


def import_metadata(
    engine: Engine,
    rows: Iterable[Mapping[str, str | None]],
    *,
    key: Literal["slide", "patient"] = "slide",
) -> ImportReport:
    """Import cohort metadata rows (one transaction).

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (at the head revision).
    rows : iterable of mapping
        One mapping per CSV row, column name to text; empty values are ignored.
    key : {"slide", "patient"}
        Whether rows describe slides (identified by name, path or fingerprint) or patients
        (identified by ``patient_id``).

    Returns
    -------
    ImportReport
        Counts and the identifiers of unmatched rows.

    Raises
    ------
    ConfigError
        No identifying column, an unknown ``key``, or two rows giving one slide (or patient)
        different values for one key (named in the message, with both values and their lines:
        the data row ``i`` is line ``i + 1`` of a CSV file); nothing is imported then.
    """
    materialised = [dict(row) for row in rows]
    columns = list(materialised[0]) if materialised else []
    if key == "slide":
        id_col = next((c for c in SLIDE_ID_COLUMNS if c in columns), None)
        if id_col is None and materialised:
            raise ConfigError(
                f"metadata: no slide column among {columns}; add one of {list(SLIDE_ID_COLUMNS)}"
            )
    elif key == "patient":
        id_col = PATIENT_KEY
        if materialised and id_col not in columns:
            raise ConfigError(f"metadata: no {PATIENT_KEY!r} column among {columns}; add one")
    else:
        raise ConfigError(f"metadata key {key!r}; expected 'slide' or 'patient'")
    check_schema(engine)

    def work(conn: Connection) -> ImportReport:
        unmatched: list[str] = []
        matched_rows = 0
        touched: set[int] = set()
        written: set[tuple[str, str]] = set()
        values = 0
        given: dict[tuple[str, str], tuple[str, int, str]] = {}
        for number, row in enumerate(materialised, start=2):
            ident = (row.get(id_col or "") or "").strip()
            pairs = {
                str(k).strip(): str(v).strip()
                for k, v in row.items()
                if k is not None and k != id_col and v is not None and str(v).strip() != ""
            }
            if key == "patient":
                _check_conflicts(given, [f"patient:{ident}"], pairs, ident, number, key)
                _upsert_values(
                    conn,
                    _PATIENT_META,
                    "patient_id",
                    [{"patient_id": ident, "key": k, "value": v} for k, v in pairs.items()],
                )
                slide_ids = [
                    int(i)
                    for i in conn.execute(
                        select(_SLIDE_META.c.slide_id).where(
                            _SLIDE_META.c.key == PATIENT_KEY, _SLIDE_META.c.value == ident
                        )
                    ).scalars()
                ]
            else:
                slide_ids = _find_slides(conn, ident)
                patient = pairs.get(PATIENT_KEY)
                if patient is not None and slide_ids:
                    inherited = conn.execute(
                        select(_PATIENT_META.c.key, _PATIENT_META.c.value).where(
                            _PATIENT_META.c.patient_id == patient
                        )
                    ).all()
                    pairs = {**{k: v for k, v in inherited}, **pairs}
            if not slide_ids:
                unmatched.append(ident)
                continue
            if key == "slide":
                own = {k: v for k, v in pairs.items() if k in row or k.strip() in row}
                _check_conflicts(given, [str(i) for i in slide_ids], own, ident, number, key)
            matched_rows += 1
            batch = [
                {"slide_id": sid, "key": k, "value": v}
                for sid in slide_ids
                for k, v in pairs.items()
            ]
            _upsert_values(conn, _SLIDE_META, "slide_id", batch)
            values += len(batch)
            touched.update(slide_ids)
            written.update(pairs.items())
        # The packed cohort table copies the codes of the slides' metadata.
        register_metadata(conn, written)
        refresh_cohort_values(conn, touched)
        return ImportReport(
            rows=len(materialised),
            matched_rows=matched_rows,
            slides=len(touched),
            values=values,
            unmatched=tuple(unmatched),
        )

    report = run_in_transaction(engine, work)
    logger.info(
        "metadata: %d rows, %d matched, %d values on %d slides, %d unmatched",
        report.rows,
        report.matched_rows,
        report.values,
        report.slides,
        len(report.unmatched),
    )
    return report


def import_metadata_csv(
    engine: Engine, path: str | Path, *, key: Literal["slide", "patient"] = "slide"
) -> ImportReport:
    """Import a metadata CSV file (UTF-8, header row; comma, semicolon or tab separated).

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database.
    path : str or pathlib.Path
        The CSV file.
    key : {"slide", "patient"}
        See :func:`import_metadata`.

    Returns
    -------
    ImportReport
        Counts and the identifiers of unmatched rows.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the metadata CSV ({err}); check the path") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}; Excel's 'CSV' "
            "is cp1252); save it as 'CSV UTF-8 (Comma delimited)' or convert it, e.g. "
            f"`iconv -f cp1252 -t utf-8 '{path}' > metadata-utf8.csv`"
        ) from err
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(
            text.split("\n", 1)[0], delimiters=",;\t"
        )
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    return import_metadata(engine, list(reader), key=key)


def _resolve_slide(conn: Connection, slide: str) -> int:
    ids = _find_slides(conn, slide)
    if len(ids) != 1:
        problem = "no slide" if not ids else f"{len(ids)} slides"
        raise ConfigError(
            f"slide {slide!r}: {problem} with that fingerprint, path or name; "
            "pass the fingerprint or the full path (see `slidestream query --slides`)"
        )
    return ids[0]


def flag_slide(engine: Engine, slide: str, *, reason: str, flag: str = "qc") -> int:
    """Flag a slide; flagged slides are left out of cohort statistics unless asked.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database.
    slide : str
        The slide's fingerprint, path or (unique) name.
    reason : str
        Why (free text).
    flag : str
        Flag name; flagging again with the same name updates the reason.

    Returns
    -------
    int
        The slide's id.

    Raises
    ------
    ConfigError
        No slide, or several, match ``slide``.
    """
    check_schema(engine)

    def work(conn: Connection) -> int:
        slide_id = _resolve_slide(conn, slide)
        stmt = dialect_insert(conn, _FLAGS).values(
            slide_id=slide_id, flag=flag, reason=reason, created_at=datetime.now(UTC)
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["slide_id", "flag"], set_={"reason": stmt.excluded.reason}
        )
        conn.execute(stmt)
        refresh_cohort_values(conn, [slide_id])
        return slide_id

    return run_in_transaction(engine, work)


def unflag_slide(engine: Engine, slide: str, *, flag: str | None = None) -> int:
    """Remove QC flags from a slide.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database.
    slide : str
        The slide's fingerprint, path or (unique) name.
    flag : str, optional
        Remove only this flag; by default all flags of the slide.

    Returns
    -------
    int
        Number of flags removed.
    """
    check_schema(engine)

    def work(conn: Connection) -> int:
        slide_id = _resolve_slide(conn, slide)
        stmt = delete(_FLAGS).where(_FLAGS.c.slide_id == slide_id)
        if flag is not None:
            stmt = stmt.where(_FLAGS.c.flag == flag)
        removed = int(conn.execute(stmt).rowcount)
        refresh_cohort_values(conn, [slide_id])
        return removed

    return run_in_transaction(engine, work)
