"""Cohort scale: ``latest`` flags on the statistics rows, covering and sort indexes.

* ``slide_statistics.latest`` and ``class_statistics.latest``: true on the rows of the slide's
  latest succeeded run (``slides.latest_run_id``), kept by ``record_run`` from now on; set here
  for the rows already stored.
* Covering indexes for cohort queries: ``ix_slide_statistics_latest`` (latest, slide_id,
  metrics), ``ix_class_statistics_latest`` (tissue_class, latest, slide_id, metrics; replaces
  ``ix_class_statistics_tissue_class_run_id``) and ``ix_slide_metadata_key_slide_id_value``
  (the value of a key per slide).
* PostgreSQL only: extended statistics ``st_slide_metadata_key_value`` (most common
  (key, value) pairs), so the planner knows how many slides a metadata filter keeps (without
  them it multiplies the selectivities of ``key`` and ``value`` and picks nested loops for
  filters that keep half the cohort).
* The slide list: ``ix_slides_name_id`` (replaces ``ix_slides_name``) and one
  ``ix_slide_statistics_by_<metric>`` (latest, metric, slide_id) per slide metric, for sorted,
  keyset-paginated pages.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
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
_SLIDE_METRICS = ("tissue_area_mm2", *_COMMON)
_CLASS_METRICS = ("area_mm2", "fraction", *_COMMON)


def upgrade() -> None:
    """Upgrade the schema (and set ``latest`` on the stored statistics)."""
    for table in ("slide_statistics", "class_statistics"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("latest", sa.Boolean(), server_default=sa.false(), nullable=False)
            )
        op.execute(
            f"UPDATE {table} SET latest = true "
            f"WHERE run_id IN (SELECT latest_run_id FROM slides WHERE latest_run_id IS NOT NULL)"
        )
    op.drop_index("ix_class_statistics_tissue_class_run_id", table_name="class_statistics")
    op.create_index(
        "ix_class_statistics_latest",
        "class_statistics",
        ["tissue_class", "latest", "slide_id", *_CLASS_METRICS],
    )
    op.create_index(
        "ix_slide_statistics_latest", "slide_statistics", ["latest", "slide_id", *_SLIDE_METRICS]
    )
    for column in _SLIDE_METRICS:
        op.create_index(
            f"ix_slide_statistics_by_{column}", "slide_statistics", ["latest", column, "slide_id"]
        )
    op.create_index(
        op.f("ix_slide_metadata_key_slide_id_value"), "slide_metadata", ["key", "slide_id", "value"]
    )
    op.drop_index("ix_slides_name", table_name="slides")
    op.create_index(op.f("ix_slides_name_id"), "slides", ["name", "id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE STATISTICS st_slide_metadata_key_value (mcv, dependencies) "
            "ON key, value FROM slide_metadata"
        )


def downgrade() -> None:
    """Downgrade the schema (the ``latest`` flags are dropped; the pointer stays)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP STATISTICS IF EXISTS st_slide_metadata_key_value")
    op.drop_index(op.f("ix_slides_name_id"), table_name="slides")
    op.create_index("ix_slides_name", "slides", ["name"])
    op.drop_index(op.f("ix_slide_metadata_key_slide_id_value"), table_name="slide_metadata")
    for column in _SLIDE_METRICS:
        op.drop_index(f"ix_slide_statistics_by_{column}", table_name="slide_statistics")
    op.drop_index("ix_slide_statistics_latest", table_name="slide_statistics")
    op.drop_index("ix_class_statistics_latest", table_name="class_statistics")
    op.create_index(
        "ix_class_statistics_tissue_class_run_id", "class_statistics", ["tissue_class", "run_id"]
    )
    for table in ("slide_statistics", "class_statistics"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("latest")
