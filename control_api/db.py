"""One database proxy for the whole app, bound late from DATABASE_URL (flaskr-style)."""
from __future__ import annotations

import os
import threading
from urllib.parse import parse_qsl, urlencode, urlsplit

from peewee import DatabaseProxy, OperationalError, SqliteDatabase
from playhouse.db_url import connect, register_database
from playhouse.pool import PooledPostgresqlDatabase

db = DatabaseProxy()

# WAL lets gunicorn workers read while one writes; foreign keys make ON DELETE CASCADE work.
SQLITE_PRAGMAS = {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 5000, "synchronous": "normal"}


class _Deadline(threading.local):
    seconds = 10.0  # class attribute: one deadline for the process
    expired = False  # per thread: the last wait of this thread ran out


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
            _deadline.expired = True
            raise psycopg2.OperationalError(f"no answer from the database within {_deadline.seconds:g} s")


class _DeadlinePool(PooledPostgresqlDatabase):
    """peewee's pool pings each idle connection it hands out (SELECT 1) and, when the ping fails,
    tries the next one and then a new connection. With packets dropped each of those waits out
    the whole deadline, so one request would wait (idle connections + 1) deadlines. A ping that
    ran out of time means the network is gone: fail the request now (503) instead; the other
    idle connections are pinged by the requests after it, one each."""

    def _is_closed(self, conn):
        _deadline.expired = False
        closed = super()._is_closed(conn)
        if closed and _deadline.expired:
            conn.close()
            raise OperationalError(f"no answer from the database within {_deadline.seconds:g} s")
        return closed


register_database(_DeadlinePool, "postgresql+deadline")


def _install_wait_callback() -> None:
    from psycopg2 import extensions

    if extensions.get_wait_callback() is not _wait_with_deadline:
        extensions.set_wait_callback(_wait_with_deadline)


def database_for(url: str, statement_timeout: float = 10.0):
    """A peewee Database for `url`, pooled: connections are handed back at the end of each
    request instead of closed. A fresh PostgreSQL connection costs more than most queries here,
    and closing the last SQLite connection checkpoints the WAL on every request.
    PostgreSQL waits at most `statement_timeout` for any answer, connecting included (settings:
    at most half of TorchServe's timeout), so an unreachable or black-holed server is a 503
    within the window a request waiting on TorchServe gets its answer in."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    extra = {}
    if parts.scheme in ("postgres", "postgresql"):
        query.setdefault("connect_timeout", str(max(1, min(5, int(statement_timeout)))))
        # The server stops a statement past the deadline; the client-side deadline
        # (_wait_with_deadline) covers what the server never sees: a network that drops packets.
        extra["options"] = f"-c statement_timeout={int(statement_timeout * 1000)}"
        _Deadline.seconds = statement_timeout  # for every thread (the instance is per thread)
        _install_wait_callback()
        parts = parts._replace(scheme="postgresql+deadline")
    elif parts.scheme == "sqlite" and parts.path not in ("", "/", "/:memory:"):
        # Pooled connections move between threads, one thread at a time.
        parts = parts._replace(scheme="sqlite+pool")
        extra["check_same_thread"] = False
    if parts.scheme.endswith(("+pool", "+deadline")):
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
