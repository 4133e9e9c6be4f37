"""Stage 6, recording: the one place outcomes become ``failures.csv``, console lines and rows.

:class:`Recorder` receives every :class:`~slidestream.pipeline.outcome.SlideOutcome` of a batch
(local or Dask: the same outcome for the same slide) in the main process and

* checks, before any slide is analysed (:meth:`Recorder.open`, also on ``with``), that the
  output folder can be written and that the database can be reached (its schema created when
  fresh), so that a bad ``--out`` or ``--db`` fails at once, in one line;
* writes a database row for it: ``record_run`` (done), ``record_skip`` (skipped: no tissue),
  ``record_failure`` (failed); an up-to-date slide is reconciled: its published summary is
  recorded if the database lacks it (``record_if_missing``: a slide analysed while the database
  was down is recorded by the next run). A slide another run holds the lock of adds no row;
* keeps going when the database fails in the middle of a batch: every slide is still analysed
  and published, the error is reported once, at the end, with the count of results not
  recorded and the command that records them (``slidestream db sync OUT``), and the exit code
  is 1;
* merges ``OUT/failures.csv`` after every failure (columns :data:`FAILURE_COLUMNS`): rows of
  other runs' slides are kept, a slide of this batch replaces its earlier row (or removes it
  when it succeeded now); the file is removed when no row is left. The merge holds an
  exclusive ``flock`` on ``OUT`` so two runs into one folder never lose each other's rows;
* gives the console summary (:meth:`Recorder.summary_lines`) and the exit code.

:func:`sync_results` records every published result of an output folder that the database
lacks (``slidestream db sync``).

No other code builds a failure record.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from slidestream._atomic import write_text_atomic
from slidestream.config import RunConfig
from slidestream.errors import ConfigError, DatabaseError
from slidestream.summary import SUMMARY_NAME, Summary

from ._models import model_records_json
from .outcome import SlideOutcome
from .provenance import software_version

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "FAILURES_NAME",
    "FAILURE_COLUMNS",
    "Recorder",
    "SyncReport",
    "failure_rows",
    "merge_failures",
    "sync_results",
]

logger = logging.getLogger(__name__)

FAILURES_NAME = "failures.csv"
"""The batch's list of failed slides, in the output folder."""

FAILURE_COLUMNS = (
    "path",
    "slide_name",
    "fingerprint",
    "parameters_hash",
    "error_class",
    "error",
    "time",
)
"""Columns of ``failures.csv``."""


def failure_rows(outcomes: Sequence[SlideOutcome]) -> list[dict[str, str]]:
    """The ``failures.csv`` rows of the failed ``outcomes``."""
    return [
        {
            "path": str(o.path),
            "slide_name": o.slide_name,
            "fingerprint": o.fingerprint or "",
            "parameters_hash": o.parameters_hash,
            "error_class": o.error_class or "",
            "error": o.reason or "",
            "time": o.started_at or "",
        }
        for o in outcomes
        if o.status == "failed"
    ]


def _row_matches(row: dict[str, str], outcome: SlideOutcome) -> bool:
    """Whether a ``failures.csv`` row is about the slide of ``outcome``."""
    if outcome.fingerprint and row.get("fingerprint") == outcome.fingerprint:
        return True
    path = row.get("path", "")
    return bool(path) and Path(path).resolve() == Path(outcome.path).resolve()


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a folder (no-op where the platform has none)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. ENOLCK on some network file systems
            logger.warning("%s: cannot lock the folder (%s); merging without a lock", folder, exc)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_failures(path: Path) -> list[dict[str, str]]:
    """The rows of an existing ``failures.csv`` (none when missing)."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return [{c: row.get(c) or "" for c in FAILURE_COLUMNS} for row in csv.DictReader(fh)]
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(
            f"{path}: cannot read the failure list ({exc}); move it away and rerun"
        ) from exc


def merge_failures(out_dir: Path, outcomes: Sequence[SlideOutcome]) -> Path | None:
    """Merge the failures of ``outcomes`` into ``out_dir/failures.csv``.

    Rows about slides that ``outcomes`` analysed again (done, failed, skipped as up to date or
    for lack of tissue) are replaced by this batch's failures; rows of other slides (another
    run's, or a slide another run holds the lock of) are kept. Runs at once into one folder
    merge one after the other (an exclusive ``flock`` on ``out_dir``).

    Returns
    -------
    Path or None
        The file, or ``None`` when no failure is left (the file is then removed).
    """
    path = out_dir / FAILURES_NAME
    handled = [o for o in outcomes if o.skip_reason != "locked"]
    with _folder_lock(out_dir):
        kept = [
            row for row in _read_failures(path) if not any(_row_matches(row, o) for o in handled)
        ]
        rows = kept + failure_rows(outcomes)
        if not rows:
            path.unlink(missing_ok=True)
            return None
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=FAILURE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return write_text_atomic(path, buffer.getvalue())


def _check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and write a probe file in it; a one-line error when that fails."""
    probe = out_dir / f".slidestream-write-test.{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        target = exc.filename or out_dir
        raise ConfigError(
            f"{out_dir}: output folder cannot be written ({target}: "
            f"{exc.strerror or type(exc).__name__}); pass an --out folder you can write"
        ) from exc


