"""Cohort values: the packed per-slide table of cohort queries and the metadata dictionaries.

* ``metadata_keys`` (key, slot): every metadata key; the first 8 (in key order here, then in
  order of first import) get a slot, a code column ``g<slot>`` of ``cohort_values``.
* ``metadata_values`` (id, key, value): every distinct (key, value) pair once; ``id`` is its
  code.
* ``cohort_values``: one row per (scope, slide) of the slide's latest succeeded run (scope
  ``""`` = the slide-level statistics, else a tissue class), with its metrics, the slide's QC
  ``flagged`` state and the codes of its slotted metadata. SQLite: a ``WITHOUT ROWID`` table
  keyed (tissue_class, slide_id); PostgreSQL: the covering index ``ix_cohort_values_scan``
  (tissue_class, flagged, slide_id) INCLUDE (codes, metrics) for index-only scans.

The upgrade fills the three tables from the stored data (set-based ``INSERT ... SELECT``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The columns as of this revision (not imported from the models, which may change).
_SLOTS = tuple(f"g{i}" for i in range(8))
_SLIDE_ONLY = ("tissue_area_mm2",)
_COMMON = (
    "nuclei_per_mm2",
    "nucleus_count",
    "nucleus_area_mean_um2",
    "nucleus_area_median_um2",
    "mean_hematoxylin_od",
    "inflammatory_epithelial_ratio",
)
_CLASS_ONLY = ("area_mm2", "fraction")
_METRICS = (*_SLIDE_ONLY, *_COMMON, *_CLASS_ONLY)


def _backfill() -> None:
    found = op.get_bind().exec_driver_sql("SELECT DISTINCT key FROM slide_metadata")
    keys = sorted(str(row[0]) for row in found)
    if keys:
        op.bulk_insert(
            sa.table("metadata_keys", sa.column("key", sa.String), sa.column("slot", sa.Integer)),
            [{"key": key, "slot": i if i < len(_SLOTS) else None} for i, key in enumerate(keys)],
        )
    op.execute(
        "INSERT INTO metadata_values (key, value) SELECT DISTINCT key, value FROM slide_metadata"
    )
    slotted = keys[: len(_SLOTS)]
    pivot = ", ".join(
        f"max(CASE WHEN m.key = :k{i} THEN v.id END) AS g{i}" for i in range(len(slotted))
    )
    codes = (
        f"LEFT JOIN (SELECT m.slide_id, {pivot} FROM slide_metadata m JOIN metadata_values v "
        "ON v.key = m.key AND v.value = m.value GROUP BY m.slide_id) codes "
        "ON codes.slide_id = s.slide_id"
        if slotted
        else ""
    )
    group_cols = ", ".join(
        f"codes.g{i}" if i < len(slotted) else "NULL" for i in range(len(_SLOTS))
    )
    flags = (
        "LEFT JOIN (SELECT DISTINCT slide_id FROM qc_flags) flagged "
        "ON flagged.slide_id = s.slide_id"
    )
    columns = ", ".join(("tissue_class", "slide_id", "run_id", "flagged", *_SLOTS, *_METRICS))
    slide_metrics = ", ".join(f"s.{m}" if m not in _CLASS_ONLY else "NULL" for m in _METRICS)
    class_metrics = ", ".join(f"s.{m}" if m not in _SLIDE_ONLY else "NULL" for m in _METRICS)
    flagged = "flagged.slide_id IS NOT NULL"
    params = {f"k{i}": key for i, key in enumerate(slotted)}
    for scope, table, metrics in (
        ("''", "slide_statistics", slide_metrics),
        ("s.tissue_class", "class_statistics", class_metrics),
    ):
        statement = (
            f"INSERT INTO cohort_values ({columns}) "
            f"SELECT {scope}, s.slide_id, s.run_id, {flagged}, {group_cols}, {metrics} "
            f"FROM {table} s {flags} {codes} WHERE s.latest"
        )
        op.execute(sa.text(statement).bindparams(**params))


def upgrade() -> None:
    """Create the dictionaries and the packed table, and fill them from the stored data."""
    op.create_table(
        "metadata_keys",
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_metadata_keys")),
        sa.UniqueConstraint("slot", name=op.f("uq_metadata_keys_slot")),
    )
    op.create_table(
        "metadata_values",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("value", sa.String(length=1024), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metadata_values")),
    )
    op.create_index(
        op.f("ix_metadata_values_key_value"), "metadata_values", ["key", "value"], unique=True
    )
    op.create_table(
        "cohort_values",
        sa.Column("tissue_class", sa.String(length=128), nullable=False),
        sa.Column("slide_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("flagged", sa.Boolean(), server_default=sa.false(), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=True) for name in _SLOTS),
        *(
            sa.Column(name, sa.Integer() if name == "nucleus_count" else sa.Float(), nullable=True)
            for name in _METRICS
        ),
        sa.ForeignKeyConstraint(
            ["slide_id"],
            ["slides.id"],
            name=op.f("fk_cohort_values_slide_id_slides"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tissue_class", "slide_id", name=op.f("pk_cohort_values")),
        sqlite_with_rowid=False,
    )
    _backfill()
    op.create_index(op.f("ix_cohort_values_slide_id"), "cohort_values", ["slide_id"])
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(
            "ix_cohort_values_scan",
            "cohort_values",
            ["tissue_class", "flagged", "slide_id"],
            postgresql_include=[*_SLOTS, *_METRICS],
        )


def downgrade() -> None:
    """Drop the packed table and the dictionaries (all copies: no data is lost)."""
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_cohort_values_scan", table_name="cohort_values")
    op.drop_index(op.f("ix_cohort_values_slide_id"), table_name="cohort_values")
    op.drop_table("cohort_values")
    op.drop_index(op.f("ix_metadata_values_key_value"), table_name="metadata_values")
    op.drop_table("metadata_values")
    op.drop_table("metadata_keys")
