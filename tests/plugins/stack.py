"""A whole private stack per test module (tests.support.harness.PrivateStack: gunicorn, TorchServe,
S3, a scratch PostgreSQL database).

When a module's stacks stop, every log they wrote is searched for the PHI markers: a leak
fails that module's teardown, so each module that uses a stack checks its own logs.
"""
from __future__ import annotations

import pytest

from scripts.serving.processes import PostgresDatabase
from tests.support.harness import PrivateStack, TcpProxy, phi_in


@pytest.fixture(scope="module")
def make_stack(request, tmp_path_factory, model_store):
    """make_stack(shared_torchserve=True, shared_s3=True, database=None, api_env=None, workers=2)
    -> a started PrivateStack, stopped when the module ends.

    Shared services are the session's `torchserve` and `s3_server`: a module that kills or
    stops one asks for its own. PostgreSQL is a scratch database on the local server; its
    absence fails (never skips) the module.
    """
    started: list[PrivateStack] = []

    def start(*, shared_torchserve: bool = True, shared_s3: bool = True, database: PostgresDatabase | None = None,
              api_env: dict | None = None, workers: int = 2, name: str = "stack") -> PrivateStack:
        stack = PrivateStack(
            tmp_path_factory.mktemp(name), model_store,
            torchserve=request.getfixturevalue("torchserve") if shared_torchserve else None,
            s3=request.getfixturevalue("s3_server") if shared_s3 else None,
            database=database, api_env=api_env, workers=workers)
        started.append(stack)
        return stack.start()

    yield start
    logs = []
    for stack in started:
        logs += stack.log_files()
        stack.stop()
    leaks = phi_in(logs)
    assert not leaks, "PHI markers in the logs:\n" + "\n".join(leaks[:20])


@pytest.fixture(scope="module")
def pg_proxy():
    """A TcpProxy to the local PostgreSQL server for one test module: a stack whose DATABASE_URL
    is `pg_proxy.url_through(scratch_database.url)` can be cut off from the database."""
    proxy = TcpProxy().up()
    yield proxy
    proxy.down()
