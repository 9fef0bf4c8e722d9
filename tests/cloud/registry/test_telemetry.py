"""Registry telemetry: batch inserts, time-window queries, retention pruning, and UTC timestamps."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import OperationalError, StatementError
from sqlalchemy.orm import Session

from cloud.registry import telemetry
from cloud.registry.tables import Cohort, Device, Telemetry, UTCDateTime
from tests.cloud.factories import make_cohort, make_device
from wire.messages import Status

NOW = datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))


def sample(device_id: str, at: datetime, **values: Any) -> dict[str, Any]:
    """One status sample as the ingest writes it."""
    return {"msg_id": uuid.uuid4(), "device_id": device_id, "at": at, **values}


def two_devices(session: Session) -> None:
    """The kitchen cohort with devices cam-a and cam-b."""
    make_cohort(session)
    make_device(session, "cam-a")
    make_device(session, "cam-b")


def ages(session: Session) -> list[timedelta]:
    """How old each stored sample is relative to NOW, newest first."""
    session.expire_all()
    return [NOW - row.at for row in telemetry.query_page(session, limit=100)[0]]


def test_add_samples_inserts_them_all(session: Session) -> None:
    # Prepare
    two_devices(session)
    rows = [sample("cam-a", NOW - timedelta(seconds=i), mean_confidence=0.9) for i in range(5)]

    # Execute
    added = telemetry.add_samples(session, rows)
    nothing = telemetry.add_samples(session, [])
    session.commit()

    # Assert
    assert added == {row["msg_id"] for row in rows} and nothing == set()
    assert session.scalar(select(func.count()).select_from(Telemetry)) == 5


def test_a_redelivered_sample_is_stored_once(session: Session) -> None:
    # Prepare
    two_devices(session)
    first = [sample("cam-a", NOW), sample("cam-b", NOW)]
    telemetry.add_samples(session, first)
    session.commit()
    again = [first[1], sample("cam-a", NOW + timedelta(seconds=1))]

    # Execute
    added = telemetry.add_samples(session, again)
    session.commit()

    # Assert
    assert added == {again[1]["msg_id"]}
    assert session.scalar(select(func.count()).select_from(Telemetry)) == 3


def test_timestamps_come_back_aware_utc_and_equal(session: Session) -> None:
    # Prepare
    two_devices(session)
    at = datetime(2026, 3, 1, 14, 30, 0, 123_456, tzinfo=PLUS_TWO)
    telemetry.add_samples(session, [sample("cam-a", at, class_histogram={"3": 4})])
    session.commit()
    session.expire_all()

    # Execute
    (row,), _ = telemetry.query_page(session, device_id="cam-a", limit=10)

    # Assert
    assert row.at == at
    assert row.at.utcoffset() == timedelta(0)
    assert row.at.tzinfo is UTC
    assert (row.at.hour, row.at.microsecond) == (12, 123_456)
    assert row.class_histogram == {"3": 4}


def status(device_id: str, at: datetime, **fields: Any) -> Status:
    """A validated status message, as the ingest hands it over."""
    return Status.model_validate({"device_id": device_id, "sent_at": at, "uptime_s": 1.0, **fields})


def stored(session: Session) -> dict[uuid.UUID, dict[str, Any]]:
    """Every telemetry row by msg_id, as column → value."""
    session.expire_all()
    rows = session.scalars(select(Telemetry)).all()
    return {r.msg_id: {c: getattr(r, c) for c in telemetry.COPY_COLUMNS} for r in rows}


def test_statuses_are_stored_with_every_value_exact(session: Session) -> None:
    # Prepare: values a text round trip could bend (floats, a 64-bit count, another time zone)
    two_devices(session)
    full = status(
        "cam-a",
        datetime(2026, 3, 1, 14, 30, 0, 123_456, tzinfo=PLUS_TWO),
        model_id="kitchen.v1:int8",
        uptime_s=0.1 + 0.2,
        inference_count=(1 << 63) - 1,
        latency_p50_ms=1e-7,
        latency_p95_ms=1e16,
        mean_confidence=0.3333333333333333,
        class_histogram={"0": 1, "255": (1 << 63) - 1},
        labelled_count=(1 << 31) - 1,
        accuracy=1.0,
        cpu_percent=25_600.0,
        mem_bytes=0,
        temp_c=-100.0,
    )
    bare = status("cam-b", NOW)  # every optional value absent, an empty histogram

    # Execute
    added = telemetry.add_statuses(session, [full, bare])
    session.commit()

    # Assert
    rows = stored(session)
    assert added == {full.msg_id, bare.msg_id}
    assert rows[full.msg_id] == telemetry.sample_of(full)
    assert rows[bare.msg_id] == telemetry.sample_of(bare)
    assert rows[bare.msg_id]["class_histogram"] is None and rows[bare.msg_id]["model_id"] is None
    assert rows[full.msg_id]["at"] == datetime(2026, 3, 1, 12, 30, 0, 123_456, tzinfo=UTC)


def test_a_batch_with_a_redelivered_status_stores_only_the_new_ones(session: Session) -> None:
    # Prepare: a first batch committed; the second repeats one of it (a redelivery after a crash)
    two_devices(session)
    first = [status("cam-a", NOW), status("cam-b", NOW)]
    telemetry.add_statuses(session, first)
    session.commit()
    again = [status("cam-a", NOW + timedelta(seconds=s)) for s in (1, 2)]

    # Execute: the redelivery makes the database refuse the batch's straight copy; the rest of the
    # transaction, before and after it, still commits
    make_device(session, "cam-c")
    added = telemetry.add_statuses(session, [again[0], first[1], again[1]])
    repeated = telemetry.add_statuses(session, [again[0]])
    make_device(session, "cam-d")
    session.commit()

    # Assert
    assert added == {again[0].msg_id, again[1].msg_id} and repeated == set()
    assert set(stored(session)) == {m.msg_id for m in first + again}
    assert {d for d in ("cam-c", "cam-d") if session.get(Device, d) is not None} == {"cam-c", "cam-d"}


def test_query_filters_by_device_model_and_window(session: Session) -> None:
    # Prepare
    two_devices(session)
    telemetry.add_samples(
        session,
        [sample("cam-a", NOW - timedelta(minutes=m), model_id="kitchen.v1") for m in range(6)]
        + [sample("cam-b", NOW - timedelta(minutes=m), model_id="kitchen.v2") for m in range(3)],
    )
    session.commit()

    # Execute
    window, window_total = telemetry.query_page(
        session,
        device_id="cam-a",
        since=(NOW - timedelta(minutes=4)).astimezone(PLUS_TWO),  # same instant, another zone
        until=NOW - timedelta(minutes=1),
        limit=100,
    )
    by_model, _ = telemetry.query_page(session, model_id="kitchen.v2", limit=100)
    page, page_total = telemetry.query_page(session, device_id="cam-a", limit=2, offset=1)

    # Assert
    assert [NOW - r.at for r in window] == [timedelta(minutes=m) for m in (2, 3, 4)]  # since ≤ at < until
    assert {r.device_id for r in by_model} == {"cam-b"} and len(by_model) == 3
    assert [NOW - r.at for r in page] == [timedelta(minutes=1), timedelta(minutes=2)]
    assert (window_total, page_total) == (3, 6)


def test_prune_deletes_only_samples_older_than_the_retention(session: Session) -> None:
    # Prepare
    two_devices(session)
    hours = [0, 1, 23, 24, 25, 48, 24 * 30]
    telemetry.add_samples(
        session, [sample("cam-a" if h % 2 else "cam-b", NOW - timedelta(hours=h)) for h in hours]
    )
    session.commit()

    # Execute
    deleted = telemetry.prune(session, retention=timedelta(hours=24), now=NOW)
    session.commit()

    # Assert: a plain table (SQLite) keeps the cutoff itself and nothing older; PostgreSQL keeps the
    # cutoff's whole day (test_partitions)
    kept = (0, 1, 23, 24) if session.get_bind().dialect.name == "sqlite" else (0, 1, 23, 24, 25)
    assert deleted == 7 - len(kept)
    assert ages(session) == [timedelta(hours=h) for h in kept]


def test_prune_works_in_batches(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    two_devices(session)
    monkeypatch.setattr(telemetry, "PRUNE_BATCH", 2)
    telemetry.add_samples(session, [sample("cam-a", NOW - timedelta(days=d)) for d in range(8)])
    session.commit()

    # Execute
    deleted = telemetry.prune(session, retention=timedelta(days=2, hours=12), now=NOW)
    session.commit()

    # Assert
    assert deleted == 5
    assert ages(session) == [timedelta(days=d) for d in (0, 1, 2)]


def test_prune_with_nothing_old_deletes_nothing(session: Session) -> None:
    # Prepare
    two_devices(session)
    telemetry.add_samples(session, [sample("cam-a", NOW)])

    # Execute
    deleted = telemetry.prune(session, retention=timedelta(days=7), now=NOW)

    # Assert
    assert deleted == 0
    assert ages(session) == [timedelta(0)]


def test_prune_defaults_to_the_current_time(session: Session) -> None:
    # Prepare
    two_devices(session)
    real_now = datetime.now(UTC)
    telemetry.add_samples(
        session, [sample("cam-a", real_now - timedelta(days=10)), sample("cam-a", real_now)]
    )

    # Execute
    deleted = telemetry.prune(session, retention=timedelta(days=7))

    # Assert
    assert deleted == 1


def test_a_naive_timestamp_is_refused_by_core_inserts(session: Session) -> None:
    # Prepare
    two_devices(session)
    naive = datetime(2026, 3, 1, 12, 0, 0)

    # Execute / Assert (PostgreSQL copies the rows in, so no statement wraps the error)
    with pytest.raises((StatementError, ValueError), match="naive datetimes are not stored"):
        telemetry.add_samples(session, [sample("cam-a", naive)])


def test_a_naive_timestamp_is_refused_by_the_orm(session: Session) -> None:
    # Prepare
    session.add(Cohort(id="kitchen", created_at=datetime(2026, 3, 1, 12, 0, 0)))

    # Execute / Assert
    with pytest.raises(StatementError, match="naive datetimes are not stored"):
        session.flush()


def test_utc_datetime_converts_on_the_way_in_and_out(session: Session) -> None:
    # Prepare
    column = UTCDateTime()
    dialect = session.get_bind().dialect
    aware = datetime(2026, 3, 1, 14, 0, tzinfo=PLUS_TWO)

    # Execute
    bound = column.process_bind_param(aware, dialect)
    read_naive = column.process_result_value(datetime(2026, 3, 1, 12, 0), dialect)
    read_aware = column.process_result_value(aware, dialect)

    # Assert
    assert bound == aware and bound is not None and bound.tzinfo is UTC
    assert read_naive == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert read_aware is not None and read_aware.tzinfo is UTC and read_aware == aware
    assert column.process_bind_param(None, dialect) is None
    assert column.process_result_value(None, dialect) is None
    with pytest.raises(ValueError, match="naive"):
        column.process_bind_param(datetime(2026, 3, 1), dialect)


def test_a_lost_database_during_the_copy_is_an_invalidated_operational_error(engine: Engine) -> None:
    # The ingest retries a batch on OperationalError; the pool must not hand the dead connection out.
    # Prepare: a session holding its connection; another session ends that connection's backend
    if engine.dialect.name != "postgresql":
        pytest.skip("the batch is copied on PostgreSQL only")
    with Session(engine) as setup:
        two_devices(setup)
        setup.commit()
    doomed = Session(engine)
    pid = doomed.execute(text("SELECT pg_backend_pid()")).scalar_one()
    with Session(engine) as other:
        other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        other.commit()

    # Execute
    with pytest.raises(OperationalError) as lost:
        telemetry.add_statuses(doomed, [status("cam-a", NOW)])
    doomed.close()

    # Assert: the error is SQLAlchemy's, its connection discarded; a new session stores the batch
    assert lost.value.connection_invalidated
    with Session(engine) as again:
        assert again.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
        assert len(telemetry.add_statuses(again, [status("cam-a", NOW)])) == 1
