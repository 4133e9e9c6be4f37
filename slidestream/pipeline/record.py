"""Stage 6, recording: the one place outcomes become ``failures.csv``, console lines and rows.

:class:`Recorder` receives every :class:`~slidestream.pipeline.outcome.SlideOutcome` of a batch
(local or Dask: the same outcome for the same slide) in the main process and

* writes a database row for it: ``record_run`` (done), ``record_skip`` (skipped: no tissue),
  ``record_failure`` (failed); an up-to-date slide was recorded when it was done, so it adds no
  row (its summary is recorded again, idempotently, which restores a row that was lost);
* rewrites ``OUT/failures.csv`` after every failure (columns :data:`FAILURE_COLUMNS`), and
  removes it at the end of a batch without failures;
* gives the console summary (:meth:`Recorder.summary_lines`) and the exit code.

No other code builds a failure record.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from slidestream._atomic import write_text_atomic
from slidestream.config import RunConfig

from ._models import model_records_json
from .outcome import SlideOutcome
from .provenance import software_version

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = ["FAILURES_NAME", "FAILURE_COLUMNS", "Recorder", "failure_rows"]

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
        self.outcomes: list[SlideOutcome] = []

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

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
        up_to_date = outcome.status == "skipped" and outcome.skip_reason == "up_to_date"
        if up_to_date and outcome.summary is None:
            return
        engine = self._db()
        if engine is None:
            return
        from slidestream.db import record_failure, record_run, record_skip

        # An up-to-date slide was recorded when it was done; recording its summary again writes
        # nothing (record_run is idempotent) but restores a row lost between publishing and
        # recording (a client or scheduler lost mid-batch).
        if (outcome.status == "done" or up_to_date) and outcome.summary is not None:
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
        """Rewrite ``failures.csv`` from the failures so far (removed when there are none)."""
        path = self._config.out_dir / FAILURES_NAME
        rows = failure_rows(self.outcomes)
        if not rows:
            path.unlink(missing_ok=True)
            return None
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=FAILURE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return write_text_atomic(path, buffer.getvalue())

    def close(self) -> None:
        """Write the final ``failures.csv`` and release the database (idempotent)."""
        try:
            self.write_failures()
        finally:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    @property
    def exit_code(self) -> int:
        """0 when no slide failed (skipped slides included), else 1."""
        return int(any(o.status == "failed" for o in self.outcomes))

    def summary_lines(self) -> list[str]:
        """The console summary of the batch: counts, then one line per failed or QC-skipped
        slide."""
        done = [o for o in self.outcomes if o.status == "done"]
        current = [o for o in self.outcomes if o.skip_reason == "up_to_date"]
        qc = [o for o in self.outcomes if o.skip_reason == "no_tissue"]
        failed = [o for o in self.outcomes if o.status == "failed"]
        lines = [
            f"{len(done)} slide(s) analysed, {len(current)} up to date, {len(qc)} skipped "
            f"(no tissue), {len(failed)} failed; outputs in {self._config.out_dir}"
        ]
        lines += [f"SKIPPED {o.path}: {o.reason}" for o in qc]
        lines += [f"FAILED {o.path}: {o.reason}" for o in failed]
        if failed:
            lines.append(f"failures recorded in {self._config.out_dir / FAILURES_NAME}")
        return lines
