"""Schema migrations: Alembic configured in code, and the schema-version check.

The migration scripts ship inside the package as ``slidestream.migrations`` (the repository's
``alembic/`` folder). Alembic is configured programmatically (no ``alembic.ini`` is read) and
runs on a connection handed to ``env.py`` through ``Config.attributes["connection"]``.

A *fresh* database (none of our tables and no revision recorded) may be created by
:func:`open_database` with ``create=True``: it runs ``upgrade head``, the same code path as
``slidestream db upgrade``. Any other database must already be at the head revision; otherwise
:class:`~slidestream.errors.SchemaVersionError` names the command that fixes it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import logging
import time
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL

from alembic import command
from slidestream.db._engine import make_engine, mask_url, scrub_credentials
from slidestream.db._schema import Base
from slidestream.errors import DatabaseError, SchemaVersionError

__all__ = [
    "alembic_config",
    "check_schema",
    "connect",
    "current_revision",
    "downgrade",
    "head_revision",
    "migrations_dir",
    "open_database",
    "upgrade",
]

logger = logging.getLogger(__name__)


@functools.cache
def migrations_dir() -> Path:
    """Folder of the Alembic environment (``env.py``, ``versions/``).

    Returns
    -------
    pathlib.Path
        ``slidestream/migrations`` of the installed package. In a development checkout
        installed in editable mode (where setuptools cannot import a namespace subpackage of a
        regular package) it is the repository's ``alembic/`` folder beside ``db/``.

    Raises
    ------
    DatabaseError
        The migration scripts are not installed.
    """
    candidates: list[Path] = []
    with contextlib.suppress(ModuleNotFoundError):
        # A namespace package: files() gives a MultiplexedPath; joining a file name gives the
        # real file (a pathlib.Path for an installed wheel; Alembic needs a real folder).
        env = importlib.resources.files("slidestream.migrations").joinpath("env.py")
        if isinstance(env, Path):
            candidates.append(env.parent)
    candidates.append(Path(__file__).resolve().parent.parent / "alembic")
    for candidate in candidates:
        if (candidate / "env.py").is_file() and (candidate / "versions").is_dir():
            return candidate
    raise DatabaseError(
        "slidestream.migrations: Alembic migration scripts not found in the installed package; "
        "reinstall slidestream"
    )


def alembic_config(connection: Connection | None = None) -> Config:
    """Build the Alembic configuration of slidestream (no ``alembic.ini`` needed).

    Parameters
    ----------
    connection : sqlalchemy.Connection, optional
        The connection ``env.py`` runs the migrations on.

    Returns
    -------
    alembic.config.Config
        With ``script_location`` set to :func:`migrations_dir`.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head_revision() -> str:
    """The revision this slidestream's code needs (the single head of the migrations).

    Returns
    -------
    str
        The revision identifier, e.g. ``"0002"``.
    """
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise DatabaseError("slidestream.migrations: no migration found; reinstall slidestream")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision a database is at.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database.

    Returns
    -------
    str or None
        ``None`` when the database has never been migrated.
    """
    with _connection(engine) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate a database up to ``revision`` (creating the schema on an empty database).

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database.
    revision : str
        Target revision; ``"head"`` (default) is what this slidestream needs.
    """
    with _connection(engine, write=True) as conn:
        command.upgrade(alembic_config(conn), revision)
        conn.commit()
    logger.info("database %s upgraded to %s", mask_url(engine.url), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate a database down to ``revision`` (``"base"`` drops every slidestream table).

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database.
    revision : str
        Target revision, e.g. ``"-1"``, ``"0001"`` or ``"base"``.
    """
    with _connection(engine, write=True) as conn:
        command.downgrade(alembic_config(conn), revision)
        conn.commit()
    logger.info("database %s downgraded to %s", mask_url(engine.url), revision)


def _is_fresh(conn: Connection) -> bool:
    """No slidestream table, and no revision recorded (a database downgraded to base is)."""
    tables = set(inspect(conn).get_table_names())
    if tables & set(Base.metadata.tables):
        return False
    return MigrationContext.configure(conn).get_current_revision() is None


def check_schema(engine: Engine) -> None:
    """Make sure a database is at the revision this slidestream needs.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The database.

    Raises
    ------
    SchemaVersionError
        The database is at another revision (or was never migrated); the message names the
        ``slidestream db upgrade`` command, with the password of the URL masked.
    DatabaseError
        The database cannot be reached.
    """
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        raise SchemaVersionError(
            f"{mask_url(engine.url)}: database at revision {current or '<none>'}, this "
            f"slidestream needs {head}; run `slidestream db upgrade --db {mask_url(engine.url)}`"
        )


def open_database(url: str | URL, *, create: bool = False, **engine_kwargs: Any) -> Engine:
    """Connect to a slidestream database and check its schema version.

    Parameters
    ----------
    url : str or sqlalchemy.engine.URL
        Database URL (see :func:`connect`).
    create : bool
        Create the schema (``upgrade head``) when the database is fresh: no slidestream tables
        and no revision recorded. ``slidestream run`` passes ``True``; queries do not.
    **engine_kwargs
        Passed on to :func:`sqlalchemy.create_engine`.

    Returns
    -------
    sqlalchemy.Engine
        An engine on a database at the head revision. Dispose of it when done.

    Raises
    ------
    SchemaVersionError
        The database is not at the head revision (and not fresh, or ``create`` is false).
    DatabaseError
        The database cannot be reached.
    """
    engine = make_engine(url, **engine_kwargs)
    database = engine.url.database
    if (
        not create
        and engine.url.get_backend_name() == "sqlite"
        and database not in (None, "", ":memory:")
        and not str(database).startswith("file:")
        and not Path(str(database)).expanduser().exists()
    ):
        engine.dispose()
        raise DatabaseError(
            f"{mask_url(engine.url)}: no such database file; pass the --db of an existing "
            "database, or create one with `slidestream run` or `slidestream db upgrade`"
        )
    try:
        if create:
            with _connection(engine) as conn:
                fresh = _is_fresh(conn)
            if fresh:
                logger.info("creating the slidestream schema in %s", mask_url(engine.url))
                upgrade(engine)
            else:
                _wait_for_concurrent_creation(engine)
        check_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _wait_for_concurrent_creation(
    engine: Engine, *, settle_s: float = 1.0, timeout_s: float = 60.0
) -> None:
    """Wait while another process is still migrating a database it has just created.

    Migrations commit one revision at a time on some backends (SQLite DDL), so a second writer
    can see a half-created schema. While the recorded revision keeps moving towards head we
    wait; a revision that stays put for ``settle_s`` is final (and checked by the caller).
    """
    head = head_revision()
    deadline = time.monotonic() + timeout_s
    seen = current_revision(engine)
    stable_since = time.monotonic()
    while seen != head and time.monotonic() < deadline:
        time.sleep(0.1)
        now = current_revision(engine)
        if now != seen:
            seen, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= settle_s:
            return


class _connection:  # noqa: N801 - used like a function
    """Context manager: a connection whose connection errors become ``DatabaseError``."""

    def __init__(self, engine: Engine, *, write: bool = False) -> None:
        self._engine = engine
        self._write = write
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        url = self._engine.url
        try:
            conn = self._engine.connect()
        except sa_exc.OperationalError as err:
            raise DatabaseError(
                f"{mask_url(url)}: cannot connect to the database: "
                f"{scrub_credentials(str(err.orig), url)}; check the URL "
                "and that the server is running"
            ) from err
        except sa_exc.DBAPIError as err:  # e.g. SQLite: "file is not a database"
            raise DatabaseError(
                f"{mask_url(url)}: cannot open the database: "
                f"{scrub_credentials(str(err.orig), url)}; pass the --db of a slidestream "
                "database (sqlite:///FILE or postgresql+psycopg://USER@HOST/DB)"
            ) from err
        if self._write:
            conn.execution_options(slidestream_write=True)
        self._conn = conn
        return conn

    def __exit__(self, *exc_info: object) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def connect(url: str | URL, *, create: bool = False, **engine_kwargs: Any) -> Engine:
    """Create an engine for a slidestream database.

    Parameters
    ----------
    url : str or sqlalchemy.engine.URL
        ``sqlite:///path/to/slidestream.db`` (its folder is created when missing) or
        ``postgresql+psycopg://user@host/dbname``.
    create : bool
        ``False`` (default): only build the engine; nothing is connected or checked (the
        writing and query functions check the schema version themselves). ``True``: as
        :func:`open_database` with ``create=True``, i.e. create the schema of a fresh database
        and check the revision.
    **engine_kwargs
        Passed on to :func:`sqlalchemy.create_engine`.

    Returns
    -------
    sqlalchemy.Engine
        The engine. Dispose of it when done.

    Raises
    ------
    DatabaseError
        The URL cannot be parsed or names an unsupported backend (and, with ``create``, the
        errors of :func:`open_database`).
    """
    if create:
        return open_database(url, create=True, **engine_kwargs)
    return make_engine(url, **engine_kwargs)
