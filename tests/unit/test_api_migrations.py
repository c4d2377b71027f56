"""The schema is built by migrations only, and upgrading an old database keeps its rows (SQLite;
PostgreSQL: tests/integration/test_api_migrations_postgres.py)."""
from control_api import migrations
from control_api.db import database_for
from tests.support.migrations import check_upgrade


def test_sqlite_upgrade_keeps_rows(tmp_path):
    database = database_for(f"sqlite:///{tmp_path / 'old.db'}")
    check_upgrade(database)
    assert migrations.migrate(database) == []  # a second run is a no-op
