"""One database proxy for the whole app, bound late from DATABASE_URL (flaskr-style)."""
from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from peewee import DatabaseProxy, SqliteDatabase
from playhouse.db_url import connect

db = DatabaseProxy()

# WAL lets gunicorn workers read while one writes; foreign keys make ON DELETE CASCADE work.
SQLITE_PRAGMAS = {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 5000, "synchronous": "normal"}


def database_for(url: str):
    """A peewee Database for `url`. PostgreSQL gets a connection pool: a fresh connection per
    request costs more than most queries here, and a short connect timeout so an unreachable
    server turns into a quick 503 rather than a hung worker."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        query = dict(parse_qsl(parts.query))
        query.setdefault("connect_timeout", "5")
        query.setdefault("max_connections", "16")
        query.setdefault("stale_timeout", "300")
        url = urlunsplit(parts._replace(scheme="postgresql+pool", query=urlencode(query)))
    database = connect(url, **({"pragmas": SQLITE_PRAGMAS} if parts.scheme.startswith("sqlite") else {}))
    if isinstance(database, SqliteDatabase) and database.database not in ("", ":memory:"):
        os.makedirs(os.path.dirname(os.path.abspath(database.database)), exist_ok=True)
    return database


def bind(url: str):
    db.initialize(database_for(url))
    return db
