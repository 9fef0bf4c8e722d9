"""Telemetry's daily partitions (PostgreSQL): made ahead once, the default partition for odd times and
the move out of it, whole days pruned, a redelivery stored once; SQLite's plain table has none."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from cloud.registry import partitions, telemetry
from tests.cloud.factories import make_cohort, make_device
from wire.messages import Status

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TODAY = NOW.date()


@pytest.fixture
def partitioned(session: Session) -> Iterator[Session]:
    """The session on PostgreSQL, whose partitions are put back as they were after the test."""
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("telemetry is partitioned on PostgreSQL only")
    before = set(partitions.attached(session))
    session.commit()
    yield session
    session.rollback()
    for name in set(partitions.attached(session)) - before:
        session.execute(text(f"DROP TABLE {name}"))
    session.commit()
    partitions.create(session, [d for d in map(partitions.day_of, before) if d is not None])


def day(offset: int) -> date:
    """The day `offset` days from TODAY."""
    return TODAY + timedelta(days=offset)


def add(session: Session, *times: datetime) -> list[uuid.UUID]:
    """A sample of cam-a at each time, committed; their msg_ids."""
    rows: list[dict[str, Any]] = [{"msg_id": uuid.uuid4(), "device_id": "cam-a", "at": at} for at in times]
    telemetry.add_samples(session, rows)
    session.commit()
    return [row["msg_id"] for row in rows]


def homes(session: Session) -> dict[uuid.UUID, str]:
    """The partition each stored sample is in, by msg_id."""
    rows = session.execute(text("SELECT msg_id, tableoid::regclass::text FROM telemetry"))
    return dict(rows.tuples().all())


def one_device(session: Session) -> None:
    make_cohort(session)
    make_device(session, "cam-a")
    session.commit()


def test_partitions_are_made_ahead_once(partitioned: Session) -> None:
    # Execute
    first = partitions.create_ahead(partitioned, days=2, now=NOW)
    again = partitions.create_ahead(partitioned, days=2, now=NOW + timedelta(hours=11))

    # Assert
    expected = [partitions.partition_name(day(n)) for n in range(3)]
    assert first == expected and again == []
    assert set(expected) | {partitions.DEFAULT} <= set(partitions.attached(partitioned))


def test_two_workers_making_the_same_partitions_at_once_make_each_once(
    partitioned: Session, sessions: sessionmaker[Session]
) -> None:
    # Prepare
    start = threading.Barrier(2)
    made: list[list[str]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        with sessions() as own:
            start.wait()
            try:
                made.append(partitions.create_ahead(own, days=4, now=NOW))
            except Exception as exc:  # reported by the assertion below
                errors.append(exc)

    # Execute
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    # Assert
    assert errors == []
    assert sorted(made[0] + made[1]) == [partitions.partition_name(day(n)) for n in range(5)]


def test_a_sample_no_day_takes_lands_in_the_default_partition_and_moves_when_its_day_is_made(
    partitioned: Session,
) -> None:
    # Prepare: a partition for today only; a device whose clock is 40 days ahead, one a year behind
    one_device(partitioned)
    partitions.create(partitioned, [TODAY])
    ahead, behind, now = add(partitioned, NOW + timedelta(days=40), NOW - timedelta(days=365), NOW)
    landed = homes(partitioned)

    # Execute
    made = partitions.create(partitioned, [day(40)])

    # Assert
    assert landed == {
        ahead: partitions.DEFAULT,
        behind: partitions.DEFAULT,
        now: partitions.partition_name(TODAY),
    }
    assert made == [partitions.partition_name(day(40))]
    assert homes(partitioned) == {**landed, ahead: partitions.partition_name(day(40))}
    assert len(telemetry.query_page(partitioned, device_id="cam-a", limit=10)[0]) == 3


def test_prune_drops_whole_old_days_and_keeps_the_recent_ones(partitioned: Session) -> None:
    # Prepare: five days of two samples each, and an old sample in the default partition
    one_device(partitioned)
    partitions.create(partitioned, [day(-n) for n in range(5)])
    for n in range(5):
        add(partitioned, NOW - timedelta(days=n), NOW - timedelta(days=n, hours=1))
    (old,) = add(partitioned, NOW - timedelta(days=400))

    # Execute: the cutoff falls on day -3, which stays whole
    pruned = telemetry.remove_expired(partitioned, retention=timedelta(days=3, hours=6), now=NOW)

    # Assert
    assert [d.name for d in pruned.dropped] == [partitions.partition_name(day(-4))]
    assert (pruned.deleted, pruned.rows) == (1, 3)
    assert partitions.partition_name(day(-4)) not in partitions.attached(partitioned)
    kept = {NOW.date() - row.at.date() for row in telemetry.query_page(partitioned, limit=100)[0]}
    assert kept == {timedelta(days=n) for n in range(4)} and old not in homes(partitioned)


def test_prune_on_postgresql_keeps_the_cutoffs_whole_day(partitioned: Session) -> None:
    # Prepare: the cutoff falls at noon on day -1; a sample just after midnight that day
    one_device(partitioned)
    partitions.create(partitioned, [day(-2), day(-1)])
    add(partitioned, NOW - timedelta(hours=35), NOW - timedelta(hours=37))

    # Execute
    removed = telemetry.prune(partitioned, retention=timedelta(days=1), now=NOW)

    # Assert
    assert removed == 1
    assert [NOW - row.at for row in telemetry.query_page(partitioned, limit=10)[0]] == [timedelta(hours=35)]


def status(at: datetime) -> Status:
    """A status message of cam-a sent at `at`."""
    return Status.model_validate({"device_id": "cam-a", "sent_at": at, "uptime_s": 1.0})


PATHS: dict[str, Callable[[Session, list[Status]], set[uuid.UUID]]] = {
    "copy": telemetry.add_statuses,
    "insert": lambda session, statuses: telemetry.add_samples(session, map(telemetry.sample_of, statuses)),
}


@pytest.mark.parametrize("path", PATHS)
def test_a_redelivered_message_is_stored_once_in_its_days_partition(partitioned: Session, path: str) -> None:
    # Prepare
    one_device(partitioned)
    partitions.create(partitioned, [TODAY])
    store = PATHS[path]
    first = status(NOW)
    store(partitioned, [first])
    partitioned.commit()
    fresh = status(NOW + timedelta(seconds=1))

    # Execute
    added = store(partitioned, [fresh, first])
    partitioned.commit()

    # Assert
    assert added == {fresh.msg_id}
    assert homes(partitioned) == dict.fromkeys([first.msg_id, fresh.msg_id], partitions.partition_name(TODAY))


def test_a_plain_table_has_no_partitions_to_make(session: Session) -> None:
    # Prepare
    if session.get_bind().dialect.name != "sqlite":
        pytest.skip("SQLite's telemetry is a plain table")

    # Execute
    made = partitions.create_ahead(session, now=NOW)

    # Assert
    assert made == [] and not partitions.is_partitioned(session)


def test_names_say_their_day() -> None:
    named: dict[str, Any] = {n: partitions.day_of(n) for n in ("telemetry_p20261206", "telemetry_default")}

    assert named == {"telemetry_p20261206": date(2026, 12, 6), "telemetry_default": None}
    assert partitions.partition_name(date(2026, 12, 6)) == "telemetry_p20261206"
    assert partitions.is_partition("telemetry_default") and not partitions.is_partition("telemetry")
