"""A PostgreSQL database of one's own for a test or a benchmark, on the server the tests use."""

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import ProgrammingError


@contextmanager
def scratch_database(admin_url: str, *, prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database named `<prefix>_<random>` on the server of `admin_url`,
    dropped (with its connections) afterwards; yields its URL. For tests and benchmarks."""
    admin = make_url(admin_url).set(drivername="postgresql+psycopg")
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin_engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with admin_engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin.set(database=name).render_as_string(hide_password=False)
        finally:
            _drop(admin_engine, name)
    finally:
        admin_engine.dispose()


def _drop(admin_engine: Engine, name: str, attempts: int = 20) -> None:
    """Drop the database and end its connections. PostgreSQL 15 refuses to end an autovacuum worker
    that happens to be in it ("must be a member of the role whose process is being terminated"):
    that worker is done within moments, so try again."""
    for attempt in range(attempts):
        try:
            with admin_engine.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except ProgrammingError as exc:
            if "pg_signal_backend" not in str(exc.orig) or attempt == attempts - 1:
                raise
            time.sleep(0.25)
