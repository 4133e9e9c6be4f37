"""SQLAlchemy 2.0 typed models of the statistics database.

Tables (all created by the Alembic migrations in ``slidestream.migrations``):

``slides``
    One row per distinct slide file, keyed by its content ``fingerprint``.
``slide_metadata``
    Free key/value cohort metadata per slide (``patient_id``, ``diagnosis``, ``site``, ...).
``patient_metadata``
    Key/value metadata per patient; it is copied onto every slide whose ``patient_id``
    metadata names the patient (at import time, in both directions).
``analysis_runs``
    One row per analysis attempt of a slide (``running``/``succeeded``/``failed``/``skipped``).
``slide_statistics``
    The slide-level numbers of ``summary.json``, one row per succeeded run.
``class_statistics``
    The per-tissue-class numbers of ``summary.json``, one row per (run, class).
``type_statistics``
    The per-nucleus-type numbers of ``summary.json`` (typing nucleus models), one row per
    (run, tissue class, type); ``tissue_class`` is ``""`` for the whole tissue.

The slide's latest succeeded run is kept twice by ``record_run``, in the same transaction:
``slides.latest_run_id`` (for the slide list) and the ``latest`` column of every statistics row
(true on the rows of that run). Cohort queries read the statistics of latest runs through the
covering indexes ``ix_*_statistics_latest`` (scope, ``latest``, ``slide_id``, the metrics)
without touching ``slides``; a later statistics table (e.g. per nucleus type) follows the same
pattern: a ``latest`` column and one covering index led by its scope columns.
``qc_flags``
    Quality-control flags; a flagged slide is left out of cohort statistics unless asked.
``metadata_keys``, ``metadata_values``
    Dictionaries of the metadata: each key once (the first :data:`COHORT_SLOTS` keys get a
    *slot*, a column of ``cohort_values``), each distinct (key, value) once with an integer id
    (its *code*).
``cohort_values``
    The packed cohort table: one row per slide x scope (the slide level, ``tissue_class`` =
    ``""``, and each tissue class) of the slide's latest succeeded run, with the metrics, the
    slide's QC ``flagged`` state and the codes of its metadata in the slotted keys (``g0`` ..
    ``g7``). A cohort query is one range scan of it (no join with ``slide_metadata``).
    ``record_run``, ``import_metadata`` and ``flag_slide`` / ``unflag_slide`` keep it in the
    transaction that changes what it copies (:mod:`slidestream.db._cohort_values`).

Areas are in mm² (tissue) or µm² (nuclei); densities in nuclei per mm² of tissue.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ALL_TISSUE",
    "CLASS_METRIC_COLUMNS",
    "COHORT_METRIC_COLUMNS",
    "COHORT_SLOTS",
    "RUN_STATUSES",
    "SLIDE_METRIC_COLUMNS",
    "TYPE_METRIC_COLUMNS",
    "AnalysisRun",
    "Base",
    "ClassStatistics",
    "CohortValues",
    "MetadataKey",
    "MetadataValue",
    "PatientMetadata",
    "QCFlag",
    "Slide",
    "SlideMetadata",
    "SlideStatistics",
    "TypeStatistics",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

RUN_STATUSES: tuple[str, ...] = ("running", "succeeded", "failed", "skipped")
"""The values of :attr:`AnalysisRun.status`."""

_COMMON_METRIC_COLUMNS = (
    "nuclei_per_mm2",
    "nucleus_count",
    "nucleus_area_mean_um2",
    "nucleus_area_median_um2",
    "mean_hematoxylin_od",
)
SLIDE_METRIC_COLUMNS: tuple[str, ...] = (
    "tissue_area_mm2",
    *_COMMON_METRIC_COLUMNS,
    "inflammatory_epithelial_ratio",
)
"""The queryable columns of :class:`SlideStatistics` (in its covering index)."""
CLASS_METRIC_COLUMNS: tuple[str, ...] = (
    "area_mm2",
    "fraction",
    *_COMMON_METRIC_COLUMNS,
    "inflammatory_epithelial_ratio",
)
"""The queryable columns of :class:`ClassStatistics` (in its covering index)."""
TYPE_METRIC_COLUMNS: tuple[str, ...] = (
    "nuclei_per_mm2",
    "nucleus_count",
    "fraction",
    "nucleus_area_mean_um2",
    "nucleus_area_median_um2",
    "eccentricity_mean",
    "mean_hematoxylin_od",
)
"""The queryable columns of :class:`TypeStatistics` (in its covering index)."""
ALL_TISSUE = ""
"""``type_statistics.tissue_class`` of the rows about the whole tissue (not one class)."""
COHORT_METRIC_COLUMNS: tuple[str, ...] = tuple(
    dict.fromkeys((*SLIDE_METRIC_COLUMNS, *CLASS_METRIC_COLUMNS))
)
"""The metric columns of :class:`CohortValues` (slide-level and per-class metrics)."""
COHORT_SLOTS = 8
"""Metadata keys with a column (``g0`` .. ``g7``) in :class:`CohortValues`."""


class Base(DeclarativeBase):
    """Declarative base of every slidestream table (with a constraint naming convention)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON}


