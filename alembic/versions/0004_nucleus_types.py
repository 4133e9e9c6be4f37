"""Nucleus types: per-type statistics of typing nucleus models.

* ``type_statistics``: one row per (run, tissue class, nucleus type) with the type's count,
  share of the region's nuclei, density per mm² of the region, area mean / median, eccentricity
  mean / median and mean haematoxylin OD; ``tissue_class`` is ``""`` for the whole tissue. A
  ``latest`` flag (kept by ``record_run``, like the other statistics tables) and the covering
  index ``ix_type_statistics_latest`` (tissue_class, nucleus_type, latest, slide_id, metrics).
* ``inflammatory_epithelial_ratio`` on ``slide_statistics`` and ``class_statistics``
  (inflammatory per epithelial nucleus); the covering indexes of both tables are rebuilt with
  it, and ``ix_slide_statistics_by_inflammatory_epithelial_ratio`` sorts the slide list by it.

Existing rows keep their values; the new columns are ``NULL`` and there are no type rows for
runs recorded before (their models had no type head).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The metric columns as of this revision (not imported from the models, which may change).
_COMMON = (
    "nuclei_per_mm2",
    "nucleus_count",
    "nucleus_area_mean_um2",
    "nucleus_area_median_um2",
    "mean_hematoxylin_od",
)
_RATIO = "inflammatory_epithelial_ratio"
_SLIDE_0003 = ("tissue_area_mm2", *_COMMON)
_CLASS_0003 = ("area_mm2", "fraction", *_COMMON)
_TYPE_METRICS = (
    "nuclei_per_mm2",
    "nucleus_count",
    "fraction",
    "nucleus_area_mean_um2",
    "nucleus_area_median_um2",
    "eccentricity_mean",
    "mean_hematoxylin_od",
)


def _covering(slide: Sequence[str], klass: Sequence[str]) -> None:
    op.create_index(
        "ix_slide_statistics_latest", "slide_statistics", ["latest", "slide_id", *slide]
    )
    op.create_index(
        "ix_class_statistics_latest",
        "class_statistics",
        ["tissue_class", "latest", "slide_id", *klass],
    )


def _drop_covering() -> None:
    op.drop_index("ix_slide_statistics_latest", table_name="slide_statistics")
    op.drop_index("ix_class_statistics_latest", table_name="class_statistics")


def upgrade() -> None:
    """Add the per-type table and the ratio columns."""
    for table in ("slide_statistics", "class_statistics"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column(_RATIO, sa.Float(), nullable=True))
    _drop_covering()
    _covering((*_SLIDE_0003, _RATIO), (*_CLASS_0003, _RATIO))
    op.create_index(
        f"ix_slide_statistics_by_{_RATIO}", "slide_statistics", ["latest", _RATIO, "slide_id"]
    )
    op.create_table(
        "type_statistics",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("tissue_class", sa.String(length=128), nullable=False),
        sa.Column("nucleus_type", sa.String(length=64), nullable=False),
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("latest", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("nucleus_count", sa.Integer(), nullable=True),
        sa.Column("fraction", sa.Float(), nullable=True),
        sa.Column("nuclei_per_mm2", sa.Float(), nullable=True),
        sa.Column("nucleus_area_mean_um2", sa.Float(), nullable=True),
        sa.Column("nucleus_area_median_um2", sa.Float(), nullable=True),
        sa.Column("eccentricity_mean", sa.Float(), nullable=True),
        sa.Column("eccentricity_median", sa.Float(), nullable=True),
        sa.Column("mean_hematoxylin_od", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["analysis_runs.id"],
            name=op.f("fk_type_statistics_run_id_analysis_runs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["slide_id"],
            ["slides.id"],
            name=op.f("fk_type_statistics_slide_id_slides"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "run_id", "tissue_class", "nucleus_type", name=op.f("pk_type_statistics")
        ),
    )
    op.create_index(op.f("ix_type_statistics_slide_id"), "type_statistics", ["slide_id"])
    op.create_index(
        "ix_type_statistics_latest",
        "type_statistics",
        ["tissue_class", "nucleus_type", "latest", "slide_id", *_TYPE_METRICS],
    )


def downgrade() -> None:
    """Drop the per-type table and the ratio columns (their values are lost)."""
    op.drop_index("ix_type_statistics_latest", table_name="type_statistics")
    op.drop_index(op.f("ix_type_statistics_slide_id"), table_name="type_statistics")
    op.drop_table("type_statistics")
    op.drop_index(f"ix_slide_statistics_by_{_RATIO}", table_name="slide_statistics")
    _drop_covering()
    for table in ("slide_statistics", "class_statistics"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(_RATIO)
    _covering(_SLIDE_0003, _CLASS_0003)
