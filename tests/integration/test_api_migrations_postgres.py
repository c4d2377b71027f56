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


def test_a_step_gives_up_behind_a_long_transaction_instead_of_queueing_everyone(fresh_pg_url):
    """Issue 15 (smaller findings): a step waits at most lock_timeout (5 s) for its table locks.
    Queued behind a long transaction, its own lock request would otherwise queue every request
    of the API behind it, for as long as that transaction lasts. It fails, nothing of it stays,
    and it applies once the transaction is over."""
    import time

    import peewee
    import psycopg2

    database = database_for(fresh_pg_url)
    blocker = psycopg2.connect(fresh_pg_url)
    try:
        migrations.migrate(database, target=4)
        with blocker.cursor() as cur:  # what an open write transaction on screening holds
            cur.execute("LOCK TABLE screening IN ROW EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(peewee.OperationalError, match="lock timeout"):
            migrations.migrate(database, target=5)  # its foreign key to screening needs a conflicting lock
        assert 4 < time.monotonic() - started < 30
        assert migrations.current_version(database) == 4
        blocker.rollback()
        assert migrations.migrate(database, target=5) == [5]
    finally:
        blocker.close()
        database.close_all()
