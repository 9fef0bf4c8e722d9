"""Alembic migrations on fresh SQLite and PostgreSQL databases: up, down, up again, no drift, and
telemetry's rows through its partitioning (0012)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, String, Uuid, bindparam, insert, inspect, literal_column, select, text
from sqlalchemy.orm import Session

from cloud.registry import migrate, partitions, telemetry
from cloud.registry.db import make_engine
from cloud.registry.tables import Base, KnowledgeReport, Telemetry, UTCDateTime
from tests.databases import BACKENDS, postgres_admin_url
from testsupport.postgres import scratch_database

BOOKKEEPING = {"alembic_version"}


@pytest.fixture(params=BACKENDS)
def fresh_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a brand-new, empty database of its own (not the session's migrated one)."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'migrations.db'}")
        yield engine
        engine.dispose()
        return
    with scratch_database(postgres_admin_url(), prefix="diredi_mig") as url:
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def table_names(engine: Engine) -> set[str]:
    """The tables the database holds now, telemetry's partitions aside (`partitions.is_partition`)."""
    return {name for name in inspect(engine).get_table_names() if not partitions.is_partition(name)}


def drift(engine: Engine) -> list[Any]:
    """What autogenerate would change to make the database match the models (empty: no drift)."""
    with engine.connect() as connection:
        opts = {"compare_type": True, "include_name": migrate.include_name}  # as migrations/env.py
        context = MigrationContext.configure(connection, opts=opts)
        return list(compare_metadata(context, Base.metadata))


def revisions_newest_first() -> list[str]:
    """Every revision id from head down to the first one."""
    config = Config()
    config.set_main_option("script_location", str(migrate.MIGRATIONS_DIR))
    return [script.revision for script in ScriptDirectory.from_config(config).walk_revisions()]


def test_upgrade_creates_every_table_at_head(fresh_engine: Engine) -> None:
    # Prepare
    assert migrate.current(fresh_engine) is None

    # Execute
    migrate.upgrade(fresh_engine)

    # Assert
    assert migrate.current(fresh_engine) == migrate.head()
    assert table_names(fresh_engine) == set(Base.metadata.tables) | BOOKKEEPING


def test_downgrade_to_base_removes_every_table_then_upgrade_restores_them(fresh_engine: Engine) -> None:
    # Prepare
    migrate.upgrade(fresh_engine)

    # Execute
    migrate.downgrade(fresh_engine, "base")
    after_down = table_names(fresh_engine)
    revision_after_down = migrate.current(fresh_engine)
    migrate.upgrade(fresh_engine)

    # Assert
    assert after_down <= BOOKKEEPING
    assert revision_after_down is None
    assert migrate.current(fresh_engine) == migrate.head()
    assert table_names(fresh_engine) == set(Base.metadata.tables) | BOOKKEEPING
    assert drift(fresh_engine) == []


def test_migrated_schema_matches_the_models(fresh_engine: Engine) -> None:
    # Prepare
    migrate.upgrade(fresh_engine)

    # Execute
    differences = drift(fresh_engine)

    # Assert
    assert differences == []


def test_every_migration_steps_down_one_revision_at_a_time(fresh_engine: Engine) -> None:
    # Prepare
    revisions = revisions_newest_first()
    migrate.upgrade(fresh_engine)
    visited = []

    # Execute
    for revision in revisions:
        assert migrate.current(fresh_engine) == revision
        migrate.downgrade(fresh_engine, "-1")
        visited.append(revision)

    # Assert
    assert revisions[0] == migrate.head()
    assert visited == revisions
    assert migrate.current(fresh_engine) is None
    assert table_names(fresh_engine) <= BOOKKEEPING


def test_each_revision_upgrades_from_the_one_below(fresh_engine: Engine) -> None:
    # Prepare
    oldest_first = list(reversed(revisions_newest_first()))

    # Execute
    reached = []
    for revision in oldest_first:
        migrate.upgrade(fresh_engine, revision)
        reached.append(migrate.current(fresh_engine))

    # Assert
    assert reached == oldest_first
    assert drift(fresh_engine) == []