class Slide(Base):
    """A slide file, identified by its content fingerprint (quickhash-1 or sha256)."""

    __tablename__ = "slides"
    __table_args__ = (
        Index(None, "latest_run_id"),
        # The slide list's default order, and its keyset pagination (name, id).
        Index(None, "name", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(128), unique=True)
    path: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(String(512))
    vendor: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    """Level-0 width in pixels."""
    height: Mapped[int | None] = mapped_column(Integer)
    """Level-0 height in pixels."""
    mpp_x: Mapped[float | None] = mapped_column(Float)
    """Level-0 µm per pixel along x."""
    mpp_y: Mapped[float | None] = mapped_column(Float)
    """Level-0 µm per pixel along y."""
    objective_power: Mapped[float | None] = mapped_column(Float)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    latest_run_id: Mapped[int | None] = mapped_column(Integer)
    """Id of the slide's latest succeeded run (the highest id), kept by ``record_run``.

    A denormalised pointer (no foreign key, which would make the two tables refer to each
    other) so that cohort queries need no ``GROUP BY`` over all runs.
    """


class SlideMetadata(Base):
    """One cohort metadata value of one slide (``key`` is e.g. ``diagnosis``)."""

    __tablename__ = "slide_metadata"
    __table_args__ = (
        # Filters: the slides with key = value (or one of several values).
        Index(None, "key", "value", "slide_id"),
        # Grouping: the value of key for each slide (covering, in slide order).
        Index(None, "key", "slide_id", "value"),
    )

    slide_id: Mapped[int] = mapped_column(
        ForeignKey("slides.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(1024))


class PatientMetadata(Base):
    """One cohort metadata value of one patient, copied onto the patient's slides."""

    __tablename__ = "patient_metadata"

    patient_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(1024))


class AnalysisRun(Base):
    """One analysis attempt of a slide.

    ``success_key`` is set only for succeeded runs: the sha256 of the slide fingerprint, the
    parameters hash and the model weight hashes. Its unique constraint makes recording the same
    successful analysis twice a no-op, also between concurrent writers.
    """

    __tablename__ = "analysis_runs"
    __table_args__ = (
        CheckConstraint("status IN ('running', 'succeeded', 'failed', 'skipped')", name="status"),
        Index(None, "slide_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slide_id: Mapped[int | None] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"))
    """``None`` when the slide failed before its fingerprint was known."""
    slide_path: Mapped[str] = mapped_column(Text)
    slide_name: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    parameters_hash: Mapped[str] = mapped_column(String(64))
    models: Mapped[dict[str, Any]] = mapped_column(JSON)
    """``{"nuclei": {"name": ..., "sha256": ..., "mpp": ...}, "tissue": {...}}``."""
    success_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    software_version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Seconds per pipeline stage, ``{"total": ...}``."""
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Output file names relative to the slide's output folder."""


class SlideStatistics(Base):
    """The slide-level numbers of one succeeded run (``statistics`` of ``summary.json``)."""

    __tablename__ = "slide_statistics"
    __table_args__ = (
        # Cohort queries: the latest statistics of every slide (covering).
        Index("ix_slide_statistics_latest", "latest", "slide_id", *SLIDE_METRIC_COLUMNS),
        # The slide list sorted by a metric (keyset pagination on (metric, slide_id)).
        *(
            Index(f"ix_slide_statistics_by_{column}", "latest", column, "slide_id")
            for column in SLIDE_METRIC_COLUMNS
        ),
    )

    run_id: Mapped[int] = mapped_column(
        ForeignKey("analysis_runs.id", ondelete="CASCADE"), primary_key=True
    )
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"), index=True)
    latest: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Whether this is the slide's latest succeeded run (kept by ``record_run``)."""
    tissue_area_mm2: Mapped[float | None] = mapped_column(Float)
    nucleus_count: Mapped[int | None] = mapped_column(Integer)
    nuclei_per_mm2: Mapped[float | None] = mapped_column(Float)
    nucleus_area_mean_um2: Mapped[float | None] = mapped_column(Float)
    nucleus_area_median_um2: Mapped[float | None] = mapped_column(Float)
    nucleus_area_q1_um2: Mapped[float | None] = mapped_column(Float)
    nucleus_area_q3_um2: Mapped[float | None] = mapped_column(Float)
    mean_hematoxylin_od: Mapped[float | None] = mapped_column(Float)
    inflammatory_epithelial_ratio: Mapped[float | None] = mapped_column(Float)
    """Inflammatory per epithelial nucleus (typing models; ``None`` otherwise)."""


class ClassStatistics(Base):
    """The numbers of one tissue class in one succeeded run."""

    __tablename__ = "class_statistics"
    __table_args__ = (
        # Cohort queries: one class's latest statistics of every slide (covering).
        Index(
            "ix_class_statistics_latest",
            "tissue_class",
            "latest",
            "slide_id",
            *CLASS_METRIC_COLUMNS,
        ),
    )

    run_id: Mapped[int] = mapped_column(
        ForeignKey("analysis_runs.id", ondelete="CASCADE"), primary_key=True
    )
    tissue_class: Mapped[str] = mapped_column(String(128), primary_key=True)
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"), index=True)
    latest: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Whether this is the slide's latest succeeded run (kept by ``record_run``)."""
    area_mm2: Mapped[float | None] = mapped_column(Float)
    fraction: Mapped[float | None] = mapped_column(Float)
    """Fraction of the slide's tissue area, 0..1."""
    nucleus_count: Mapped[int | None] = mapped_column(Integer)
    nuclei_per_mm2: Mapped[float | None] = mapped_column(Float)
    nucleus_area_mean_um2: Mapped[float | None] = mapped_column(Float)
    nucleus_area_median_um2: Mapped[float | None] = mapped_column(Float)
    nucleus_area_q1_um2: Mapped[float | None] = mapped_column(Float)
    nucleus_area_q3_um2: Mapped[float | None] = mapped_column(Float)
    mean_hematoxylin_od: Mapped[float | None] = mapped_column(Float)
    inflammatory_epithelial_ratio: Mapped[float | None] = mapped_column(Float)
    """Inflammatory per epithelial nucleus in the class (typing models)."""


class TypeStatistics(Base):
    """The numbers of one nucleus type in one region (the tissue, or a class) of one run."""

    __tablename__ = "type_statistics"
    __table_args__ = (
        # Cohort queries: one (region, type)'s latest statistics of every slide (covering).
        Index(
            "ix_type_statistics_latest",
            "tissue_class",
            "nucleus_type",
            "latest",
            "slide_id",
            *TYPE_METRIC_COLUMNS,
        ),
    )

    run_id: Mapped[int] = mapped_column(
        ForeignKey("analysis_runs.id", ondelete="CASCADE"), primary_key=True
    )
    tissue_class: Mapped[str] = mapped_column(String(128), primary_key=True)
    """The tissue class, or :data:`ALL_TISSUE` (``""``) for the whole tissue."""
    nucleus_type: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The nucleus model's type name (``epithelial``, ``inflammatory``, ``spindle``, ``other``)."""
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"), index=True)
    latest: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Whether this is the slide's latest succeeded run (kept by ``record_run``)."""
    nucleus_count: Mapped[int | None] = mapped_column(Integer)
    fraction: Mapped[float | None] = mapped_column(Float)
    """Share of the region's nuclei that have the type, 0..1."""
    nuclei_per_mm2: Mapped[float | None] = mapped_column(Float)
    """Nuclei of the type per mm² of the region."""
    nucleus_area_mean_um2: Mapped[float | None] = mapped_column(Float)
    nucleus_area_median_um2: Mapped[float | None] = mapped_column(Float)
    eccentricity_mean: Mapped[float | None] = mapped_column(Float)
    eccentricity_median: Mapped[float | None] = mapped_column(Float)
    mean_hematoxylin_od: Mapped[float | None] = mapped_column(Float)


class QCFlag(Base):
    """A quality-control flag on a slide; it excludes the slide from cohort statistics."""

    __tablename__ = "qc_flags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"))
    flag: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # One flag of a name per slide; flagging again updates the reason.
        Index(None, "slide_id", "flag", unique=True),
    )


