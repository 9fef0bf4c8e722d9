"""Engines and sessions for the registry, the same code on SQLite (embedded) and PostgreSQL (production)."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from cloud.filemodes import check_registry_file, private_dir, private_file


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite gets foreign keys, WAL and a busy timeout, PostgreSQL a sized pool."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            database = Path(parsed.database)
            private_file(private_dir(database.parent) / database.name)
            check_registry_file(database)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    kwargs.setdefault("pool_pre_ping", False)
    kwargs.setdefault("json_deserializer", orjson.loads)
    return create_engine(url, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded rows readable after commit (the API serialises after committing)."""
    return sessionmaker(engine, expire_on_commit=False)


def async_reader_factory(url: str, *, pool_size: int = 32) -> async_sessionmaker[AsyncSession]:
    """Asynchronous sessions for reads, on an engine of their own whose statements each commit on
    their own: a read costs no BEGIN/ROLLBACK round trips and no thread hop (the API serves GETs on
    its event loop and calls the same sync registry functions through `AsyncSession.run_sync`).

    A session holds its connection for the whole request, so the pool keeps `pool_size` connections
    open: with fewer than the requests in flight, the overflow would be connected and closed again on
    every request (a new PostgreSQL backend each time).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(
            parsed.set(drivername="sqlite+aiosqlite"),
            isolation_level="AUTOCOMMIT",
            connect_args={"timeout": 30},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        engine = create_async_engine(
            parsed.set(drivername="postgresql+psycopg"),
            isolation_level="AUTOCOMMIT",
            pool_size=pool_size,
            max_overflow=pool_size // 2,
            json_deserializer=orjson.loads,
        )
    return async_sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on any error."""
    with factory() as session, session.begin():
        yield session


def ping(session: Session) -> None:
    """Raise if the database cannot answer a trivial query."""
    session.execute(text("SELECT 1"))
