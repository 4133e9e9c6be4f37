"""Initial schema: slides, analysis runs, slide and per-class statistics.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TZ = sa.DateTime(timezone=True)


def _stat_columns() -> list[sa.Column[float] | sa.Column[int]]:
    return [
        sa.Column("nucleus_count", sa.Integer(), nullable=True),
        sa.Column("nuclei_per_mm2", sa.Float(), nullable=True),
        sa.Column("nucleus_area_mean_um2", sa.Float(), nullable=True),
        sa.Column("nucleus_area_median_um2", sa.Float(), nullable=True),
        sa.Column("nucleus_area_q1_um2", sa.Float(), nullable=True),
        sa.Column("nucleus_area_q3_um2", sa.Float(), nullable=True),
        sa.Column("mean_hematoxylin_od", sa.Float(), nullable=True),
    ]


def upgrade() -> None:
    """Upgrade the schema."""
    op.create_table(
        "slides",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=128), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("name", sa.String(length=512), nullable=False),
        sa.Column("vendor", sa.String(length=64), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("mpp_x", sa.Float(), nullable=True),
        sa.Column("mpp_y", sa.Float(), nullable=True),
        sa.Column("objective_power", sa.Float(), nullable=True),
        sa.Column("first_seen", _TZ, nullable=False),
        sa.Column("last_seen", _TZ, nullable=False),
        sa.Column("latest_run_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_slides")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_slides_fingerprint")),
    )
    op.create_index(op.f("ix_slides_name"), "slides", ["name"], unique=False)
    op.create_index(op.f("ix_slides_latest_run_id"), "slides", ["latest_run_id"], unique=False)
    op.create_table(
        "analysis_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("slide_id", sa.Integer(), nullable=True),
        sa.Column("slide_path", sa.Text(), nullable=False),
        sa.Column("slide_name", sa.String(length=512), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("parameters_hash", sa.String(length=64), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("success_key", sa.String(length=64), nullable=True),
        sa.Column("software_version", sa.String(length=64), nullable=False),
        sa.Column("started_at", _TZ, nullable=True),
        sa.Column("finished_at", _TZ, nullable=True),
        sa.Column("recorded_at", _TZ, nullable=False),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'failed', 'skipped')",
            name=op.f("ck_analysis_runs_status"),
        ),
        sa.ForeignKeyConstraint(
            ["slide_id"],
            ["slides.id"],
            name=op.f("fk_analysis_runs_slide_id_slides"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analysis_runs")),
        sa.UniqueConstraint("success_key", name=op.f("uq_analysis_runs_success_key")),
    )
    op.create_index(
        op.f("ix_analysis_runs_slide_id_status_id"),
        "analysis_runs",
        ["slide_id", "status", "id"],
        unique=False,
    )
    op.create_table(
        "slide_statistics",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("tissue_area_mm2", sa.Float(), nullable=True),
        *_stat_columns(),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["analysis_runs.id"],
            name=op.f("fk_slide_statistics_run_id_analysis_runs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["slide_id"],
            ["slides.id"],
            name=op.f("fk_slide_statistics_slide_id_slides"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_slide_statistics")),
    )
    op.create_index(
        op.f("ix_slide_statistics_slide_id"), "slide_statistics", ["slide_id"], unique=False
    )
    op.create_table(
        "class_statistics",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("tissue_class", sa.String(length=128), nullable=False),
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("area_mm2", sa.Float(), nullable=True),
        sa.Column("fraction", sa.Float(), nullable=True),
        *_stat_columns(),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["analysis_runs.id"],
            name=op.f("fk_class_statistics_run_id_analysis_runs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["slide_id"],
            ["slides.id"],
            name=op.f("fk_class_statistics_slide_id_slides"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "tissue_class", name=op.f("pk_class_statistics")),
    )
    op.create_index(
        op.f("ix_class_statistics_slide_id"), "class_statistics", ["slide_id"], unique=False
    )
    op.create_index(
        op.f("ix_class_statistics_tissue_class_run_id"),
        "class_statistics",
        ["tissue_class", "run_id"],
        unique=False,
    )


def downgrade() -> None:
    """Downgrade the schema (drops every table of this revision)."""
    op.drop_index(op.f("ix_class_statistics_tissue_class_run_id"), table_name="class_statistics")
    op.drop_index(op.f("ix_class_statistics_slide_id"), table_name="class_statistics")
    op.drop_table("class_statistics")
    op.drop_index(op.f("ix_slide_statistics_slide_id"), table_name="slide_statistics")
    op.drop_table("slide_statistics")
    op.drop_index(op.f("ix_analysis_runs_slide_id_status_id"), table_name="analysis_runs")
    op.drop_table("analysis_runs")
    op.drop_index(op.f("ix_slides_latest_run_id"), table_name="slides")
    op.drop_index(op.f("ix_slides_name"), table_name="slides")
    op.drop_table("slides")