class Recorder:
    """Records the outcomes of one batch (main process only); a context manager.

    Parameters
    ----------
    config
        The run's configuration (output folder, database URL, parameters).
    """

    def __init__(self, config: RunConfig) -> None:
        self._config = config
        self._engine: Engine | None = None
        self._opened = False
        self.outcomes: list[SlideOutcome] = []
        self.db_error: str | None = None
        """The first database error of the batch (later writes are not tried)."""
        self.unrecorded: list[SlideOutcome] = []
        """Outcomes not recorded because of :attr:`db_error`."""
        self.reconciled = 0
        """Up-to-date results recorded now (the database lacked them)."""

    def __enter__(self) -> Recorder:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Check, before any work, that the output folder and the database can be used.

        Raises
        ------
        ConfigError
            The output folder cannot be created or written.
        DatabaseError
            The database URL is invalid, the server cannot be reached, the file is not a
            database, or the schema is at another revision.
        """
        if self._opened:
            return
        _check_writable(self._config.out_dir)
        self._db()
        self._opened = True

    def _db(self) -> Engine | None:
        if self._config.db_url is None:
            return None
        if self._engine is None:
            from slidestream.db import connect

            self._engine = connect(self._config.db_url, create=True)
        return self._engine

    def record(self, outcome: SlideOutcome) -> None:
        """Record one outcome: database row, ``failures.csv``, the running tally."""
        self.outcomes.append(outcome)
        if outcome.status == "failed":
            self.write_failures()
        if self._config.db_url is None or outcome.skip_reason == "locked":
            return
        if self.db_error is not None:
            self.unrecorded.append(outcome)
            return
        try:
            self._record_row(outcome)
        except DatabaseError as exc:
            self.db_error = str(exc)
            self.unrecorded.append(outcome)
            logger.error(
                "%s; the batch goes on without recording (run `slidestream db sync` later)",
                exc,
            )

    def _record_row(self, outcome: SlideOutcome) -> None:
        engine = self._db()
        if engine is None:
            return
        from slidestream.db import record_failure, record_if_missing, record_run, record_skip

        if outcome.skip_reason == "up_to_date":
            if outcome.summary is not None and record_if_missing(engine, outcome.summary):
                logger.info("%s: recorded its results (missing in the database)", outcome.path)
                self.reconciled += 1
            return
        if outcome.status == "done" and outcome.summary is not None:
            record_run(engine, outcome.summary)
            return
        common: dict[str, Any] = {
            "slide_path": str(outcome.path),
            "slide_name": outcome.slide_name,
            "fingerprint": outcome.fingerprint,
            "parameters": self._config.result_parameters(),
            "parameters_hash": outcome.parameters_hash,
            "software_version": software_version(),
        }
        if outcome.status == "skipped":
            record_skip(engine, reason=outcome.reason or str(outcome.skip_reason), **common)
        else:
            record_failure(
                engine,
                error=outcome.reason or "",
                models=model_records_json(outcome.models),
                **common,
            )

    def write_failures(self) -> Path | None:
        """Merge this batch's failures into ``failures.csv`` (see :func:`merge_failures`)."""
        return merge_failures(self._config.out_dir, self.outcomes)

    def close(self) -> None:
        """Write the final ``failures.csv`` and release the database (idempotent)."""
        try:
            if self.outcomes:
                self.write_failures()
        finally:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    @property
    def exit_code(self) -> int:
        """0 when no slide failed and every row was recorded (skipped slides included), else
        1."""
        failed = any(o.status == "failed" for o in self.outcomes)
        return int(failed or self.db_error is not None)

    def summary_lines(self) -> list[str]:
        """The console summary of the batch: counts, then one line per failed, QC-skipped or
        locked slide, then the database error (once)."""
        done = [o for o in self.outcomes if o.status == "done"]
        current = [o for o in self.outcomes if o.skip_reason == "up_to_date"]
        qc = [o for o in self.outcomes if o.skip_reason == "no_tissue"]
        locked = [o for o in self.outcomes if o.skip_reason == "locked"]
        failed = [o for o in self.outcomes if o.status == "failed"]
        head = (
            f"{len(done)} slide(s) analysed, {len(current)} up to date, {len(qc)} skipped "
            f"(no tissue), {len(failed)} failed"
        )
        if locked:
            head += f", {len(locked)} being analysed by another run"
        lines = [f"{head}; outputs in {self._config.out_dir}"]
        if self.reconciled:
            lines.append(
                f"{self.reconciled} up-to-date result(s) were missing in the database and are "
                "recorded now"
            )
        lines += [f"SKIPPED {o.path}: {o.reason}" for o in qc]
        lines += [f"SKIPPED {o.reason}" for o in locked]
        lines += [f"FAILED {o.path}: {o.reason}" for o in failed]
        if failed:
            lines.append(f"failures recorded in {self._config.out_dir / FAILURES_NAME}")
        if self.db_error is not None:
            lines.append(
                f"DATABASE ERROR {self.db_error}; {len(self.unrecorded)} slide(s) not recorded "
                f"(results are on disk): when the database is back, run `slidestream db sync "
                f"{self._config.out_dir}` with the same --db, or rerun"
            )
        return lines


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncReport:
    """What :func:`sync_results` found in an output folder."""

    results: int
    """Published results (``OUT/*/summary.json``) read."""
    recorded: int
    """Of those, recorded now (the database lacked them)."""
    unreadable: list[Path] = field(default_factory=list)
    """``summary.json`` files that could not be read (left alone)."""

    def line(self, out_dir: Path) -> str:
        """One-line summary."""
        text = (
            f"{out_dir}: {self.results} result(s), {self.recorded} recorded now, "
            f"{self.results - self.recorded} already in the database"
        )
        if self.unreadable:
            shown = ", ".join(str(p) for p in self.unreadable[:5])
            text += f"; {len(self.unreadable)} unreadable summary.json left alone: {shown}"
        return text


