"""Registry helpers: a page read on the event loop (psycopg's own cursor on PostgreSQL) is the page a
session reads, and its errors are SQLAlchemy's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session

from cloud.registry.db import async_reader_factory
from cloud.registry.devices import list_devices, list_devices_async
from cloud.registry.tables import DeviceStatus, Presence
from tests.cloud.factories import make_cohort, make_device


def on_readers(engine: Engine, work: Callable[[AsyncEngine], Awaitable[Any]], **options: Any) -> Any:
    """`work` run on an asynchronous reader engine (as the API makes them) on the test's database."""
    url = engine.url.render_as_string(hide_password=False)

    async def run() -> Any:
        if options:
            readers = create_async_engine(url, isolation_level="AUTOCOMMIT", **options)
        else:
            readers = async_reader_factory(url).kw["bind"]
        try:
            return await work(readers)
        finally:
            await readers.dispose()

    return asyncio.run(run())


def needs_postgres(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("the driver's own cursor is read on PostgreSQL (psycopg)")


PAGES: list[dict[str, Any]] = [
    {"limit": 2, "offset": 0},
    {"limit": 2, "offset": 2},
    {"limit": 10, "offset": 0, "cohort_id": "kitchen"},
    {"limit": 10, "offset": 0, "presence": Presence.online},
    {"limit": 10, "offset": 0, "status": DeviceStatus.active, "cohort_id": "hall"},
    {"limit": 10, "offset": 50},  # past the end: the total needs a second query
]


def test_a_page_read_on_the_event_loop_is_the_page_a_session_reads(engine: Engine, session: Session) -> None:
    # Prepare
    make_cohort(session)
    make_cohort(session, "hall")
    for name, cohort in (
        ("cam-c", "kitchen"),
        ("cam-a", "kitchen"),
        ("cam-b", "kitchen"),
        ("hall-1", "hall"),
    ):
        make_device(session, name, cohort)[0].last_seen = datetime(2026, 11, 28, 7, 0, 0, 5, tzinfo=UTC)
    session.commit()
    session.execute(text("UPDATE device SET presence = 'online' WHERE id = 'cam-b'"))
    session.commit()
    expected = [list_devices(session, **page) for page in PAGES]

    # Execute
    async def read_all(readers: AsyncEngine) -> list[Any]:
        return [await list_devices_async(readers, **page) for page in PAGES]

    pages = on_readers(engine, read_all)

    # Assert
    assert pages == expected
    assert [d["id"] for d in pages[0][0]] == ["cam-a", "cam-b"] and pages[0][1] == 4
    assert [d["id"] for d in pages[3][0]] == ["cam-b"] and pages[5] == ([], 4)
    first = pages[0][0][0]
    assert (first["status"], first["presence"], first["labels"]) == ("active", "unknown", {"site": "lab"})
    assert type(first["status"]) is str  # enums as text, on every path
    assert first["last_seen"] == datetime(2026, 11, 28, 7, 0, 0, 5, tzinfo=UTC)
    assert first["last_seen"].utcoffset().total_seconds() == 0


def test_on_a_connection_in_another_time_zone_a_page_still_reads_utc_times(
    engine: Engine, session: Session
) -> None:
    # psycopg gives times in the connection's zone; such a connection reads its pages through a session.
    # Prepare
    needs_postgres(engine)
    make_cohort(session)
    make_device(session, "cam-a")[0].last_seen = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)  # summer time
    session.commit()

    # Execute
    async def read(readers: AsyncEngine) -> Any:
        return await list_devices_async(readers, limit=10, offset=0)

    rows, total = on_readers(engine, read, connect_args={"options": "-c TimeZone=Europe/Paris"})

    # Assert
    assert total == 1
    assert rows[0]["last_seen"] == datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
    assert all(rows[0][name].utcoffset().total_seconds() == 0 for name in ("last_seen", "created_at"))


def test_a_value_the_driver_refuses_is_sqlalchemys_data_error(engine: Engine) -> None:
    # The API answers SQLAlchemy's DataError with a 422 problem, whichever path ran the statement.
    # Prepare
    needs_postgres(engine)

    async def read(readers: AsyncEngine) -> Any:
        return await list_devices_async(readers, limit=10, offset=0, cohort_id="kit\x00chen")

    # Execute / Assert
    with pytest.raises(DataError):
        on_readers(engine, read)


def test_a_lost_connection_is_an_invalidated_operational_error_and_the_next_page_reconnects(
    engine: Engine, session: Session
) -> None:
    # The API answers OperationalError with a 503 problem; the pool must not hand the dead connection out.
    # Prepare
    needs_postgres(engine)
    make_cohort(session)
    make_device(session, "cam-a")
    session.commit()

    async def lose_and_read_again(readers: AsyncEngine) -> tuple[OperationalError, Any, int, int]:
        await list_devices_async(readers, limit=10, offset=0)  # one connection in the pool, used again
        async with readers.connect() as connection:
            pid = (await connection.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
        session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        session.commit()
        # Execute
        with pytest.raises(OperationalError) as lost:
            await list_devices_async(readers, limit=10, offset=0)
        again = await list_devices_async(readers, limit=10, offset=0)
        async with readers.connect() as connection:
            new_pid = (await connection.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
        return lost.value, again, pid, new_pid

    lost, (rows, total), pid, new_pid = on_readers(engine, lose_and_read_again)

    # Assert
    assert lost.connection_invalidated
    assert [d["id"] for d in rows] == ["cam-a"] and total == 1
    assert new_pid != pid
