"""Validation of the column names of cohort queries (``--by COL``, ``--where COL=V``).

A column is a built-in slide column or a metadata key some slide has. An unknown name is an
error naming it and listing the known ones, instead of an empty or meaningless table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import Engine, Table, exists, select
from sqlalchemy import exc as sa_exc

from slidestream.db._engine import mask_url, scrub_credentials
from slidestream.db._schema import SlideMetadata
from slidestream.errors import ConfigError, DatabaseError

__all__ = ["check_columns", "metadata_keys"]

_META: Table = SlideMetadata.__table__  # type: ignore[assignment]


def metadata_keys(engine: Engine) -> list[str]:
    """The distinct metadata keys of the slides, sorted."""
    try:
        with engine.connect() as conn:
            keys = conn.execute(select(_META.c.key).distinct()).scalars().all()
    except sa_exc.DBAPIError as err:
        raise DatabaseError(
            f"{mask_url(engine.url)}: read failed: {scrub_credentials(str(err.orig), engine.url)}"
            "; check the database server and retry"
        ) from err
    return sorted(str(k) for k in keys)


def _all_known(engine: Engine, columns: set[str]) -> bool:
    """Whether some slide has each of these metadata keys: one index probe per key
    (``ix_slide_metadata_key_value_slide_id``), not the scan of every key that listing the
    known keys costs (0.4 s at 1,000,000 slides on PostgreSQL)."""
    try:
        with engine.connect() as conn:
            probes = [exists().where(_META.c.key == column) for column in sorted(columns)]
            return all(conn.execute(select(*probes)).one())
    except sa_exc.DBAPIError as err:
        raise DatabaseError(
            f"{mask_url(engine.url)}: read failed: {scrub_credentials(str(err.orig), engine.url)}"
            "; check the database server and retry"
        ) from err


def check_columns(
    engine: Engine,
    *,
    builtin: Sequence[str],
    by: Iterable[str] = (),
    where: Iterable[str] = (),
) -> None:
    """Raise when a ``by`` or ``where`` column is neither built in nor a metadata key.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database (schema already checked).
    builtin : sequence of str
        The built-in slide columns.
    by, where : iterable of str
        The grouping and filtering column names.

    Raises
    ------
    ConfigError
        Naming the first unknown column, the option, and every known column.
    """
    asked = [("--by", c) for c in by] + [("--where", c) for c in where]
    unknown = [(opt, c) for opt, c in asked if c not in builtin]
    if not unknown or _all_known(engine, {c for _, c in unknown}):
        return
    keys = metadata_keys(engine)
    for option, column in unknown:
        if column not in keys:
            known = ", ".join([*builtin, *keys])
            hint = "" if keys else " (no metadata imported yet: `slidestream cohort import`)"
            raise ConfigError(f"{option} {column}: no such column; known columns: {known}{hint}")
