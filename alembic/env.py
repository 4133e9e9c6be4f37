"""Alembic environment of slidestream (shipped as ``slidestream.migrations``).

Run through :mod:`slidestream.db` (``slidestream db upgrade``), which configures Alembic in code
and passes an open connection in ``config.attributes["connection"]``. Run by the ``alembic``
command instead, the URL comes from the ``sqlalchemy.url`` main option. SQLite migrations run in
batch mode (``render_as_batch``); on PostgreSQL a transaction-level advisory lock serialises
concurrent upgrades (several ``slidestream run`` processes creating a fresh database).
"""

from __future__ import annotations

import logging.config

from sqlalchemy import Connection, engine_from_config, pool, text

from alembic import context
from slidestream.db._schema import Base

# An arbitrary constant: the advisory lock id of slidestream migrations.
_PG_MIGRATION_LOCK = 0x51DE57EA

config = context.config
target_metadata = Base.metadata

# Configure logging only when the application has not (Optuna's rule).
if config.config_file_name is not None and not logging.getLogger().handlers:
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # SQLite's DDL is transactional too: one transaction for the whole upgrade, so the
        # write lock (BEGIN IMMEDIATE) is held from the first revision to the last, and a
        # concurrent creator waits for head instead of starting on a half-done schema (with
        # Alembic's default of one commit per revision it could slip in between two).
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
            )
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the migration SQL without a database (``alembic upgrade --sql``)."""
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=bool(url and url.startswith("sqlite")),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the given connection, or on a new one from ``sqlalchemy.url``."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as conn:
        _run(conn)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
