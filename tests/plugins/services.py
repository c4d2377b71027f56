"""Real backing services for integration tests: PostgreSQL and a SeaweedFS S3 server.

PostgreSQL is never skipped: when it is unreachable the tests that need it fail, so CI
cannot go green without having exercised it.
"""
import pytest

from scripts.serving.processes import PostgresDatabase, SeaweedS3


@pytest.fixture(scope="session")
def pg_database():
    """A fresh database on the local PostgreSQL server for this test session."""
    db = PostgresDatabase()
    try:
        db.create()
    except Exception as exc:  # psycopg2.OperationalError and friends
        pytest.fail(f"PostgreSQL is required for this test and is not reachable at {db.admin_url}: {exc}",
                    pytrace=False)
    yield db
    db.drop()


@pytest.fixture(scope="session")
def pg_url(pg_database) -> str:
    return pg_database.url


@pytest.fixture(scope="module")
def scratch_database(request, pg_database):
    """A fresh database on the same server for one test module, named after it (test_faults.py:
    clarity_faults_<hex>), dropped when the module ends."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    db = PostgresDatabase(pg_database.admin_url, prefix=f"clarity_{module}").create()
    yield db
    db.drop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`) on loopback with the bucket created."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start(timeout=60)
    yield server
    server.stop()
