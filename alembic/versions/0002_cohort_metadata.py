"""Cohort metadata (per slide and per patient) and QC flags.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade the schema."""
    op.create_table(
        "slide_metadata",
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("value", sa.String(length=1024), nullable=False),
        sa.ForeignKeyConstraint(
            ["slide_id"],
            ["slides.id"],
            name=op.f("fk_slide_metadata_slide_id_slides"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("slide_id", "key", name=op.f("pk_slide_metadata")),
    )
    op.create_index(
        op.f("ix_slide_metadata_key_value_slide_id"),
        "slide_metadata",
        ["key", "value", "slide_id"],
        unique=False,
    )
    op.create_table(
        "patient_metadata",
        sa.Column("patient_id", sa.String(length=256), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("value", sa.String(length=1024), nullable=False),
        sa.PrimaryKeyConstraint("patient_id", "key", name=op.f("pk_patient_metadata")),
    )
    op.create_table(
        "qc_flags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("flag", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["slide_id"],
            ["slides.id"],
            name=op.f("fk_qc_flags_slide_id_slides"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_qc_flags")),
    )
    op.create_index(
        op.f("ix_qc_flags_slide_id_flag"), "qc_flags", ["slide_id", "flag"], unique=True
    )


def downgrade() -> None:
    """Downgrade the schema."""
    op.drop_index(op.f("ix_qc_flags_slide_id_flag"), table_name="qc_flags")
    op.drop_table("qc_flags")
    op.drop_table("patient_metadata")
    op.drop_index(op.f("ix_slide_metadata_key_value_slide_id"), table_name="slide_metadata")
    op.drop_table("slide_metadata")
