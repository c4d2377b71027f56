"""One database proxy for the whole app, bound late from DATABASE_URL (flaskr-style)."""
from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit

from peewee import DatabaseProxy, SqliteDatabase
from playhouse.db_url import connect

db = DatabaseProxy()

# WAL lets gunicorn workers read while one writes; foreign keys make ON DELETE CASCADE work.
SQLITE_PRAGMAS = {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 5000, "synchronous": "normal"}


def database_for(url: str):
    """A peewee Database for `url`, pooled: connections are handed back at the end of each
    request instead of closed. A fresh PostgreSQL connection costs more than most queries here,
    and closing the last SQLite connection checkpoints the WAL on every request.
    PostgreSQL also gets a short connect timeout, so an unreachable server is a quick 503."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    extra = {}
    if parts.scheme in ("postgres", "postgresql"):
        query.setdefault("connect_timeout", "5")
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


def bind(url: str):
    db.initialize(database_for(url))
    return db