def sync_results(engine: Engine, out_dir: Path) -> SyncReport:
    """Record every published result of ``out_dir`` that the database lacks (idempotent).

    Parameters
    ----------
    engine
        The database (at the head revision).
    out_dir
        A ``slidestream run`` output folder; each ``OUT/<folder>/summary.json`` is a result
        (hidden folders, i.e. staging folders of interrupted runs, are not).

    Returns
    -------
    SyncReport
        Counts, and the summaries that could not be read.

    Raises
    ------
    ConfigError
        ``out_dir`` is not a folder.
    DatabaseError
        The database cannot be read or written.
    """
    import json

    from slidestream.db import record_if_missing

    if not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: not a folder; pass the --out folder of a slidestream run")
    results = recorded = 0
    unreadable: list[Path] = []
    for folder in sorted(out_dir.iterdir()):
        path = folder / SUMMARY_NAME
        if folder.name.startswith(".") or not path.is_file():
            continue
        try:
            summary = Summary.from_json(
                json.loads(path.read_text(encoding="utf-8")), source=str(path)
            )
        except (OSError, ValueError, TypeError, ConfigError):
            unreadable.append(path)
            continue
        results += 1
        if record_if_missing(engine, summary) is not None:
            logger.info("%s: recorded", path)
            recorded += 1
    return SyncReport(results=results, recorded=recorded, unreadable=unreadable)
