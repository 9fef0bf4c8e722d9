"""Database fixtures: every registry and API test runs on SQLite and on a real PostgreSQL.

PostgreSQL comes from `scripts/services.sh postgres` (make test and .ci/run start it); its URL is read
from DIREDI_TEST_POSTGRES_URL. Each test session migrates a database of its own once per backend, and
each test starts from empty tables.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from cloud.registry import migrate
from cloud.registry.db import make_engine, session_factory
from cloud.registry.tables import Base
from testsupport.postgres import scratch_database

BACKENDS = ["sqlite", "postgresql"]
POSTGRES_ENV = "DIREDI_TEST_POSTGRES_URL"


def postgres_admin_url() -> str:
    """The URL of the test PostgreSQL server, or a skip telling how to start it."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set: run scripts/services.sh postgres (make test does)")
    return url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test session, dropped afterwards."""
    with scratch_database(postgres_admin_url(), prefix="diredi_test") as url:
        yield url


def backend_url(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A database URL of the given backend, fresh for this test session."""
    if backend == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    path: Path = tmp_path_factory.mktemp("sqlite") / "registry.db"
    return f"sqlite:///{path}"


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """An engine on a database migrated to head, once per backend and session."""
    engine = make_engine(backend_url(request.param, request, tmp_path_factory))
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(migrated_engine: Engine) -> Iterator[Engine]:
    """The migrated engine, with every table emptied after the test."""
    yield migrated_engine
    with migrated_engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    """A session factory on the test database."""
    return session_factory(engine)


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One session on the test database; the test commits what it needs."""
    with sessions() as s:
        yield s
