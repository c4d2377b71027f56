"""Upgrading a filled version-1 PostgreSQL database keeps its rows; concurrent migrations apply each
step once."""
import pytest

from control_api import migrations
from control_api.db import database_for
from tests.support.migrations import check_schema_matches_models, check_upgrade

pytestmark = pytest.mark.integration


def test_postgres_upgrade_keeps_rows(fresh_pg_url):
    database = database_for(fresh_pg_url)
    try:
        check_upgrade(database)
        assert migrations.migrate(database) == []
    finally:
        database.close_all()


def test_postgres_concurrent_migrations_apply_each_step_once(fresh_pg_url):
    from concurrent.futures import ThreadPoolExecutor

    databases = [database_for(fresh_pg_url) for _ in range(3)]
    try:
        with ThreadPoolExecutor(3) as pool:
            applied = list(pool.map(migrations.migrate, databases))
        assert sorted(v for run in applied for v in run) == list(range(1, migrations.LATEST + 1))
        check_schema_matches_models(databases[0])
    finally:
        for database in databases:
            database.close_all()