class MetadataKey(Base):
    """A metadata key, and its slot (column ``g<slot>`` of :class:`CohortValues`), if any."""

    __tablename__ = "metadata_keys"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    slot: Mapped[int | None] = mapped_column(Integer, unique=True)
    """0 .. :data:`COHORT_SLOTS` - 1 in order of first import; ``None`` for later keys (their
    cohort queries join ``slide_metadata``)."""


class MetadataValue(Base):
    """A distinct (key, value) pair of the slide metadata; ``id`` is its code."""

    __tablename__ = "metadata_values"
    __table_args__ = (Index(None, "key", "value", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(128))
    value: Mapped[str] = mapped_column(String(1024))


class CohortValues(Base):
    """The latest statistics of one slide in one scope, packed for cohort queries.

    One row per (scope, slide) where the slide has a latest succeeded run with statistics in
    the scope: ``tissue_class`` is :data:`ALL_TISSUE` (``""``) for the slide-level statistics
    (``tissue_area_mm2`` set, ``area_mm2`` / ``fraction`` ``NULL``), else the class. SQLite
    stores it as a ``WITHOUT ROWID`` table (the primary key is the order of the rows, so a scope
    is one contiguous range); PostgreSQL reads it through the covering index
    ``ix_cohort_values_scan`` (index-only scans).
    """

    __tablename__ = "cohort_values"
    __table_args__ = (
        Index(None, "slide_id"),
        # PostgreSQL only (SQLite's table is ordered by (tissue_class, slide_id) already).
        Index(
            "ix_cohort_values_scan",
            "tissue_class",
            "flagged",
            "slide_id",
            postgresql_include=[
                *(f"g{i}" for i in range(COHORT_SLOTS)),
                *COHORT_METRIC_COLUMNS,
            ],
        ).ddl_if(dialect="postgresql"),
        {"sqlite_with_rowid": False},
    )

    tissue_class: Mapped[str] = mapped_column(String(128), primary_key=True)
    """The tissue class, or :data:`ALL_TISSUE` (``""``) for the slide-level statistics."""
    slide_id: Mapped[int] = mapped_column(
        ForeignKey("slides.id", ondelete="CASCADE"), primary_key=True
    )
    run_id: Mapped[int] = mapped_column(Integer)
    """The run the values come from (the slide's latest succeeded run)."""
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Whether the slide has a QC flag."""
    g0: Mapped[int | None] = mapped_column(Integer)
    """Code (:attr:`MetadataValue.id`) of the slide's value of the key in slot 0."""
    g1: Mapped[int | None] = mapped_column(Integer)
    g2: Mapped[int | None] = mapped_column(Integer)
    g3: Mapped[int | None] = mapped_column(Integer)
    g4: Mapped[int | None] = mapped_column(Integer)
    g5: Mapped[int | None] = mapped_column(Integer)
    g6: Mapped[int | None] = mapped_column(Integer)
    g7: Mapped[int | None] = mapped_column(Integer)
    tissue_area_mm2: Mapped[float | None] = mapped_column(Float)
    nuclei_per_mm2: Mapped[float | None] = mapped_column(Float)
    nucleus_count: Mapped[int | None] = mapped_column(Integer)
    nucleus_area_mean_um2: Mapped[float | None] = mapped_column(Float)
    nucleus_area_median_um2: Mapped[float | None] = mapped_column(Float)
    mean_hematoxylin_od: Mapped[float | None] = mapped_column(Float)
    inflammatory_epithelial_ratio: Mapped[float | None] = mapped_column(Float)
    area_mm2: Mapped[float | None] = mapped_column(Float)
    fraction: Mapped[float | None] = mapped_column(Float)
