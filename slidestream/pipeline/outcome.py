"""The one result type of a slide in a batch: :class:`SlideOutcome`.

Every path that analyses slides (the local batch, ``--workers N``, the Dask tasks of
:mod:`slidestream.distributed`) returns one outcome per slide, and only
:class:`~slidestream.pipeline.record.Recorder` turns outcomes into ``failures.csv``, the
console summary and database rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from slidestream.errors import ConfigError
from slidestream.summary import ModelRecord, Summary

__all__ = ["OutcomeStatus", "SkipReason", "SlideOutcome"]

OutcomeStatus = Literal["done", "skipped", "failed"]
"""``done``: analysed and published; ``skipped``: on purpose (see :data:`SkipReason`);
``failed``: an error stopped the slide (the batch goes on)."""

SkipReason = Literal["up_to_date", "no_tissue", "locked"]
"""Why a slide was skipped: its stored results are current, quality control found no tissue,
or another run is analysing it right now (it holds the slide's lock, see
:mod:`slidestream.pipeline.claim`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideOutcome:
    """What happened to one slide of a batch.

    The fingerprint and the parameters hash are set in every case (the fingerprint is ``None``
    only for a path that does not exist), so a failure or a skip is recorded with the same
    identity as a success of the same slide.
    """

    path: Path
    """The slide as given."""
    slide_name: str
    """File name without the slide extension."""
    status: OutcomeStatus
    fingerprint: str | None
    """The slide's fingerprint (an unopenable file: sha256 of its bytes)."""
    parameters_hash: str
    """sha256 of the result parameters and the model hashes."""
    models: Mapping[str, ModelRecord] = field(default_factory=dict)
    """The models the slide was (or would have been) analysed with."""
    output_dir: Path | None = None
    """The slide's output folder (``done`` and ``up_to_date``)."""
    summary: Summary | None = None
    """The published summary (``done``, and the stored one when ``up_to_date``)."""
    skip_reason: SkipReason | None = None
    reason: str | None = None
    """One line: why it was skipped (the QC finding) or why it failed (the error message)."""
    error_class: str | None = None
    """Class name of the error that failed the slide (``SlideOpenError``, ``OSError``...)."""
    started_at: str | None = None
    """ISO 8601 UTC time the slide was started."""
    seconds: float = 0.0
    """Wall time spent on the slide."""

    def __post_init__(self) -> None:
        if self.status == "failed" and not (self.reason and self.error_class):
            raise ConfigError(f"{self.path}: a failed outcome needs a reason and an error class")
        if self.status == "skipped" and self.skip_reason is None:
            raise ConfigError(f"{self.path}: a skipped outcome needs a skip reason")
        if self.status == "done" and self.summary is None:
            raise ConfigError(f"{self.path}: a done outcome needs its summary")
