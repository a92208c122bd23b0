"""Database URLs and SQLAlchemy engines for the two supported databases.

SQLite: a file in WAL mode with ``synchronous=NORMAL`` (a commit is durable against a
process crash, and only the last transactions may be lost on power loss), a busy
timeout, and foreign keys on. Transactions are begun by hand (the sqlite3 module's own
handling breaks SAVEPOINTs): ``BEGIN IMMEDIATE`` on the writer, so that it takes the
write lock up front instead of failing to upgrade a read lock, plain ``BEGIN`` on
readers, which then read one snapshot per transaction.

PostgreSQL through psycopg 3. Readers use REPEATABLE READ so that a run, its attempts
and its events are read from one snapshot; read-only transactions never fail at that
level. The writer stays at READ COMMITTED.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.pool import ConnectionPoolEntry

from gyoza.server.store.rows import json_serializer

SQLITE_BUSY_TIMEOUT_MS = 10_000


def normalize_url(url: str) -> URL:
    """Parse a store URL; PostgreSQL URLs without a driver get psycopg 3.

    Raises
    ------
    ValueError
        For an unsupported database, or an in-memory SQLite database (several
        connections could not share it; use ``InMemoryStore``).
    """
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError and friends
        raise ValueError(f"not a database URL: {url!r}") from exc
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        if parsed.get_driver_name() != "psycopg":
            raise ValueError(f"PostgreSQL is supported through psycopg 3 only, not {url!r}")
        return parsed
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or (parsed.database or "").startswith(
            "file::memory:"
        ):
            raise ValueError("an in-memory SQLite store is not supported; use InMemoryStore")
        return parsed
    raise ValueError(f"unsupported database {backend!r} in {url!r}: use sqlite or postgresql")


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def create_engines(url: URL, *, readers: int) -> tuple[Engine, Engine]:
    """The writer's engine (one connection) and the readers' engine (*readers* of them)."""
    if is_sqlite(url):
        database = Path(url.database or "")
        database.parent.mkdir(parents=True, exist_ok=True)
        writer = create_engine(url, pool_size=1, max_overflow=1, json_serializer=json_serializer)
        reader = create_engine(
            url, pool_size=readers, max_overflow=readers, json_serializer=json_serializer
        )
        _configure_sqlite(writer, begin="BEGIN IMMEDIATE")
        _configure_sqlite(reader, begin="BEGIN")
        return writer, reader
    writer = create_engine(
        url, pool_size=1, max_overflow=1, pool_pre_ping=True, json_serializer=json_serializer
    )
    reader = create_engine(
        url,
        pool_size=readers,
        max_overflow=readers,
        pool_pre_ping=True,
        json_serializer=json_serializer,
        isolation_level="REPEATABLE READ",
    )
    return writer, reader


def _configure_sqlite(engine: Engine, *, begin: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Autocommit at the driver level: SQLAlchemy's "begin" below starts transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)