def partition_of_each_row(engine: Engine) -> dict[int, str]:
    """The partition each telemetry row is in, by id (PostgreSQL; none on SQLite)."""
    if engine.dialect.name != "postgresql":
        return {}
    with engine.connect() as connection:
        home = literal_column("tableoid::regclass::text", String)
        return dict(connection.execute(select(Telemetry.id, home)).tuples().all())


def test_telemetry_keeps_its_rows_through_partitioning_and_back(fresh_engine: Engine) -> None:
    # Prepare: rows of today, three days ago and a clock far behind, stored before 0012
    migrate.upgrade(fresh_engine, "0011")
    now = datetime.now(UTC)
    times = [now, now - timedelta(days=3), now - timedelta(days=500)]
    rows = [{"msg_id": uuid.uuid4(), "device_id": "cam-1", "at": at} for at in times]
    with fresh_engine.begin() as connection:
        connection.execute(insert(Telemetry), rows)
        ids = connection.execute(select(Telemetry.id).order_by(Telemetry.id)).scalars().all()

    # Execute
    migrate.upgrade(fresh_engine)
    homes = partition_of_each_row(fresh_engine)
    with Session(fresh_engine) as session:
        added = telemetry.add_samples(session, [{**rows[0], "msg_id": uuid.uuid4()}])
        session.commit()
        at_head = session.execute(select(Telemetry.id, Telemetry.msg_id).order_by(Telemetry.id)).all()
    migrate.downgrade(fresh_engine, "0011")
    with fresh_engine.connect() as connection:
        after_down = connection.execute(select(Telemetry.msg_id).order_by(Telemetry.id)).scalars().all()
    migrate.upgrade(fresh_engine)

    # Assert: ids kept and carried on; on PostgreSQL each row in its day's partition, the old one in the
    # default partition
    assert [i for i, _ in at_head][:3] == ids and at_head[3][0] > ids[-1] and len(added) == 1
    if fresh_engine.dialect.name == "postgresql":
        days = [partitions.partition_name(at.date()) for at in times[:2]]
        assert homes == dict(zip(ids, [*days, partitions.DEFAULT], strict=True))
    assert after_down == [m for _, m in at_head]
    assert drift(fresh_engine) == []


def test_0014_leaves_noticed_the_reports_stored_before_but_those_waiting_for_a_job(
    fresh_engine: Engine,
) -> None:
    # Prepare: a received and a consumed report, stored at the revision below 0014
    newest_first = revisions_newest_first()
    migrate.upgrade(fresh_engine, newest_first[newest_first.index("0014") + 1])
    rows = {"received": uuid.uuid4(), "consumed": uuid.uuid4()}
    now = datetime.now(UTC)
    with fresh_engine.begin() as connection:
        connection.execute(
            text("INSERT INTO cohort (id, description, created_at) VALUES ('k', '', :at)"), {"at": now}
        )
        connection.execute(
            text(
                "INSERT INTO model (id, cohort_id, kind, version, format, sha256, size, metrics, status, "
                "status_reason, created_at) VALUES ('k.v1', 'k', 'edge', 1, 'tflite-int8', :sha, 1, '{}', "
                "'approved', '', :at)"
            ),
            {"sha": "0" * 64, "at": now},
        )
        connection.execute(
            text(
                "INSERT INTO device (id, cohort_id, status, labels, presence, created_at) "
                "VALUES ('cam', 'k', 'active', '{}', 'unknown', :at)"
            ),
            {"at": now},
        )
        for status, msg_id in rows.items():
            connection.execute(
                text(
                    "INSERT INTO knowledge_report (msg_id, device_id, base_model_id, schema, size_bytes, "
                    "sample_count, metrics, status, status_reason, sent_at, received_at, payload) VALUES "
                    "(:msg_id, 'cam', 'k.v1', 's', 1, 1, '{}', :status, '', :at, :at, :payload)"
                ).bindparams(bindparam("msg_id", type_=Uuid()), bindparam("at", type_=UTCDateTime())),
                {"msg_id": msg_id, "status": status, "at": now, "payload": b"x"},
            )

    # Execute
    migrate.upgrade(fresh_engine)

    # Assert
    with Session(fresh_engine) as session:
        noticed = dict(
            session.execute(select(KnowledgeReport.msg_id, KnowledgeReport.noticed)).tuples().all()
        )
    assert noticed == {rows["received"]: False, rows["consumed"]: True}
