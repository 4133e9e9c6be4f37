"""Engines for the statistics database: URL handling, SQLite pragmas, masking credentials.

Two backends are supported: SQLite (a file, the default in the output folder) and PostgreSQL
through psycopg 3 (``postgresql+psycopg://user:password@host/db``) for cohorts shared by
several machines.

SQLite engines are set up for several writing processes: WAL journal, a 30 s busy timeout,
foreign keys on, and write transactions that start with ``BEGIN IMMEDIATE`` (so two writers
never deadlock on a lock upgrade; the second one waits for the busy timeout instead).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ClauseElement, Connection, Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.sql.compiler import SQLCompiler

from slidestream.errors import DatabaseError

__all__ = ["driver_statement", "make_engine", "mask_url", "scrub_credentials", "write_connection"]

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
_WRITE_OPTION = "slidestream_write"


#: Query-string keys whose values are credentials (``?password=...``), masked like the password.
_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "pass", "sslpassword", "secret"})


def _secret_values(parsed: URL) -> list[str]:
    """The credentials of a URL: its password and the values of secret query-string keys."""
    secrets = [str(parsed.password)] if parsed.password else []
    for key, value in parsed.query.items():
        if key.lower() in _SECRET_QUERY_KEYS:
            values = value if isinstance(value, tuple) else (value,)
            secrets += [str(v) for v in values if v]
    return secrets


def mask_url(url: str | URL) -> str:
    """Render a database URL with its password (``user:password@`` or ``?password=``) replaced
    by ``***``.

    Parameters
    ----------
    url : str or sqlalchemy.engine.URL
        A SQLAlchemy database URL.

    Returns
    -------
    str
        The URL, safe for logs and error messages.

    Examples
    --------
    >>> mask_url("postgresql+psycopg://ann:s3cret@db.example/cohort")
    'postgresql+psycopg://ann:***@db.example/cohort'
    >>> mask_url("postgresql+psycopg://ann@db.example/cohort?password=s3cret&sslmode=require")
    'postgresql+psycopg://ann@db.example/cohort?password=***&sslmode=require'
    """
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        return "<unparsable database URL>"
    text = parsed.set(query={}).render_as_string(hide_password=True)
    if not parsed.query:
        return text
    pairs = []
    for key, value in parsed.query.items():
        values = value if isinstance(value, tuple) else (value,)
        secret = key.lower() in _SECRET_QUERY_KEYS
        pairs += [f"{key}={'***' if secret else v}" for v in values]
    return f"{text}?{'&'.join(pairs)}"


def scrub_credentials(text: str, url: str | URL) -> str:
    """Remove the password of ``url`` from ``text`` (e.g. a driver's error message).

    Parameters
    ----------
    text : str
        Any message.
    url : str or sqlalchemy.engine.URL
        The database URL whose password must not appear.

    Returns
    -------
    str
        ``text`` with every occurrence of the password (and of a ``?password=`` value)
        replaced by ``***``, on one line (a driver's multi-line message is joined).
    """
    try:
        secrets = _secret_values(make_url(url))
    except exc.ArgumentError:
        secrets = []
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return " ".join(text.split())


def _parse(url: str | URL) -> URL:
    try:
        return make_url(url)
    except exc.ArgumentError as err:
        raise DatabaseError(
            f"{mask_url(url)}: not a database URL; pass e.g. --db sqlite:///out/slidestream.db "
            "or --db postgresql+psycopg://user@host/dbname"
        ) from err


def make_engine(url: str | URL, **engine_kwargs: Any) -> Engine:
    """Create an engine for a slidestream database (no schema check).

    Parameters
    ----------
    url : str or sqlalchemy.engine.URL
        ``sqlite:///path/to/slidestream.db`` or ``postgresql+psycopg://user@host/dbname``.
        The folder of an SQLite file is created when missing.
    **engine_kwargs
        Passed on to :func:`sqlalchemy.create_engine`.

    Returns
    -------
    sqlalchemy.Engine
        The engine; nothing is connected yet. Dispose of it when done.

    Raises
    ------
    DatabaseError
        The URL cannot be parsed or names an unsupported backend.
    """
    parsed = _parse(url)
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise DatabaseError(
            f"{mask_url(parsed)}: unsupported database backend {backend!r}; "
            "use sqlite:///FILE or postgresql+psycopg://USER@HOST/DB"
        )
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            folder = Path(database).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                in_way = isinstance(err, FileExistsError | NotADirectoryError)
                problem = "a file is in the way" if in_way else (err.strerror or str(err))
                raise DatabaseError(
                    f"{mask_url(parsed)}: cannot create the database folder {folder} "
                    f"({problem}); pass a --db in a folder you can write"
                ) from err
        engine = create_engine(parsed, **engine_kwargs)
        _setup_sqlite(engine)
    else:
        engine_kwargs.setdefault("pool_pre_ping", True)
        engine = create_engine(parsed, **engine_kwargs)
    logger.debug("database engine for %s", mask_url(parsed))
    return engine


def _enable_wal(cursor: Any) -> None:
    """Switch an SQLite database to WAL, waiting while another connection switches it.

    Changing the journal mode needs an exclusive lock and SQLite does not call the busy
    handler for it: two processes opening a fresh database at once made one of them fail with
    "database is locked" (1 start in 8 in ``tests/integration/test_hostile_cli.py``). The
    switch is retried for up to the busy timeout; a database already in WAL is not switched.
    """
    if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            busy = err.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY  # also extended BUSY_*
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _setup_sqlite(engine: Engine) -> None:
    """Install the pragmas and explicit transaction handling of an SQLite engine."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's own transaction handling defers BEGIN
        # and breaks both SAVEPOINTs and transactional DDL).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if engine.url.database not in (None, "", ":memory:"):
                _enable_wal(cursor)
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(_WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


@contextmanager
def write_connection(engine: Engine) -> Iterator[Connection]:
    """Open a connection inside one write transaction (committed on success).

    On SQLite the transaction starts with ``BEGIN IMMEDIATE``, taking the write lock at once.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        An engine made by :func:`make_engine`.

    Yields
    ------
    sqlalchemy.Connection
        The connection, inside its transaction.
    """
    with engine.connect().execution_options(**{_WRITE_OPTION: True}) as conn, conn.begin():
        yield conn


def driver_statement(conn: Connection, stmt: ClauseElement) -> tuple[str, Any]:
    """A statement as the SQL text and parameters its driver executes, for a raw DBAPI cursor.

    For reads that bypass SQLAlchemy's result rows (binary results, server-side cursors, plain
    tuples). Expanding ``IN`` parameters are rendered.

    Parameters
    ----------
    conn : sqlalchemy.Connection
        The connection whose dialect compiles the statement.
    stmt : sqlalchemy.ClauseElement
        The statement.

    Returns
    -------
    (str, dict or tuple)
        The SQL and its parameters: a mapping for named styles (psycopg), a tuple in order for
        positional ones (sqlite3).
    """
    compiled = cast(
        SQLCompiler,
        stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True}),
    )
    params: Any = compiled.params
    if compiled.positiontup is not None:
        params = tuple(params[name] for name in compiled.positiontup)
    return str(compiled), params
