"""A scratch database on the local PostgreSQL server, dropped afterwards."""
from __future__ import annotations

import os
import uuid


class PostgresDatabase:
    """A scratch database on the local PostgreSQL server, dropped afterwards."""

    def __init__(self, admin_url: str | None = None, prefix: str = "clarity_test"):
        self.admin_url = admin_url or os.environ.get(
            "TEST_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
        self.name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        base = self.admin_url.rsplit("/", 1)[0]
        self.url = f"{base}/{self.name}"

    def _admin(self):
        import psycopg2

        conn = psycopg2.connect(self.admin_url, connect_timeout=5)
        conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        return conn

    def create(self) -> "PostgresDatabase":
        self._admin_execute(f'CREATE DATABASE "{self.name}"')
        return self

    def drop(self) -> None:
        self._admin_execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def _admin_execute(self, statement: str) -> None:
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def sql(self, statement: str, params=()) -> list[tuple]:
        """The rows of one statement (none for a write, which is committed)."""
        import psycopg2

        conn = psycopg2.connect(self.url, connect_timeout=5)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(statement, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def __enter__(self):
        return self.create()

    def __exit__(self, *exc):
        self.drop()
