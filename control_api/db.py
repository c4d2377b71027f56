"""One database proxy for the whole app, bound late from DATABASE_URL (flaskr-style)."""
from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit

from peewee import DatabaseProxy, SqliteDatabase
from playhouse.db_url import connect

db = DatabaseProxy()

# WAL lets gunicorn workers read while one writes; foreign keys make ON DELETE CASCADE work.
SQLITE_PRAGMAS = {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 5000, "synchronous": "normal"}


class _Deadline:
    seconds = 10.0


_deadline = _Deadline()


def _wait_with_deadline(conn) -> None:
    """psycopg2's wait callback: libpq runs non-blocking and this waits on its socket, at most
    the deadline per wait. Without it, a query on a connection whose packets are dropped (no
    reset, no answer) blocks its thread for as long as TCP keeps trying (many minutes): a
    hung worker thread instead of a 503."""
    import select

    import psycopg2
    from psycopg2 import extensions

    while True:
        state = conn.poll()
        if state == extensions.POLL_OK:
            return
        if state == extensions.POLL_READ:
            ready = select.select([conn.fileno()], [], [], _deadline.seconds)[0]
        elif state == extensions.POLL_WRITE:
            ready = select.select([], [conn.fileno()], [], _deadline.seconds)[1]
        else:
            raise psycopg2.OperationalError(f"bad state from poll: {state}")
        if not ready:
            # psycopg2 then cancels the query and marks the connection broken (the pool drops it).
            raise psycopg2.OperationalError(f"no answer from the database within {_deadline.seconds:g} s")


def _install_wait_callback() -> None:
    from psycopg2 import extensions

    if extensions.get_wait_callback() is not _wait_with_deadline:
        extensions.set_wait_callback(_wait_with_deadline)


def database_for(url: str, statement_timeout: float = 10.0):
    """A peewee Database for `url`, pooled: connections are handed back at the end of each
    request instead of closed. A fresh PostgreSQL connection costs more than most queries here,
    and closing the last SQLite connection checkpoints the WAL (about 13 ms a request).
    PostgreSQL also gets a short connect timeout, so an unreachable server is a quick 503."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    extra = {}
    if parts.scheme in ("postgres", "postgresql"):
        query.setdefault("connect_timeout", "5")
        # The server stops a statement past the deadline; the client-side deadline
        # (_wait_with_deadline) covers what the server never sees: a network that drops packets.
        extra["options"] = f"-c statement_timeout={int(statement_timeout * 1000)}"
        _deadline.seconds = statement_timeout
        _install_wait_callback()
        parts = parts._replace(scheme="postgresql+pool")
    elif parts.scheme == "sqlite" and parts.path not in ("", "/", "/:memory:"):
        # Pooled connections move between threads, one thread at a time.
        parts = parts._replace(scheme="sqlite+pool")
        extra["check_same_thread"] = False
    if parts.scheme.endswith("+pool"):
        query.setdefault("max_connections", "16")
        query.setdefault("stale_timeout", "300")
    if parts.scheme.startswith("sqlite"):
        extra["pragmas"] = SQLITE_PRAGMAS
    # Rebuilt by hand: urlunsplit drops the empty host of sqlite:///relative/path.
    location = url.split("://", 1)[1].split("?", 1)[0]
    database = connect(f"{parts.scheme}://{location}?{urlencode(query)}", **extra)
    if isinstance(database, SqliteDatabase) and database.database not in ("", ":memory:"):
        os.makedirs(os.path.dirname(os.path.abspath(database.database)), exist_ok=True)
    return database


def bind(url: str, statement_timeout: float = 10.0):
    db.initialize(database_for(url, statement_timeout))
    return db
